"""GPU paths checked on the CPU: the static decode step (qtrain.fastdecode), its compiled form,
the traceable linear plans and the prefill wrapper (qtrain.quant.cuda.linear), the compiled
fake-quant training block, and gpu_check.py's dry run without hydra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.config import ModelConfig
from qtrain.fastdecode import FastDecoder
from qtrain.model import GPT
from qtrain.quant import FakeQuantLinear, Int4Linear, Int8Linear, LayerSpec
from qtrain.quant.cuda.linear import apply_linear, plan_linear

ROOT = Path(__file__).resolve().parents[2]
SPECS = {
    "int8": LayerSpec("int8", 8),
    "int4 asym": LayerSpec("int4", 4, 32, False),
    "int8da_int4w": LayerSpec("int8da_int4w", 4, 32, True, "int8"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(spec: LayerSpec | None) -> GPT:
    """model=tiny with weights scaled up (distinct greedy tokens, not one repeated byte), packed
    with ``spec`` and the reference kernel (float32 dequantize + matmul, as the static step)."""
    model = GPT(ModelConfig())
    model.init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    if spec is not None:
        cls = Int8Linear if spec.bits == 8 else Int4Linear
        for block in model.blocks:
            for parent, name in ((block.attn, "qkv"), (block.attn, "out"), (block.mlp, "gate_up"), (block.mlp, "down")):
                lin = getattr(parent, name)
                setattr(parent, name, cls.from_float(lin.weight.detach(), spec, kernel="reference", name=name))
    return model.eval()


def _greedy(model: GPT, prompt: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """GreedyDecoder's loop (prefill, then decode_step), tokens and logits."""
    from qtrain.model import KVCache

    cache = KVCache.empty(model.cfg, 1, torch.device("cpu"), torch.float32)
    logits, pos, toks, all_logits = model(prompt, cache, 0)[:, -1], prompt.shape[1], [], []
    for _ in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model.decode_step(nxt, cache, pos)
        pos += 1
        toks.append(int(nxt))
        all_logits.append(logits)
    return toks, all_logits


@pytest.mark.parametrize("scheme", [None, *SPECS])
def test_static_step_decodes_the_greedy_tokens(scheme: str | None) -> None:
    model = _tiny(SPECS[scheme] if scheme else None)
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, ref_logits = _greedy(model, prompt, 16)
        dec = FastDecoder(model, prompt, max_len=30)
        got, logits = [], []
        for _ in range(16):
            got.append(int(dec.step()))
            logits.append(dec.logits.clone())
        dec.reset()
        again = [int(dec.step()) for _ in range(16)]
    assert len(set(ref)) > 3  # a real sequence, not one repeated token
    assert got == ref and again == ref
    # float32 throughout; only the summation order of the attention (whole static cache, masked)
    # and of the rotary (real instead of complex) differ: relative 1e-5 is far above that.
    for a, b in zip(ref_logits, logits, strict=True):
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    assert int(dec.pos) == 7 + 16 and dec.max_len == 64 and dec.room == 64 - 23


@pytest.mark.parametrize(("temperature", "top_k"), [(0.0, 0), (1.0, 10)])
def test_generation_through_the_static_step_gives_the_loop_tokens(temperature: float, top_k: int) -> None:
    from qtrain.evaluate import _generate_static, fast_decoder, generate_tokens

    model = _tiny(SPECS["int4 asym"])
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    ref = generate_tokens(model, prompt, 12, temperature, top_k, seed=0)  # the KV-cache loop (CPU)
    assert fast_decoder(model, prompt, 12) is None  # off CUDA: the loop
    with torch.inference_mode():
        dec = FastDecoder(model, prompt, max_len=18)  # what fast_decoder builds on CUDA (here eager)
        gen = torch.Generator().manual_seed(0)
        got = _generate_static(dec, prompt, 12, temperature, top_k, gen)
    assert torch.equal(got, ref)  # logits equal to 1e-5 relative (test above): the same draws and argmaxes


def test_static_step_compiles_to_one_graph_per_layout_without_recompiles() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def count(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # noqa: ANN202
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = _tiny(SPECS["int8da_int4w"])
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, _ = _greedy(model, prompt, 6)
        dec = FastDecoder(model, prompt, max_len=20, compile=True, backend=count)
        got = [int(dec.step()) for _ in range(6)]
    assert got == ref
    assert len(graphs) == 2  # the block (shared by both layers, every token) and the head: fullgraph, no recompile


def test_static_decoder_refuses_a_graph_on_cpu_and_a_full_cache() -> None:
    model = _tiny(None)
    prompt = torch.zeros(1, 60, dtype=torch.long)
    with pytest.raises(ValueError, match="CUDA graph needs a CUDA device"):
        FastDecoder(model, prompt, graph=True)
    with torch.inference_mode():
        dec = FastDecoder(model, prompt, max_len=64)
        for _ in range(4):
            dec.step()
        with pytest.raises(ValueError, match="is full"):
            dec.step()
    with pytest.raises(ValueError, match="leaves no room"):
        FastDecoder(model, torch.zeros(1, 64, dtype=torch.long), max_len=64)


@pytest.mark.parametrize("spec", [LayerSpec("int8", 8, -1, True, "int8"), LayerSpec("int4", 4, -1)])
def test_plans_match_the_reference(spec: LayerSpec) -> None:
    gen = torch.Generator().manual_seed(3)
    cls = Int8Linear if spec.bits == 8 else Int4Linear
    layer = cls.from_float(torch.randn(24, 64, generator=gen) * 0.05, spec, kernel="reference")
    x = torch.randn(2, 40, 64, generator=gen)
    plan, tensors = plan_linear(layer, torch.device("cpu"))
    assert plan.kind == ("int8" if spec.bits == 8 else "int4") and plan.act_int8 == (spec.activations == "int8")
    ref = layer.reference_forward(x)
    # float32 both; the plans dequantize in float32 like the reference (products reordered only)
    assert torch.allclose(apply_linear(plan, x, tensors), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="cannot plan"):
        plan_linear(nn.Embedding(4, 4), torch.device("cpu"))
    with pytest.raises(ValueError, match="int4='fast'"):
        plan_linear(layer, torch.device("cpu"), int4="fast")


def test_plans_add_the_bias_after_the_product() -> None:
    gen = torch.Generator().manual_seed(4)
    lin = nn.Linear(64, 24)
    packed = Int4Linear.from_float(lin.weight.detach(), LayerSpec("int4", 4, 32), kernel="reference")
    packed.set_bias(lin.bias.detach())  # Qwen2's qkv: a float bias next to the packed weight
    x = torch.randn(3, 64, generator=gen)
    for mod in (lin, packed):
        plan, tensors = plan_linear(mod, torch.device("cpu"))
        assert plan.bias and tensors[-1] is mod.bias
        # float32 both: the plan adds the same bias after a product reordered only
        torch.testing.assert_close(apply_linear(plan, x, tensors), mod(x), rtol=1e-5, atol=1e-5)


def test_fake_quant_block_compiles_into_one_graph_for_every_step() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def count(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # noqa: ANN202
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = GPT(ModelConfig())
    model.init_weights(0)
    spec = SPECS["int8da_int4w"]
    for block in model.blocks:
        for parent, name in ((block.attn, "qkv"), (block.attn, "out"), (block.mlp, "gate_up"), (block.mlp, "down")):
            setattr(parent, name, FakeQuantLinear.from_linear(getattr(parent, name), spec, name=name))
        block.compile(fullgraph=True, backend=count)  # regional: the fake-quant is traced in the block
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randint(0, 256, (2, 16), generator=gen), torch.randint(0, 256, (2, 16), generator=gen)
        loss = F.cross_entropy(model(x).view(-1, 256), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(graphs) == 1  # one graph for both blocks and all steps: no break, no recompile


def test_gpu_check_dry_run_without_hydra(tmp_path: Path) -> None:
    """The script imports on a bare GPU box (stand-ins for hydra/omegaconf); its cheapest section
    runs here, the others in-process in test_gpu_check.py."""
    out = tmp_path / "gpu.json"
    code = (
        "import runpy, sys\n"
        "sys.modules['hydra'] = None; sys.modules['omegaconf'] = None  # a GPU box without them\n"
        f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--sections', 'prefill', '--out', {str(out)!r}]\n"
        f"runpy.run_path({str(ROOT / 'scripts' / 'gpu_check.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny shapes (see _one_thread)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["prefill"]
    assert [r["scheme"] for r in rows] == ["bf16", "int8", "int4 g32", "int8da_int4w g32", "int8 act8"]
    assert all("error" not in r and r["32_tokens_per_s"] > 0 for r in rows), rows
    assert all(r["kernels"] == ["torch"] for r in rows[1:])  # what the packed layers ran: the CPU table row


def test_gpu_check_keeps_eager_numbers_when_the_static_step_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_paths", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gc)  # its dataclasses look their module up
    spec.loader.exec_module(gc)

    def broken(*args, **kwargs):
        raise RuntimeError("inductor failed\ndetails")

    monkeypatch.setattr(gc, "StaticDecoder", broken)
    base = gc.random_model(gc.MODEL_DRY, torch.device("cpu"), torch.float32)
    row = gc.decode_one(base, "int8", 3, False, 10.0)
    assert row["static_error"] == "RuntimeError: inductor failed" and row["eager_tokens_per_s"] > 0
    gc.show({"device_name": "cpu", "torch": "x", "decode": {"copy_bandwidth_gbs": 10.0, "rows": [row]}})


def _candidates(calls: list[str], built: list[str]) -> dict:
    """Three candidate kernels computing ``2 x``: one that fails, two that work (by name)."""

    def make(name: str):  # noqa: ANN202
        def build():  # noqa: ANN202
            built.append(name)

            def run(x: torch.Tensor) -> torch.Tensor:
                if name == "broken":
                    raise RuntimeError("no such kernel here")
                calls.append(name)
                return x * 2

            return run

        return build

    return {name: make(name) for name in ("broken", "slow", "fast")}


def test_measured_kernel_keeps_the_fastest_candidate_and_remembers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from qtrain.quant.cuda import select

    monkeypatch.setattr(select, "CHOICES", {})
    monkeypatch.setattr(select, "TIMINGS", {})
    calls: list[str] = []
    cost = {"slow": 50.0, "fast": 5.0}  # a stand-in clock: no timing in a test

    def fake_time(fn, device, reps=10):  # noqa: ANN001, ANN202
        fn()
        return cost[calls[-1]]

    monkeypatch.setattr(select, "time_call", fake_time)
    built: list[str] = []
    m = select.Measured(("layer", 24, 64), _candidates(calls, built))
    x = torch.ones(2, 3)
    assert torch.equal(m(x), x * 2) and m.chosen == "fast"
    assert select.CHOICES[("layer", 24, 64)] == "fast" and select.TIMINGS[("layer", 24, 64)] == cost
    calls.clear()
    m(x)
    assert calls == ["fast"]  # measured once; the losers are dropped
    built.clear()
    m2 = select.Measured(("layer", 24, 64), _candidates(calls, built))
    assert torch.equal(m2(x), x * 2) and built == ["fast"]  # the same shape builds only the winner


def test_measured_kernel_does_not_time_while_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    from qtrain.quant.cuda import select

    monkeypatch.setattr(select, "CHOICES", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls: list[str] = []
    m = select.Measured(("k",), _candidates(calls, []))
    assert torch.equal(m(torch.ones(1, 2)), torch.full((1, 2), 2.0))
    assert m.chosen == "slow" and calls == ["slow"] and select.CHOICES == {}  # the first that runs, not remembered


def test_per_bucket_measures_each_row_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    from qtrain.quant.cuda import select

    monkeypatch.setattr(select, "CHOICES", {})
    calls: list[str] = []
    rows: list[int] = []

    def fake_time(fn, device, reps=10):  # noqa: ANN001, ANN202
        fn()
        small = rows[-1] <= 64  # "fast" wins small calls, "slow" large ones
        return {"slow": 50.0, "fast": 5.0}[calls[-1]] * (1 if small else -1)

    monkeypatch.setattr(select, "time_call", fake_time)
    pb = select.PerBucket(("k",), _candidates(calls, []))
    for m in (3, 500, 4):
        rows.append(m)
        pb(torch.ones(m, 2))
    assert sorted(pb.by_bucket) == [4, 512] and pb.chosen == "fast+slow"
    assert select.CHOICES == {("k", 4): "fast", ("k", 512): "slow"}
