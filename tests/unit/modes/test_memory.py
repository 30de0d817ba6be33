"""qtrain.modes.memory (the peak-memory estimate), qtrain.sysmem (the memory a process may use) and
activation checkpointing in the model."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F

from qtrain import sysmem
from qtrain.config import ModelConfig, RunConfig, TrainConfig
from qtrain.model import GPT
from qtrain.modes import memory, memory_fixes

REPO = Path(__file__).resolve().parents[3]
SMALL = ["model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.mlp_hidden=256", "model.block_size=256"]


def _cfg(mode: str = "train", **train: object) -> RunConfig:
    cfg = RunConfig(model=ModelConfig(name="m", n_layer=4, n_embd=256, n_head=4, block_size=512, mlp_hidden=768))
    cfg.mode.name = mode
    cfg.train = dataclasses.replace(TrainConfig(), **train)  # type: ignore[arg-type]
    return cfg


# ---------------------------------------------------------------- the estimate


def test_parts_follow_the_config() -> None:
    cfg = _cfg(batch_size=32)
    p = memory.n_params(cfg.model)
    parts = dict(memory.estimate(cfg, cfg.model).parts)
    assert parts["weights"] == 4 * p and parts["gradients"] == 4 * p and parts["AdamW state"] == 8 * p
    act = next(v for k, v in parts.items() if k.startswith("activations"))
    half = dict(memory.estimate(_cfg(batch_size=16), cfg.model).parts)
    assert next(v for k, v in half.items() if k.startswith("activations")) < act  # fewer tokens, less memory


def test_n_params_matches_the_model() -> None:
    for tied in (True, False):
        m = ModelConfig(n_layer=3, n_embd=64, n_head=4, block_size=32, mlp_hidden=160, tie_embeddings=tied)
        assert memory.n_params(m) == sum(p.numel() for p in GPT(m).parameters())


def test_checkpointing_and_smaller_batches_reduce_the_peak() -> None:
    cfg = _cfg(batch_size=32)
    full = memory.estimate(cfg, cfg.model).total
    ckpt = memory.estimate(_cfg(batch_size=32, activation_checkpointing=True), cfg.model).total
    split = memory.estimate(_cfg(batch_size=8, grad_accum=4), cfg.model).total
    assert ckpt < full and split < full


def test_remedies_fit_the_limit_and_keep_the_sequences_per_step() -> None:
    cfg = _cfg(batch_size=32, grad_accum=2)
    total = memory.estimate(cfg, cfg.model).total
    limit = total // 2
    fixes = memory_fixes.remedies(cfg, cfg.model, limit)
    assert fixes
    for fix in fixes:
        values = dict(kv.split("=") for kv in fix.split(" (")[0].split())
        changes = {k.split(".")[1]: (v == "true" if v in ("true", "false") else int(v)) for k, v in values.items()}
        changed = _cfg(**{"batch_size": 32, "grad_accum": 2, **changes})
        assert memory.estimate(changed, cfg.model).total <= limit, fix
        assert changed.train.batch_size * changed.train.grad_accum == 64  # the same sequences per step


def test_nothing_fits_says_so() -> None:
    cfg = _cfg()
    weights_alone = 16 * memory.n_params(cfg.model)
    none = memory.Setting(loaded="none")
    fixes = memory_fixes.remedies(cfg, dataclasses.replace(cfg.model), weights_alone // 2, none)
    assert fixes == []


def test_gptq_calibration_is_counted_and_remedied() -> None:
    cfg = _cfg("ptq")
    cfg.ptq.method, cfg.ptq.calib_batches, cfg.quant.scheme = "gptq", 64, "int4"
    est = memory.estimate(cfg, cfg.model, memory.Setting(loaded="none"))
    assert est.phase == "PTQ (gptq)" and any(k.startswith("calibration") for k, _ in est.parts)
    fixes = memory_fixes.remedies(cfg, cfg.model, est.total * 2 // 3, memory.Setting(loaded="none"))
    assert any(f.startswith("ptq.calib_batches=") for f in fixes)


def test_heap_served_tensors_count_their_slack() -> None:
    small = memory._tensors([1], 1024, 4)  # 4 KiB: from the heap
    big = memory._tensors([1], memory.HEAP_MMAP_MAX, 4)  # 128 MiB: mapped, returned when freed
    assert small == int(4096 * (1 + memory.HEAP_SLACK)) and big == memory.HEAP_MMAP_MAX * 4


def test_eval_batch_is_bounded_in_tokens() -> None:
    assert [memory.eval_batch_size(t) for t in (128, 1024, 2048, 10**6)] == [32, 32, 16, 1]


def test_estimate_within_30_percent_of_measured_peak_rss(tmp_path: Path) -> None:
    """A real run in a fresh process: its report's estimate against its own peak resident size.

    The run is sized so activations are most of the peak (about 0.4 of 0.7 GB); 30% leaves room
    for the allocator, which the estimate models only roughly (see qtrain.modes.memory).
    """
    run = tmp_path / "run"
    args = ["mode=train", *SMALL, "train.batch_size=32", "train.max_steps=2", "train.warmup_steps=0"]
    args += ["train.eval_every=0", "data.val_windows=4", f"hydra.run.dir={run}"]
    wrapper = textwrap.dedent(
        """
        import resource, subprocess, sys
        code = subprocess.run([sys.executable, "-m", "qtrain", *sys.argv[1:]], capture_output=True).returncode
        print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    code, peak = map(int, out.stdout.split())
    assert code == 0, out.stderr
    estimate = json.loads((run / "report.json").read_text())["memory_estimate_bytes"]
    assert 0.7 * peak <= estimate <= 1.3 * peak, (estimate, peak)


# ---------------------------------------------------------------- the memory a process may use


def _fake_proc(root: Path, cgroup: str, mountinfo: str, meminfo_kb: int = 8_000_000) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "self" / "statm").write_text("1000 250 0 0 0 0 0\n")
    (proc / "meminfo").write_text(f"MemTotal: 16000000 kB\nMemAvailable: {meminfo_kb} kB\n")
    return proc


def test_meminfo_without_cgroup_limit(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "0::/\n", "")
    avail = sysmem.available_memory(proc)
    page = os.sysconf("SC_PAGE_SIZE")
    assert avail.bytes == 8_000_000 * 1024 + 250 * page and "MemAvailable" in avail.source


def test_cgroup_v2_limit_of_a_parent_counts(tmp_path: Path) -> None:
    mount = tmp_path / "cg2"
    leaf = mount / "jobs" / "me"
    leaf.mkdir(parents=True)
    (mount / "jobs" / "memory.max").write_text("2000000000\n")
    (mount / "jobs" / "memory.current").write_text("600000000\n")
    (mount / "jobs" / "memory.stat").write_text("anon 400000000\ninactive_file 100000000\n")
    (leaf / "memory.max").write_text("max\n")
    info = f"30 1 0:26 / {mount} rw - cgroup2 cgroup2 rw\n"
    proc = _fake_proc(tmp_path, "0::/jobs/me\n", info)
    headroom, source = sysmem.cgroup_headroom(proc) or (0, "")
    assert headroom == 2_000_000_000 - (600_000_000 - 100_000_000)  # page cache it can reclaim is not used
    assert "cgroup v2" in source and "jobs" in source
    assert sysmem.available_memory(proc).bytes == headroom + 250 * os.sysconf("SC_PAGE_SIZE")


def test_cgroup_v1_limit_and_unlimited(tmp_path: Path) -> None:
    mount = tmp_path / "memory"
    leaf = mount / "docker" / "abc"
    leaf.mkdir(parents=True)
    (leaf / "memory.limit_in_bytes").write_text("1073741824\n")
    (leaf / "memory.usage_in_bytes").write_text("73741824\n")
    (mount / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
    info = f"35 31 0:32 / {mount} rw,relatime - cgroup cgroup rw,memory\n"
    proc = _fake_proc(tmp_path, "4:memory:/docker/abc\n0::/\n", info)
    assert sysmem.cgroup_headroom(proc) == (10**9, f"cgroup v1 {leaf / 'memory.limit_in_bytes'} = 1,073,741,824 bytes")


def test_address_space_limit_is_honoured() -> None:
    """`ulimit -v` bounds what the process may allocate, whatever the machine has."""
    code = "from qtrain.sysmem import available_memory; a = available_memory(); print(a.bytes, a.source)"
    limit = 3 * 2**30

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=set_limit)
    n, source = out.stdout.split(" ", 1)
    assert int(n) < limit and "RLIMIT_AS" in source, out.stderr


# ---------------------------------------------------------------- activation checkpointing


def _loss_and_grads(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_less_kept() -> None:
    m = GPT(ModelConfig(n_layer=3, n_embd=64, n_head=4, block_size=32, mlp_hidden=128))
    m.init_weights(0)
    m.train()
    x, y = torch.randint(0, 256, (4, 32)), torch.randint(0, 256, (4, 32))
    plain_loss, plain_grads = _loss_and_grads(m, x, y)
    m.activation_checkpointing = True
    ckpt_loss, ckpt_grads = _loss_and_grads(m, x, y)
    # The same float32 ops on the same inputs, recomputed: equal up to float32 rounding (a kernel
    # may be chosen differently for the recomputation), far below any real difference.
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert len(ckpt_grads) == len(plain_grads)
    for a, b in zip(ckpt_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    kept: dict[bool, int] = {}
    for flag in (False, True):
        m.activation_checkpointing = flag
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x)
        kept[flag] = sum(sizes)
    assert kept[True] < kept[False] / 2  # only the blocks' inputs are kept (and the head's tensors)


def test_checkpointing_is_off_outside_training() -> None:
    m = GPT(ModelConfig())
    m.init_weights(0)
    m.activation_checkpointing = True
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a = m.eval()(x)
    m.activation_checkpointing = False
    with torch.no_grad():
        b = m(x)
    assert torch.equal(a, b)  # the same path: checkpointing never runs without gradients
