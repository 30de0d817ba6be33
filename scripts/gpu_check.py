"""GPU check: packed kernels against the reference, decode/prefill at model=1b shapes, QAT step time.

Not a test; one script for one GPU (meant to finish in under 5 minutes on an H100):

1. kernels: every packed kernel (int8, int8 + int8 activations, int4 group 32/128 symmetric
   and asymmetric, int8da_int4w) on random weights at the ``model=1b`` layer shapes (and an
   odd one), at 1..512 rows so every dispatch path runs (tinygemm <= 64 rows, ``_int_mm`` > 16
   rows, dequantize + matmul above), against the reference kernel (dequantize, fp32
   ``F.linear``) with the bound of ``tests/unit/quant/test_packed.py``; plus batch-1 layer
   timings (bf16 ``F.linear`` vs qtrain's int8 / int4);
2. decode: batch-1 greedy tokens/s of bf16, int8, int4 g32 (and int8da_int4w) at 1b shapes
   (20 layers, width 2048, 16 heads, mlp 5632; random weights): eager (qtrain's own KV-cache
   loop, ``qtrain.evaluate.GreedyDecoder``) and with a CUDA graph of a static-shape decode step
   (:func:`static_decode_step`: masked attention over the whole cache, position as a tensor),
   next to the memory-bandwidth bound (device copy bandwidth / weight bytes per token);
3. prefill: one forward over 512 tokens per scheme;
4. QAT: training-step time of ``model=small`` (batch 16 x 256, bf16 autocast, qtrain's
   ``Trainer``) for full precision and int4 g32 fake-quant, eager and ``torch.compile``.

Without CUDA it prints why and exits 0. ``--device cpu`` runs every part on a tiny model on
the CPU (no CUDA graph, no compile): a dry run of the script's logic (the unit tests do that).

Usage:
    python scripts/gpu_check.py --out gpu_check.json
    python scripts/gpu_check.py --device cpu              # dry run, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from qtrain.config import ModelConfig, QATConfig, QuantConfig, RunConfig, TrainConfig
from qtrain.data import BatchSampler, DataConfig, load_corpus
from qtrain.evaluate import GreedyDecoder
from qtrain.model import GPT, KVCache, apply_rope
from qtrain.quant import api
from qtrain.quant import primitives as P
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear
from qtrain.quant.primitives import LayerSpec
from qtrain.quant_modes import qat_param_groups, schedule_callback
from qtrain.train import Hooks, Trainer

console = Console(width=150)

KERNEL_SPECS: dict[str, LayerSpec] = {
    "int8": LayerSpec("int8", 8),
    "int8 act8": LayerSpec("int8", 8, -1, True, "int8"),
    "int4 g32": LayerSpec("int4", 4, 32),
    "int4 g32 asym": LayerSpec("int4", 4, 32, False),
    "int4 g128": LayerSpec("int4", 4, 128),
    "int4 g128 asym": LayerSpec("int4", 4, 128, False),
    "int8da_int4w g32": LayerSpec("int8da_int4w", 4, 32, True, "int8"),
}
MODEL_1B = ModelConfig(name="1b", n_layer=20, n_embd=2048, n_head=16, block_size=1024, mlp_hidden=5632)
MODEL_SMALL = ModelConfig(name="small", n_layer=6, n_embd=384, n_head=6, block_size=256, mlp_hidden=1024)
MODEL_DRY = ModelConfig(name="dry", n_layer=1, n_embd=64, n_head=2, block_size=48, mlp_hidden=128)
DECODE_SCHEMES: dict[str, QuantConfig | None] = {
    "bf16": None,
    "int8": QuantConfig(scheme="int8"),
    "int4 g32": QuantConfig(scheme="int4", group_size=32),
    "int8da_int4w g32": QuantConfig(scheme="int8da_int4w", group_size=32),
}


def layer_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(N, K) of a block's four projections, plus an odd small one (N % 16 != 0)."""
    c, h = cfg.n_embd, cfg.mlp_hidden
    return [(3 * c, c), (c, c), (2 * h, c), (c, h), (40, 128)]


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- 1. kernels


def kernel_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Allowed |fast - reference|: 2^-6 * (|x| @ |W|^T) + 1e-5 (bf16 activations and output)."""
    return 2**-6 * (x.abs().float() @ w.abs().t().float()) + 1e-5


def check_kernels(
    device: torch.device, shapes: list[tuple[int, int]], rows: list[int], specs: dict[str, LayerSpec] | None = None
) -> list[dict[str, Any]]:
    """Every packed kernel vs its reference on random inputs; one result per (spec, shape, rows).

    Args:
        device: where to run.
        shapes: (N, K) weight shapes; a spec whose group does not divide K is skipped.
        rows: activation rows (tokens) to try.
        specs: name -> spec (default :data:`KERNEL_SPECS`).

    Returns:
        Dicts with ``kernel, N, K, rows, fast, max_err, worst_fraction_of_bound, ok``.
    """
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, spec in (specs or KERNEL_SPECS).items():
        cls = Int8Linear if spec.bits == 8 else Int4Linear
        for n, k in shapes:
            if spec.group_size > 0 and k % spec.group_size:
                continue
            w = (torch.randn(n, k, generator=gen) * 0.05).to(device)  # quantized on the device
            mod = cls.from_float(w, spec, name=name)
            w_hat = mod.dequantize()
            for m in rows:
                x = (torch.randn(m, k, generator=gen) + 0.5).to(device)
                with torch.inference_mode():
                    fast, ref = mod(x), mod.reference_forward(x)
                x_in = P.fake_quantize_per_token(x) if spec.activations == "int8" else x
                err = (fast.float() - ref.float()).abs()
                frac = float((err / kernel_bound(x_in, w_hat)).max())
                finite = bool(torch.isfinite(fast).all())
                out.append(
                    {
                        "kernel": name, "N": n, "K": k, "rows": m, "fast": mod._fast_fn is not None,
                        "max_err": float(err.max()), "worst_fraction_of_bound": frac,
                        "ok": finite and frac <= 1.0 and tuple(fast.shape) == (m, n),
                    }
                )
    return out


def time_fn(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median seconds per call (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_layers(device: torch.device, shapes: list[tuple[int, int]], reps: int) -> list[dict[str, Any]]:
    """Batch-1 time of bf16 ``F.linear`` and qtrain's int8 / int4 g32 linears per shape."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for n, k in shapes:
        w = (torch.randn(n, k, generator=gen) * 0.05).to(device)
        x = torch.randn(1, k, generator=gen).to(device, torch.bfloat16)
        wb = w.to(torch.bfloat16)
        q8 = Int8Linear.from_float(w, KERNEL_SPECS["int8"])
        q4 = Int4Linear.from_float(w, KERNEL_SPECS["int4 g32"])
        with torch.inference_mode():
            t = {
                "bf16": time_fn(lambda: F.linear(x, wb), device, reps),  # noqa: B023 - called right here
                "int8": time_fn(lambda: q8(x), device, reps),  # noqa: B023
                "int4 g32": time_fn(lambda: q4(x), device, reps),  # noqa: B023
            }
        out.append({"N": n, "K": k, **{f"{key}_us": v * 1e6 for key, v in t.items()}})
    return out


# ---------------------------------------------------------------- 2./3. decode and prefill


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> GPT:
    """A GPT with N(0, 0.02) weights made on ``device`` (no CPU copy of a 1B model)."""
    torch.manual_seed(seed)
    with torch.device(device):  # default init runs on the device; replaced below
        model = GPT(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                p.fill_(1.0)
            else:
                resid = name.endswith(("out.weight", "down.weight"))
                p.normal_(0.0, 0.02 / (2 * cfg.n_layer) ** 0.5 if resid else 0.02)
    return model.eval()


def decode_models(base: GPT, schemes: list[str]) -> dict[str, GPT]:
    """The bf16 base model and its packed conversions."""
    models = {}
    for name in schemes:
        qcfg = DECODE_SCHEMES[name]
        models[name] = base if qcfg is None else api.convert(copy.deepcopy(base), qcfg).eval()  # type: ignore[misc]
    return models


def weight_bytes(model: GPT) -> int:
    """Bytes of (stored) weights one decode step reads: linears, norms, one embedding row."""
    total = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
        elif isinstance(m, (nn.Linear, nn.RMSNorm)):
            total += m.weight.numel() * m.weight.element_size()
    emb = model.tok_emb
    if isinstance(emb, nn.Embedding):
        total += emb.weight.shape[1] * emb.weight.element_size()
    return total


def static_decode_step(
    model: GPT, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, positions: torch.Tensor
) -> torch.Tensor:
    """One decode step with static shapes, so a CUDA graph can capture it.

    Same math as ``model(tok, cache, pos)`` (the model's own cached path), but the position
    is a 1-element tensor, the new key/value are written with ``index_copy_``, and attention
    runs over the whole cache with a mask ``positions <= pos``.

    Args:
        model: the GPT (any scheme).
        tok: ``(1, 1)`` token ids.
        pos: ``(1,)`` int64 position of ``tok``.
        cache: the KV cache (filled up to ``pos - 1``).
        positions: ``arange(block_size)`` on the device.

    Returns:
        Logits ``(1, vocab)``.
    """
    x = model.tok_emb(tok)  # (1, 1, C)
    rot = model.get_buffer("rope").index_select(0, pos)  # (1, D/2)
    mask = (positions <= pos).view(1, 1, 1, -1)  # (1, 1, 1, T_max)
    for i, block in enumerate(model.blocks):
        attn = block.attn  # type: ignore[union-attr]
        qkv = attn.qkv(block.attn_norm(x)).view(1, 1, 3, attn.n_head, attn.head_dim)  # type: ignore[union-attr]
        q, k = apply_rope(qkv[:, :, :2], rot).permute(2, 0, 3, 1, 4)  # (1, H, 1, D) each
        v = qkv[:, :, 2].transpose(1, 2)
        cache.k[i].index_copy_(2, pos, k)
        cache.v[i].index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, cache.k[i], cache.v[i], attn_mask=mask)
        x = x + attn.out(y.transpose(1, 2).reshape(1, 1, -1))  # type: ignore[union-attr]
        x = x + block.mlp(block.mlp_norm(x))  # type: ignore[union-attr]
    return model.lm_head(model.norm(x))[:, -1]


class StaticDecoder:
    """Greedy decoding through :func:`static_decode_step`, optionally replayed as a CUDA graph."""

    def __init__(self, model: GPT, prompt: torch.Tensor, use_graph: bool) -> None:
        dev = next(model.parameters()).device
        self.model, self.device, self.prompt = model, dev, prompt.to(dev)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.cache = KVCache.empty(model.cfg, 1, dev, dtype)
        self.positions = torch.arange(model.cfg.block_size, device=dev)
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph: Any = None
        self.reset()
        if use_graph:
            self._capture()

    def reset(self) -> None:
        """Prefill the prompt (the model's own path) and point at the next position."""
        logits = self.model(self.prompt, self.cache, 0)[:, -1]
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(self.prompt.shape[1])

    def _eager_step(self) -> None:
        logits = static_decode_step(self.model, self.tok, self.pos, self.cache, self.positions)
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)

    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # builds the kernels' caches outside the capture
                self._eager_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._eager_step()
        self.reset()

    def step(self) -> torch.Tensor:
        """Advance one token; returns the (device) token tensor holding it."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._eager_step()
        return self.tok


def static_logit_error(model: GPT, prompt: torch.Tensor, steps: int) -> float:
    """Max |static - cached| logit difference over ``steps`` teacher-forced steps, relative to max |logit|.

    Both paths are fed the same tokens (the cached path's greedy choices), each with its own cache.
    """
    dev = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    prompt = prompt.to(dev)
    c1, c2 = KVCache.empty(model.cfg, 1, dev, dtype), KVCache.empty(model.cfg, 1, dev, dtype)
    ref = model(prompt, c1, 0)[:, -1]
    model(prompt, c2, 0)
    positions = torch.arange(model.cfg.block_size, device=dev)
    worst = 0.0
    for i in range(steps):
        tok = ref.argmax(-1, keepdim=True)
        pos = prompt.shape[1] + i
        ref = model(tok, c1, pos)[:, -1].float()
        got = static_decode_step(model, tok, torch.tensor([pos], device=dev), c2, positions).float()
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    return worst


def tokens_per_s(step: Callable[[], Any], reset: Callable[[], None], n: int, repeats: int, dev: torch.device) -> float:
    """Median tokens/s of ``repeats`` runs of ``n`` steps after one warm-up run."""
    rates = []
    for r in range(repeats + 1):
        reset()
        sync(dev)
        t = time.perf_counter()
        for _ in range(n):
            step()
        sync(dev)
        if r:
            rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def device_copy_bandwidth(device: torch.device, mbytes: int = 1024) -> float:
    """GB/s of a large copy on ``device`` (read + write bytes over the median time)."""
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device, reps=5, warmup=2)
    return 2 * x.numel() * 4 / t / 1e9


def bench_decode(
    cfg: ModelConfig, device: torch.device, schemes: list[str], n_tokens: int, prefill: int, use_graph: bool
) -> dict[str, Any]:
    """Eager and graph decode, prefill and bandwidth bound per scheme."""
    base = random_model(cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    models = decode_models(base, schemes)
    bw = device_copy_bandwidth(device, 1024 if device.type == "cuda" else 16)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, cfg.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    with torch.inference_mode():
        for name, model in models.items():
            eager = GreedyDecoder(model, prompt)
            label = name if name != "bf16" or base.tok_emb.weight.dtype == torch.bfloat16 else "fp32"
            row: dict[str, Any] = {"scheme": label, "weight_bytes": weight_bytes(model)}
            row["eager_tokens_per_s"] = tokens_per_s(eager.step, eager.reset, n_tokens, 2, device)
            static = StaticDecoder(model, prompt, use_graph)
            row["static_tokens_per_s"] = tokens_per_s(static.step, static.reset, n_tokens, 2, device)
            row["static_uses_graph"] = static.graph is not None
            row["static_logit_error"] = static_logit_error(model, prompt, 8)
            row["bound_tokens_per_s"] = bw * 1e9 / row["weight_bytes"]
            row["prefill_tokens_per_s"] = prefill / time_fn(lambda: model(x), device, reps=5)  # noqa: B023
            rows.append(row)
            del eager, static
    return {"copy_bandwidth_gbs": bw, "decode_tokens": n_tokens, "prefill_tokens": prefill, "rows": rows}


# ---------------------------------------------------------------- 4. QAT step


def qat_trainer(
    cfg: ModelConfig, qcfg: QuantConfig | None, batch: int, device: torch.device, compiled: bool
) -> Trainer:
    """A Trainer as `mode=train` / `mode=qat` build it (bf16 autocast on CUDA)."""
    corpus = load_corpus(DataConfig(), cfg.block_size)
    model = GPT(cfg)
    model.init_weights(0)
    tcfg = TrainConfig(max_steps=10**6, batch_size=batch, warmup_steps=5, eval_every=0, save_every=0)
    hooks, groups = Hooks(), None
    if qcfg is not None:
        api.prepare(model, qcfg)
        run_cfg = RunConfig(model=cfg, quant=qcfg, train=tcfg, qat=QATConfig())
        hooks.before_step.append(schedule_callback(run_cfg))  # type: ignore[arg-type]
        groups = qat_param_groups(model, run_cfg)
    model.to(device).train()
    sampler = BatchSampler(corpus.train, cfg.block_size, batch, 0)
    return Trainer(model, tcfg, sampler, device, hooks=hooks, param_groups=groups, compile_model=compiled)


class ArmTimeout(Exception):
    """An arm ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`ArmTimeout` in the main thread after ``seconds`` (POSIX; no-op elsewhere)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(*_: Any) -> None:
        raise ArmTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def bench_qat(
    cfg: ModelConfig,
    device: torch.device,
    batch: int,
    steps: int,
    compile_modes: list[bool],
    arm_limit_s: float = 0,
    deadline: float | None = None,
) -> list[dict]:
    """Median step time of fp and int4 g32 QAT, eager and compiled; ratio to fp in the same mode.

    Each arm (compilation included) gets ``arm_limit_s`` seconds (0: no limit), and no more
    than its share of the time left before ``deadline`` (a ``time.perf_counter()`` value); one
    that runs over, or fails, is reported with its error instead of stopping the check.
    """
    rows = []
    arms = [(c, n, q) for c in compile_modes for n, q in (("fp", None), ("int4 g32", QuantConfig("int4", 32)))]
    times: dict[tuple[bool, str], float] = {}
    for i, (compiled, name, qcfg) in enumerate(arms):
        row: dict[str, Any] = {"arm": name, "compile": compiled}
        limit = arm_limit_s
        if deadline is not None:
            share = (deadline - time.perf_counter()) / (len(arms) - i)
            limit = min(limit, share) if limit > 0 else share
            if limit < 5:
                row["error"] = "skipped: over the time budget"
                rows.append(row)
                continue
        try:
            with time_limit(limit):
                trainer = qat_trainer(cfg, qcfg, batch, device, compiled)
                t0 = time.perf_counter()
                for _ in range(3):  # warm-up (and compilation)
                    trainer.train_step()
                row["warmup_s"] = time.perf_counter() - t0
                times[compiled, name] = time_fn(trainer.train_step, device, reps=steps, warmup=0)
            row["step_ms"] = times[compiled, name] * 1e3
            fp = times.get((compiled, "fp"))
            row["ratio_vs_fp"] = times[compiled, name] / fp if fp else None
        except Exception as err:  # noqa: BLE001 - report it in the table, keep checking
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------- main


def show(result: dict[str, Any]) -> None:
    """Print the report: kernel summary, layer timings, decode/prefill, QAT."""
    failed = [r for r in result["kernels"] if not r["ok"]]
    t = Table(title=f"gpu_check on {result['device_name']} (torch {result['torch']})")
    for col in ("section", "item", "result"):
        t.add_column(col)
    by_kernel: dict[str, list[dict[str, Any]]] = {}
    for r in result["kernels"]:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for name, rs in by_kernel.items():
        bad = [r for r in rs if not r["ok"]]
        worst = max(r["worst_fraction_of_bound"] for r in rs)
        text = f"{len(rs) - len(bad)}/{len(rs)} ok, worst error {worst:.2f} of bound"
        t.add_row("kernel vs reference", name, text if not bad else f"[red]{text}[/red]")
    for r in result.get("layers", []):
        t.add_row("layer time, 1 row", f"N={r['N']} K={r['K']}",
                  "  ".join(f"{k[:-3]} {v:.1f} us" for k, v in r.items() if k.endswith("_us")))
    if result.get("decode_error"):
        t.add_row("decode / prefill", "failed", f"[red]{result['decode_error']}[/red]")
    dec = result.get("decode")
    if dec:
        for r in dec["rows"]:
            t.add_row(
                "decode / prefill",
                r["scheme"],
                f"eager {r['eager_tokens_per_s']:.0f} tok/s, {'graph' if r['static_uses_graph'] else 'static'} "
                f"{r['static_tokens_per_s']:.0f} tok/s (logit error {r['static_logit_error']:.1e}), "
                f"bound {r['bound_tokens_per_s']:.0f} tok/s ({dec['copy_bandwidth_gbs']:.0f} GB/s), "
                f"prefill {dec['prefill_tokens']} tok: {r['prefill_tokens_per_s']:,.0f} tok/s",
            )
    for r in result.get("qat", []):
        text = r.get("error") or (
            f"{r['step_ms']:.1f} ms/step" + (f", {r['ratio_vs_fp']:.2f}x fp" if r.get("ratio_vs_fp") else "")
            + f" (warm-up {r['warmup_s']:.1f} s)"
        )
        t.add_row("QAT step", f"{r['arm']} {'compiled' if r['compile'] else 'eager'}", text)
    for note in result.get("skipped", []):
        t.add_row("skipped", note, "over the time budget")
    t.add_row("total", "", f"{result['elapsed_s']:.0f} s, {len(failed)} kernel check(s) failed")
    console.print(t)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section within the time budget; returns the JSON-able result."""
    device = torch.device(args.device)
    dry = device.type == "cpu"
    t0 = time.perf_counter()
    cfg = MODEL_DRY if dry else MODEL_1B
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if not dry else "cpu (dry run)",
        "skipped": [],
    }
    result["kernels"] = check_kernels(device, layer_shapes(cfg), [1, 16, 17, 64, 65, 512] if not dry else [1, 65])
    if not dry:
        result["layers"] = time_layers(device, layer_shapes(cfg)[:4], reps=50)

    def within_budget(section: str) -> bool:
        if time.perf_counter() - t0 < args.budget_s:
            return True
        result["skipped"].append(section)
        return False

    if within_budget("decode/prefill"):
        schemes = list(DECODE_SCHEMES) if args.all_schemes else ["bf16", "int8", "int4 g32"]
        try:
            result["decode"] = bench_decode(cfg, device, schemes, args.tokens if not dry else 4,
                                            512 if not dry else 32, use_graph=not dry)
        except Exception as err:  # noqa: BLE001 - report it, go on to the QAT section
            result["decode_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if not dry:
            torch.cuda.empty_cache()
    if within_budget("QAT step"):
        qcfg = MODEL_SMALL if not dry else MODEL_DRY
        result["qat"] = bench_qat(qcfg, device, args.qat_batch if not dry else 2, args.qat_steps if not dry else 1,
                                  [False, True] if not dry else [False], arm_limit_s=args.arm_limit_s,
                                  deadline=t0 + args.total_s)
    result["elapsed_s"] = time.perf_counter() - t0
    result["kernel_failures"] = sum(not r["ok"] for r in result["kernels"])
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 when a kernel check failed)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run on a tiny model)")
    ap.add_argument("--tokens", type=int, default=256, help="decode tokens per repeat")
    ap.add_argument("--all-schemes", action="store_true", help="also decode int8da_int4w")
    ap.add_argument("--qat-batch", type=int, default=16)
    ap.add_argument("--qat-steps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=150.0, help="skip later sections once this much has passed")
    ap.add_argument("--total-s", type=float, default=270.0, help="QAT arms share what is left of this")
    ap.add_argument("--arm-limit-s", type=float, default=90.0,
                    help="time limit of one QAT arm, torch.compile included (0: none)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check. "
                      "Run it on a machine with a GPU, or use --device cpu for a dry run of its logic.")
        return 0
    result = run(args)
    show(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"wrote {args.out}")
    return 1 if result["kernel_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
