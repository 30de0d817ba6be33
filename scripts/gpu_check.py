"""GPU check: packed kernels against the reference, decode/prefill at model=1b shapes, QAT step time.

Not a test; one script for one GPU, one run of under 5 minutes (``--budget-s``) that measures,
side by side, what issue 18 asks (each part skipped with a note once the budget is spent; run
in the order kernels, prefill, decode, qat; results written to ``--out`` after every part, so a
killed run keeps them):

1. ``kernels``: every packed kernel (int8, int8 + int8 activations, int4 g32/g128 sym/asym,
   int8da_int4w) at the ``model=1b`` layer shapes (and an odd one) and 1..512 rows, against
   the reference (dequantize, fp32 ``F.linear``) with the bound of ``tests/unit/quant/test_packed.py``;
   qtrain's Triton kernels (:mod:`qtrain.quant.cuda`: decode GEMV, dequantize-in-GEMM, dequantize)
   likewise, one shape with a bias; then, per layer shape (``model=1b`` and two Llama-3-8B ones),
   every kernel candidate side by side (:mod:`qtrain.quant.cuda.bench`): device time from CUDA-graph
   replays at 1 row (bf16, int8 compiled GEMV / Triton GEMV, int4 tinygemm / Triton GEMV, with GB/s)
   and 512 rows (bf16, Triton dequantize-in-GEMM, Triton dequantize + cuBLAS), and the packed
   layers' eager wall time with the candidate the kernel table measured and chose.
2. ``decode``: batch-1 greedy tokens/s at 1b shapes (20 x 2048, 16 heads, mlp 5632, random
   weights) for bf16, int8, int4 g32, int8da_int4w g32 (and int4 g32 through an Inductor GEMV
   instead of tinygemm; each packed scheme preceded by ``<scheme> triton``: FastDecoder with
   qtrain's Triton GEMV): eager (``GPT.decode_step``, the loop of ``GreedyDecoder``) and
   :class:`qtrain.fastdecode.FastDecoder` (compiled blocks, whole step
   as one CUDA graph), its compile + capture time, its logit error against eager, the
   bandwidth bound (device copy bandwidth / weight bytes per token) and % of it.
3. ``prefill``: 512 and 2048 tokens per scheme through exactly what the packed layers run
   (the kernel table: its measured row picks Triton dequantize-in-GEMM or Triton dequantize +
   cuBLAS; ``torch._int_mm`` for int8 activations), and which table rows (and candidates) ran.
4. ``qat``: training step (bf16 autocast, fused AdamW) for fp / int4 g32 / int8da_int4w g32,
   eager and compiled (``--qat-compile``; default regional: each repeated block compiled once,
   ``fullgraph=True``, the fake-quant inside the graph), at ``model=small`` (batch 16 x 256) and at a Llama-3-8B-like
   stack (width 4096, MLP 14336, GQA 32/8 heads; plain linears, since qtrain's GPT has no
   GQA; 2 layers, batch 8 x 512); warm-up (compile) time and ratio to fp. The arms of one
   compile mode are built first and timed interleaved (round-robin), each with a one-step
   kernel profile (count, time); decode rows carry the profile of one graph replay.

Without CUDA it prints why and exits 0. ``--device cpu`` runs every part on a tiny model on
the CPU (no CUDA graph, no compile): a dry run of the script's logic (the unit tests do that).
Runs where ``hydra``/``omegaconf`` are not installed (stand-ins for the config imports).

Usage (everything in one run of under 5 minutes, as run on the H200):
    python scripts/gpu_check.py --decode-schemes "bf16,int8,int4 g32" --qat-compile regional,model-cudagraphs
        --budget-s 250 --arm-limit-s 40 --out gpu_check.json      # (one command line)
or in two runs:
    python scripts/gpu_check.py --sections kernels,decode,prefill --out gpu_check_1.json
    python scripts/gpu_check.py --sections qat-small,qat-8b --qat-compile-small regional,model-cudagraphs
        --out gpu_check_2.json                            # (one command line)
    python scripts/gpu_check.py --device cpu              # dry run, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _stand_in_config_deps() -> None:
    """qtrain.config registers its schemas with Hydra on import; where hydra/omegaconf are
    missing (a bare GPU box), install no-op stand-ins so the model and kernels import."""
    try:
        import hydra.core.config_store  # noqa: F401
        import omegaconf  # noqa: F401

        return
    except ImportError:
        pass

    class _Store:
        @classmethod
        def instance(cls) -> _Store:
            return cls()

        def store(self, *args: Any, **kwargs: Any) -> None:
            """No-op."""

    class _OmegaConf:
        @staticmethod
        def register_new_resolver(*args: Any, **kwargs: Any) -> None:
            """No-op."""

    mods = {name: types.ModuleType(name) for name in ("hydra", "hydra.core", "hydra.core.config_store", "omegaconf")}
    mods["hydra.core.config_store"].ConfigStore = _Store  # type: ignore[attr-defined]
    mods["omegaconf"].OmegaConf = _OmegaConf  # type: ignore[attr-defined]
    for name, mod in mods.items():
        if sys.modules.get(name) is None:
            sys.modules[name] = mod


_stand_in_config_deps()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

from qtrain.config import ModelConfig  # noqa: E402
from qtrain.fastdecode import FastDecoder, rotate_pairs  # noqa: E402
from qtrain.model import GPT, KVCache  # noqa: E402
from qtrain.quant import LayerSpec  # noqa: E402
from qtrain.quant import primitives as P  # noqa: E402
from qtrain.quant.cuda import gemv as GV  # noqa: E402
from qtrain.quant.cuda import kernels as K  # noqa: E402
from qtrain.quant.fake import FakeQuantLinear  # noqa: E402
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear  # noqa: E402

console = Console(width=160)

KERNEL_SPECS: dict[str, LayerSpec] = {
    "int8": LayerSpec("int8", 8),
    "int8 act8": LayerSpec("int8", 8, -1, True, "int8"),
    "int4 g32": LayerSpec("int4", 4, 32),
    "int4 g32 asym": LayerSpec("int4", 4, 32, False),
    "int4 g128": LayerSpec("int4", 4, 128),
    "int4 g128 asym": LayerSpec("int4", 4, 128, False),
    "int8da_int4w g32": LayerSpec("int8da_int4w", 4, 32, True, "int8"),
}
MODEL_1B = ModelConfig(name="1b", n_layer=20, n_embd=2048, n_head=16, block_size=2048, mlp_hidden=5632)
MODEL_SMALL = ModelConfig(name="small", n_layer=6, n_embd=384, n_head=6, block_size=256, mlp_hidden=1024)
MODEL_DRY = ModelConfig(name="dry", n_layer=1, n_embd=64, n_head=2, block_size=48, mlp_hidden=128)


def decode_kernel(scheme: str) -> str:
    """FastDecoder's kernel for a decode scheme name (``... triton``, ``... inductor``, else tinygemm)."""
    return next((k for k in ("triton", "inductor") if scheme.endswith(k)), "tinygemm")


DECODE_SCHEMES: dict[str, LayerSpec | None] = {
    "bf16": None,
    "int8": KERNEL_SPECS["int8"],
    "int4 g32": KERNEL_SPECS["int4 g32"],
    "int8da_int4w g32": KERNEL_SPECS["int8da_int4w g32"],
    "int4 g32 inductor": KERNEL_SPECS["int4 g32"],  # int4 decoded by an Inductor GEMV instead of tinygemm
    "int8 triton": KERNEL_SPECS["int8"],  # qtrain's Triton GEMV in FastDecoder (added after "int8" where Triton runs)
    "int4 g32 triton": KERNEL_SPECS["int4 g32"],
    "int8da_int4w g32 triton": KERNEL_SPECS["int8da_int4w g32"],
}
PREFILL_SCHEMES: dict[str, LayerSpec | None] = {
    **{k: v for k, v in DECODE_SCHEMES.items() if decode_kernel(k) == "tinygemm"},
    "int8 act8": KERNEL_SPECS["int8 act8"],
}
QAT_SCHEMES: dict[str, LayerSpec | None] = {
    "fp": None,
    "int4 g32": KERNEL_SPECS["int4 g32"],
    "int8da_int4w g32": KERNEL_SPECS["int8da_int4w g32"],
}
SECTIONS = ("kernels", "decode", "prefill", "qat-small", "qat-8b")


@dataclass(frozen=True)
class StackConfig:
    """A Llama-3-8B-like layer stack (GQA attention, SwiGLU), random weights."""

    name: str = "llama3-8b stack"
    n_layer: int = 2
    n_embd: int = 4096
    n_head: int = 32
    n_kv_head: int = 8
    mlp_hidden: int = 14336
    block_size: int = 512


STACK_8B = StackConfig()
STACK_DRY = StackConfig(name="dry stack", n_layer=1, n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=96, block_size=16)


def layer_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(N, K) of a block's four projections, plus an odd small one (N % 16 != 0)."""
    c, h = cfg.n_embd, cfg.mlp_hidden
    return [(3 * c, c), (c, c), (2 * h, c), (c, h), (40, 128)]


def stack_shapes(cfg: StackConfig) -> list[tuple[int, int]]:
    """(N, K) of the stack's projections (qkv with GQA: C + 2 * kv_heads * head_dim)."""
    c, d = cfg.n_embd, cfg.n_embd // cfg.n_head
    return [(c + 2 * cfg.n_kv_head * d, c), (c, c), (2 * cfg.mlp_hidden, c), (c, cfg.mlp_hidden)]


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_error(err: BaseException, width: int = 160) -> str:
    """``Type: first line`` of an exception."""
    text = str(err).splitlines()[0][:width] if str(err) else ""
    return f"{type(err).__name__}: {text}"


class Results:
    """The JSON result, rewritten (atomically) after every part when ``path`` is set."""

    def __init__(self, path: str | None, data: dict[str, Any]) -> None:
        self.path = Path(path) if path else None
        self.data = data

    def save(self) -> None:
        """Write the current state."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


class Budget:
    """Wall-clock budget of the run: parts check what is left before they start."""

    def __init__(self, total_s: float, notes: list[str]) -> None:
        self.t0, self.total_s, self.notes = time.perf_counter(), total_s, notes

    def left(self) -> float:
        """Seconds left."""
        return self.total_s - (time.perf_counter() - self.t0)

    def allow(self, part: str, need_s: float) -> bool:
        """Whether ``part`` (expected to take ``need_s``) still fits; notes it when not."""
        if self.left() >= need_s:
            return True
        self.notes.append(f"{part}: skipped, {max(self.left(), 0):.0f} s left of the budget, needs ~{need_s:.0f} s")
        return False


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


def profile_kernels(fn: Callable[[], Any], device: torch.device, top: int = 10) -> dict[str, Any]:
    """Kernels one call of ``fn`` launches: how many, their total time, the ``top`` by time.

    On CUDA the device kernels (those inside a CUDA graph replay included, where the profiler
    sees them); on the CPU the aten ops (the dry run). A cheap diagnosis of where a step's time
    goes: many short kernels mean launch-bound, a few long ones bandwidth- or compute-bound.

    Returns:
        ``{"kernels": n, "kernel_us": total, "top": [[name, count, us], ...]}`` or ``{"error": ...}``.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    try:
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            fn()
            sync(device)
        want = DeviceType.CUDA if cuda else DeviceType.CPU
        evs = [e for e in prof.events() if e.device_type == want and (not cuda or not e.name.startswith("Memcpy"))]
        if not cuda:
            evs = [e for e in evs if e.name.startswith("aten::") and not e.cpu_parent]  # top-level ops only
        per: dict[str, list[float]] = {}
        for e in evs:
            us = float(e.time_range.elapsed_us())
            per.setdefault(e.name[:90], []).append(us)
        ranked = sorted(per.items(), key=lambda kv: -sum(kv[1]))[:top]
        return {
            "kernels": len(evs),
            "kernel_us": sum(sum(v) for v in per.values()),
            "top": [[name, len(v), round(sum(v), 1)] for name, v in ranked],
        }
    except Exception as err:  # noqa: BLE001 - a diagnosis only: never fail the check for it
        return {"error": short_error(err)}


# ---------------------------------------------------------------- 1. kernels


def kernel_bound(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Allowed |fast - reference|: 2^-6 * (|x| @ |W|^T + |bias|) + 1e-5 (bf16 activations and output)."""
    b = 0.0 if bias is None else bias.abs().float()
    return 2**-6 * (x.abs().float() @ w.abs().t().float() + b) + 1e-5


def _check_row(name: str, mod: PackedLinear, x: torch.Tensor, fast: torch.Tensor, fast_used: bool) -> dict[str, Any]:
    ref = mod.reference_forward(x)
    x_in = P.fake_quantize_per_token(x) if mod.spec.activations == "int8" else x
    err = (fast.float() - ref.float()).abs()
    frac = float((err / kernel_bound(x_in, mod.dequantize(), mod.bias)).max())
    ok = bool(torch.isfinite(fast).all()) and frac <= 1.0 and tuple(fast.shape) == tuple(ref.shape)
    n, k = mod.out_features, mod.in_features
    return {
        "kernel": name,
        "N": n,
        "K": k,
        "rows": x.shape[0],
        "fast": fast_used,
        "max_err": float(err.max()),
        "worst_fraction_of_bound": frac,
        "ok": ok,
    }


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
            mod = cls.from_float((torch.randn(n, k, generator=gen) * 0.05).to(device), spec, name=name)
            for m in rows:
                x = (torch.randn(m, k, generator=gen) + 0.5).to(device)
                with torch.inference_mode():
                    out.append(_check_row(name, mod, x, mod(x), mod._fast_fn is not None))
    return out


def check_triton_kernels(device: torch.device, shapes: list[tuple[int, int]], rows: list[int]) -> list[dict[str, Any]]:
    """:func:`qtrain.quant.cuda.int4_gemm` / ``int8_gemm`` vs the reference (bf16 activations), and
    ``dequant_int4`` / ``dequant_int8`` bit for bit against the reference dequantization.

    Returns:
        Rows like :func:`check_kernels` (``kernel`` prefixed ``triton``); empty when the
        kernels cannot run here.
    """
    if not K.available(device):
        return []
    with _env("QTRAIN_TRITON_AUTOTUNE", "0"):  # correctness only: one tile config, no tuning runs
        return _check_triton(device, shapes, rows)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _check_triton(device: torch.device, shapes: list[tuple[int, int]], rows: list[int]) -> list[dict[str, Any]]:
    """Each Triton kernel variant (int8; int4 symmetric g32; asymmetric g128) at ``rows``; the odd
    shape (N % 16 != 0) also at the smallest row count (partial tiles). Few variants: each
    compiles its own kernels."""
    gen = torch.Generator().manual_seed(2)
    out = []
    for name in ("int8", "int4 g32", "int4 g128 asym"):
        spec = KERNEL_SPECS[name]
        cls = Int8Linear if spec.bits == 8 else Int4Linear
        for n, k in shapes:
            if spec.group_size > 0 and k % spec.group_size:
                continue
            mod = cls.from_float((torch.randn(n, k, generator=gen) * 0.05).to(device), spec, name=name)
            if (n, k) == shapes[0]:  # one shape with a bias (Qwen2's qkv): added inside the kernels
                mod.set_bias(torch.randn(n, generator=gen).to(device))
            for m in [*GEMV_ROWS, *rows] if n % 16 else [*GEMV_ROWS[:1], *rows[-1:]]:
                x = (torch.randn(m, k, generator=gen) + 0.5).to(device, torch.bfloat16)
                kind = "gemv" if m <= GV.GEMV_MAX_ROWS else "gemm"
                try:
                    with torch.inference_mode():
                        out.append(_check_row(f"triton {kind} {name}", mod, x, _triton_call(mod, x, kind), True))
                except Exception as err:  # noqa: BLE001 - e.g. a kernel that does not compile: a failed check
                    out.append(_failed_row(f"triton {kind} {name}", n, k, m, err))
            mod.set_bias(None)
            try:
                out.append(_check_dequant(name, mod))
            except Exception as err:  # noqa: BLE001 - a failed check, not a failed run
                out.append(_failed_row(f"triton dequant {name}", n, k, 0, err))
    return out


def _failed_row(kernel: str, n: int, k: int, rows: int, err: BaseException) -> dict[str, Any]:
    """A kernel check that raised: not ok, with the error."""
    return {
        "kernel": kernel,
        "N": n,
        "K": k,
        "rows": rows,
        "fast": False,
        "max_err": None,
        "worst_fraction_of_bound": float("inf"),
        "ok": False,
        "error": short_error(err),
    }


GEMV_ROWS = [1, 5]
"""Rows the Triton GEMV checks use (decode; a partial 8-row tile). Each row bucket compiles its own kernel."""


def _triton_call(mod: PackedLinear, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The Triton GEMV or GEMM of ``mod`` on ``x`` (bias included)."""
    if isinstance(mod, Int8Linear):
        fn8 = GV.int8_gemv if kind == "gemv" else K.int8_gemm
        return fn8(x, mod.weight_int8, mod.scales, mod.bias)
    assert isinstance(mod, Int4Linear)
    fn4 = GV.int4_gemv if kind == "gemv" else K.int4_gemm
    return fn4(x, mod.weight_packed, mod.scales, mod.zeros, mod.spec.group_size, mod.bias)


def _check_dequant(name: str, mod: PackedLinear) -> dict[str, Any]:
    """The Triton dequantize kernel against ``mod.dequantize()`` rounded to bf16: bit-exact or not ok."""
    with torch.inference_mode():
        want = mod.dequantize().to(torch.bfloat16)
        if isinstance(mod, Int8Linear):
            got = K.dequant_int8(mod.weight_int8, mod.scales)
        else:
            assert isinstance(mod, Int4Linear)
            got = K.dequant_int4(mod.weight_packed, mod.scales, mod.zeros, mod.spec.group_size)
    diff = float((got.float() - want.float()).abs().max())
    return {
        "kernel": f"triton dequant {name}",
        "N": mod.out_features,
        "K": mod.in_features,
        "rows": 0,
        "fast": True,
        "max_err": diff,
        "worst_fraction_of_bound": 0.0 if diff == 0 else 1.0 + diff,
        "ok": diff == 0 and got.dtype == torch.bfloat16,
    }


LAYER_TIMES_RESERVE_S = 150.0
"""Seconds of the budget the layer timings leave for prefill and decode (later shapes are skipped)."""


def time_layers(
    device: torch.device, shapes: list[tuple[int, int]], label: str, budget: Budget | None = None
) -> list[dict[str, Any]]:
    """Per layer shape, every kernel candidate side by side (:func:`qtrain.quant.cuda.bench.layer_times`):
    device time from CUDA-graph replays at 1 row (decode: bf16, int8 compiled GEMV / Triton GEMV,
    int4 tinygemm / Triton GEMV, with GB/s) and 512 rows (prefill: bf16, Triton dequantize-in-GEMM,
    Triton dequantize + cuBLAS), and the eager wall time of the packed layers' own (measured) paths."""
    from qtrain.quant.cuda import bench

    gen = torch.Generator().manual_seed(1)
    out = []
    for n, k in shapes:
        if budget is not None and not budget.allow(f"layer times {label} N={n} K={k}", LAYER_TIMES_RESERVE_S):
            continue
        w = (torch.randn(n, k, generator=gen) * 0.05).to(device, torch.bfloat16)
        out.append({"shapes": label, "N": n, "K": k, **bench.layer_times(w, device)})
        del w
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


def _swap_block_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> nn.Module:
    """Replace every bias-free ``nn.Linear`` under ``model.blocks`` with ``make(name, linear)``."""
    blocks = model.get_submodule("blocks")
    targets = [(n, m) for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(blocks.get_submodule(parent_name) if parent_name else blocks, child, make(f"blocks.{name}", lin))
    return model


def pack_blocks(model: GPT, spec: LayerSpec) -> GPT:
    """The block linears packed with ``spec`` (round to nearest; what ``mode=ptq`` rtn stores)."""
    cls = Int8Linear if spec.bits == 8 else Int4Linear
    _swap_block_linears(model, lambda name, lin: cls.from_float(lin.weight.detach(), spec, name=name))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of (stored) weights one decode step reads: linears, norms, one embedding row."""
    total = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
        elif isinstance(m, (nn.Linear, nn.RMSNorm)):
            total += m.weight.numel() * m.weight.element_size()
    emb = getattr(model, "tok_emb", None)
    if isinstance(emb, nn.Embedding):
        total += emb.weight.shape[1] * emb.weight.element_size()
    return total


class EagerDecoder:
    """``GreedyDecoder``'s loop: prefill with the model's cached path, then ``GPT.decode_step``."""

    def __init__(self, model: GPT, prompt: torch.Tensor) -> None:
        self.model, dev = model, next(model.parameters()).device
        self.prompt = prompt.to(dev)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.cache = KVCache.empty(model.cfg, 1, dev, dtype)
        self.reset()

    def reset(self) -> None:
        """Start again from the prompt."""
        self.pos = self.prompt.shape[1]
        self.logits = self.model(self.prompt, self.cache, 0)[:, -1]

    def step(self) -> torch.Tensor:
        """Append the argmax token; returns it."""
        nxt = self.logits.argmax(-1, keepdim=True)
        self.logits = self.model.decode_step(nxt, self.cache, self.pos)
        self.pos += 1
        return nxt


class StaticDecoder(FastDecoder):
    """:class:`~qtrain.fastdecode.FastDecoder` with ``use_graph`` deciding compile and graph."""

    def __init__(
        self, model: GPT, prompt: torch.Tensor, use_graph: bool, max_len: int | None = None, int4: str = "tinygemm"
    ) -> None:
        super().__init__(model, prompt, max_len=max_len, compile=use_graph, graph=use_graph, int4=int4)


def static_logit_error(model: GPT, prompt: torch.Tensor, steps: int, dec: FastDecoder | None = None) -> float:
    """Max |static - eager| logit difference over ``steps`` teacher-forced steps, relative to max |logit|.

    Both are fed the eager path's greedy tokens (the static decoder's ``tok`` buffer is
    overwritten before each step). ``dec``: a built decoder (default: an eager one).
    """
    eager = EagerDecoder(model, prompt)
    dec = dec or FastDecoder(model, prompt, max_len=prompt.shape[1] + steps + 1, compile=False, graph=False)
    dec.reset()
    worst = 0.0
    for _ in range(steps):
        tok = eager.step()
        dec.tok.copy_(tok)
        dec.step()
        ref, got = eager.logits.float(), dec.logits.float()
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


def _static_decode(model: GPT, prompt: torch.Tensor, n_tokens: int, use_graph: bool, int4: str) -> dict[str, Any]:
    """Build (compile, capture) and time :class:`FastDecoder`; a failed graph falls back to no graph."""
    dev, row, max_len = next(model.parameters()).device, {}, 16 + n_tokens + 8
    t0 = time.perf_counter()
    try:
        static = StaticDecoder(model, prompt, use_graph, max_len=max_len, int4=int4)
    except Exception as err:  # noqa: BLE001 - the graph failed: measure the compiled step without it
        if not use_graph:
            raise
        row["graph_error"] = short_error(err)
        static = FastDecoder(model, prompt, max_len=max_len, compile=True, graph=False, int4=int4)
    sync(dev)
    row["compile_capture_s"] = time.perf_counter() - t0
    row["static_uses_graph"] = static.graph is not None
    row["static_tokens_per_s"] = tokens_per_s(static.step, static.reset, n_tokens, 2, dev)
    row["profile"] = profile_kernels(static.step, dev)  # one replay: kernels per decode step, top 10
    if static.graph is not None and not row["profile"].get("kernels"):  # the profiler saw no kernels in the graph
        row["profile"] = {**profile_kernels(static._step, dev), "of": "one compiled step without the graph"}
    row["static_logit_error"] = static_logit_error(model, prompt, 8, static)
    return row


EAGER_TOKENS = 32
"""Tokens per timed run of eager decode (host-bound, ~50-150 tok/s: kept short)."""


def with_triton_rows(schemes: list[str], device: torch.device) -> list[str]:
    """``schemes`` with ``<packed scheme> triton`` for each packed one (on CUDA where Triton runs,
    unless listed), after bf16 and before the packed ones: FastDecoder with qtrain's Triton GEMV
    and the same schemes with tinygemm / Inductor, in one run."""
    if device.type != "cuda" or not K.available(device):  # the interpreter: too slow for a dry run
        return schemes
    extras = [f"{n} triton" for n in schemes if f"{n} triton" in DECODE_SCHEMES and f"{n} triton" not in schemes]
    head = [n for n in schemes if DECODE_SCHEMES.get(n) is None]  # bf16: the reference of every ratio
    return head + extras + [n for n in schemes if n not in head]  # the new path first: a budget cut keeps it


def decode_one(base: GPT, name: str, n_tokens: int, use_graph: bool, bw: float) -> dict[str, Any]:
    """Eager and static/graph decode of one scheme (packed from ``base``); a failure of the
    static part is reported in ``static_error`` next to the eager numbers."""
    import copy

    spec = DECODE_SCHEMES[name]
    model = base if spec is None else pack_blocks(copy.deepcopy(base), spec)
    dev = next(base.parameters()).device
    prompt = torch.randint(0, base.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    row: dict[str, Any] = {"scheme": name, "dtype": str(base.tok_emb.weight.dtype).replace("torch.", "")}
    row["weight_bytes"] = weight_bytes(model)
    row["bound_tokens_per_s"] = bw * 1e9 / row["weight_bytes"]
    kernel = decode_kernel(name)
    row["decode_kernel"] = "bf16" if spec is None else kernel if kernel != "triton" or K.available(dev) else "tinygemm"
    with torch.inference_mode():
        if kernel != "triton":  # eager runs the kernel table whatever FastDecoder's kernel: once per scheme
            eager = EagerDecoder(model, prompt)
            row["eager_tokens_per_s"] = tokens_per_s(eager.step, eager.reset, min(n_tokens, EAGER_TOKENS), 1, dev)
            row["eager_kernels"] = _kernels_used(model)
            del eager
        try:
            row.update(_static_decode(model, prompt, n_tokens, use_graph, kernel))
            row["static_fraction_of_bound"] = row["static_tokens_per_s"] / row["bound_tokens_per_s"]
        except Exception as err:  # noqa: BLE001 - keep the eager numbers
            row["static_error"] = short_error(err)
    return row


def bench_decode(
    cfg: ModelConfig,
    device: torch.device,
    schemes: list[str],
    n_tokens: int,
    use_graph: bool,
    budget: Budget,
    results: Results,
) -> None:
    """Decode rows per scheme into ``results.data["decode"]`` (saved after each)."""
    base = random_model(cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    bw = device_copy_bandwidth(device, 1024 if device.type == "cuda" else 16)
    sec: dict[str, Any] = {"copy_bandwidth_gbs": bw, "decode_tokens": n_tokens, "rows": []}
    results.data["decode"] = sec
    for name in with_triton_rows(schemes, device):
        if not budget.allow(f"decode {name}", 40 if use_graph else 1):
            continue
        try:
            row = decode_one(base, name, n_tokens, use_graph, bw)
        except Exception as err:  # noqa: BLE001 - report it, go on
            row = {"scheme": name, "error": short_error(err)}
        sec["rows"].append(row)
        results.save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = next((r for r in sec["rows"] if r["scheme"] == "bf16" and "error" not in r), None)
    for r in sec["rows"]:
        if ref and "eager_tokens_per_s" in r:
            r["eager_vs_bf16"] = r["eager_tokens_per_s"] / ref["eager_tokens_per_s"]
        if ref and "static_tokens_per_s" in r and "static_tokens_per_s" in ref:
            r["static_vs_bf16"] = r["static_tokens_per_s"] / ref["static_tokens_per_s"]
    results.save()


def _kernels_used(model: nn.Module) -> list[str]:
    """The kernel-table rows the packed layers of ``model`` ran (sorted, unique), with the
    candidate each measured row chose (``prefill:triton_gemm``)."""
    from qtrain.quant.cuda.bench import chosen_kernels

    return chosen_kernels(model)


def bench_prefill(cfg: ModelConfig, device: torch.device, lengths: list[int], budget: Budget, results: Results) -> None:
    """Prefill tokens/s per scheme and length, through exactly what the packed layers run.

    No wrapper: each packed layer picks its kernel from :data:`qtrain.quant.kernels.TABLE` (many
    rows on CUDA: the Triton dequantize kernel + cuBLAS where Triton is installed, ``_int_mm``
    for int8 activations), as ``mode=eval`` and ``mode=generate`` run them.
    """
    import copy

    base = random_model(cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32, seed=1)
    rows: list[dict[str, Any]] = []
    results.data["prefill"] = rows
    gen = torch.Generator().manual_seed(1)
    xs = {n: torch.randint(0, cfg.vocab_size, (1, n), generator=gen).to(device) for n in lengths}
    for name, spec in PREFILL_SCHEMES.items():
        if not budget.allow(f"prefill {name}", 10):
            continue
        try:
            model = base if spec is None else pack_blocks(copy.deepcopy(base), spec)
            row: dict[str, Any] = {"scheme": name}
            with torch.inference_mode():
                for n in lengths:
                    row[f"{n}_tokens_per_s"] = n / time_fn(lambda: model(xs[n]), device, reps=5)  # noqa: B023
            row["kernels"] = _kernels_used(model)
        except Exception as err:  # noqa: BLE001 - report it, go on
            row = {"scheme": name, "error": short_error(err)}
        rows.append(row)
        results.save()
    ref = next((r for r in rows if r["scheme"] == "bf16" and "error" not in r), None)
    for r in rows:
        for n in lengths:
            if ref and f"{n}_tokens_per_s" in r:
                r[f"{n}_time_vs_bf16"] = ref[f"{n}_tokens_per_s"] / r[f"{n}_tokens_per_s"]
    results.save()


# ---------------------------------------------------------------- 4. QAT step


class GQABlock(nn.Module):
    """A Llama-3 block from plain linears: RMSNorm, GQA attention with rotary, SwiGLU."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        c, self.h, self.kv, self.d = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.attn_norm, self.mlp_norm = nn.RMSNorm(c, eps=1e-5), nn.RMSNorm(c, eps=1e-5)
        self.qkv = nn.Linear(c, c + 2 * self.kv * self.d, bias=False)
        self.out = nn.Linear(c, c, bias=False)
        self.gate_up = nn.Linear(c, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, c, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split([c, self.kv * self.d, self.kv * self.d], dim=-1)
        q = rotate_pairs(q.reshape(b * t, self.h, self.d), cos, sin).to(v.dtype).view(b, t, self.h, self.d)
        k = rotate_pairs(k.reshape(b * t, self.kv, self.d), cos, sin).to(v.dtype).view(b, t, self.kv, self.d)
        v = v.view(b, t, self.kv, self.d)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        x = x + self.out(y.transpose(1, 2).reshape(b, t, c))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class GQAStack(nn.Module):
    """``n_layer`` :class:`GQABlock` on ``(B, T, C)`` inputs (no embedding or head)."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(GQABlock(cfg) for _ in range(cfg.n_layer))
        d = cfg.n_embd // cfg.n_head
        inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        ang = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        cos = self.get_buffer("cos")[:t].repeat(b, 1)  # (B*T, D/2): rows of the flattened tokens
        sin = self.get_buffer("sin")[:t].repeat(b, 1)
        for block in self.blocks:
            x = block(x, cos, sin)
        return x


COMPILED_ARM_WEIGHT = 4
"""A compiled QAT arm's share of the time left, relative to an eager arm's."""
QAT_COMPILE_MODES = ("regional", "model", "model-cudagraphs", "model-max-autotune")
QAT_COMPILE = {"mode": "regional"}
"""How a compiled arm (``compile=True``) compiles: each block with ``fullgraph=True`` (regional),
the whole loss function (model), that with ``mode="reduce-overhead"`` (forward and backward
replayed as CUDA graphs: no launch overhead), or with ``mode="max-autotune-no-cudagraphs"``
(Triton GEMM templates, which can fuse the fake-quant into the matmul prologue; long compile).
``--qat-compile`` takes a comma-separated list: one set of compiled arms per mode."""


class QATStep:
    """One training step as ``mode=qat`` wants it on a GPU: bf16 autocast, fused AdamW,
    fake-quant block linears, optionally compiled (:data:`QAT_COMPILE`)."""

    def __init__(self, model: nn.Module, batch: int, seq: int, device: torch.device, compiled: bool | str) -> None:
        self.model, self.device = model.to(device).train(), device
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
        gen = torch.Generator().manual_seed(0)
        if isinstance(model, GPT):
            v = model.cfg.vocab_size
            self.x = torch.randint(0, v, (batch, seq), generator=gen).to(device)
            self.y = torch.randint(0, v, (batch, seq), generator=gen).to(device)
        else:
            width = model.get_submodule("blocks.0.out").in_features
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # autocast on CUDA only
            self.x = torch.randn(batch, seq, width, generator=gen).to(device, dtype)
            self.y = torch.empty(0)
        self.loss: Callable[[], torch.Tensor] = self._loss
        mode = compiled if isinstance(compiled, str) else QAT_COMPILE["mode"]
        self.cudagraphs = bool(compiled) and mode == "model-cudagraphs"
        if compiled and mode == "regional":
            for block in model.get_submodule("blocks"):
                block.compile(fullgraph=True)
        elif compiled:
            modes = {"model": "default", "model-cudagraphs": "reduce-overhead"}
            self.loss = torch.compile(self._loss, mode=modes.get(mode, "max-autotune-no-cudagraphs"))

    def _loss(self) -> torch.Tensor:
        """Cross-entropy (GPT) or mean square of the output (stack)."""
        out = self.model(self.x)
        if isinstance(self.model, GPT):
            return F.cross_entropy(out.view(-1, out.size(-1)).float(), self.y.reshape(-1))
        return out.float().pow(2).mean()

    def train_step(self) -> float:
        """Forward, backward, optimizer step; returns nothing useful (no host sync)."""
        if self.cudagraphs:  # a new iteration: arms replayed in turn must not see each other's outputs
            torch.compiler.cudagraph_mark_step_begin()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return 0.0


def qat_trainer(
    cfg: ModelConfig | StackConfig, spec: LayerSpec | None, batch: int, device: torch.device, compiled: bool | str
) -> QATStep:
    """A :class:`QATStep` for the GPT of ``cfg`` (or the GQA stack), fake-quantized with ``spec``."""
    torch.manual_seed(0)
    if isinstance(cfg, StackConfig):
        with torch.device(device):  # 0.4B parameters: made, initialised and fake-quantized on the device
            model: nn.Module = GQAStack(cfg)
            for p in model.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, 0.0, 0.02)
    else:
        gpt = GPT(cfg)
        gpt.init_weights(0)
        model = gpt
    if spec is not None:
        _swap_block_linears(model, lambda name, lin: FakeQuantLinear.from_linear(lin, spec, name=name))
    return QATStep(model, batch, cfg.block_size, device, compiled)


EAGER_ARM_FLOOR_S = 10.0
"""Seconds an eager QAT arm may take whatever its share (it needs a few: no compile)."""
QAT_ROUNDS = 3
"""Round-robin timing rounds of the QAT arms of one compile mode (see :func:`bench_qat`)."""


def _arm_limit(arms: list[tuple[bool | str, str]], i: int, arm_limit_s: float, deadline: float | None) -> float:
    """Seconds arm ``i`` may take: ``arm_limit_s`` (0: none), at most its share of what is left."""
    if deadline is None:
        return arm_limit_s
    left = deadline - time.perf_counter()
    weights = [COMPILED_ARM_WEIGHT if c else 1 for c, _ in arms[i:]]  # compiling takes longer
    share = left * weights[0] / sum(weights)
    if not arms[i][0]:  # eager: seconds; its bare share starved it in the first device run (all skipped)
        share = max(share, min(EAGER_ARM_FLOOR_S, left))
    return min(arm_limit_s, share) if arm_limit_s > 0 else share


def _build_arm(
    cfg: ModelConfig | StackConfig,
    name: str,
    batch: int,
    device: torch.device,
    compiled: bool | str,
    limit: float,
    row: dict[str, Any],
) -> QATStep | None:
    """Build and warm up (compile) one arm within ``limit`` s; None (and ``row["error"]``) on failure."""
    try:
        with time_limit(limit):
            trainer = qat_trainer(cfg, QAT_SCHEMES.get(name, KERNEL_SPECS.get(name)), batch, device, compiled)
            t0 = time.perf_counter()
            for _ in range(3):  # warm-up (and compilation)
                trainer.train_step()
            sync(device)
            row["warmup_s"] = time.perf_counter() - t0
        return trainer
    except Exception as err:  # noqa: BLE001 - report it in the table, keep checking
        row["error"] = short_error(err, 120)
        return None


def _time_round_robin(built: list[tuple[dict[str, Any], QATStep]], device: torch.device, steps: int) -> None:
    """Median step time of every built arm, timed in :data:`QAT_ROUNDS` interleaved rounds.

    Interleaving puts every arm under the same clocks and memory state: the first device
    run timed the arms one after the other (fp first, right after its compile) and saw
    fake-quant steps faster than fp steps, with more work in their graphs (checked: the
    fp and int4 graphs differ only by the fake-quant ops). Each arm's kernel count and
    device time for one step (:func:`profile_kernels`) go into ``row["profile"]``.
    """
    times: dict[int, list[float]] = {id(row): [] for row, _ in built}
    reps = max(1, -(-steps // QAT_ROUNDS))
    for _ in range(QAT_ROUNDS):
        for row, trainer in built:
            for _ in range(reps):
                t = time.perf_counter()
                trainer.train_step()
                sync(device)
                times[id(row)].append(time.perf_counter() - t)
    for row, trainer in built:
        row["step_ms"] = statistics.median(times[id(row)]) * 1e3
        prof = profile_kernels(trainer.train_step, device, top=5)
        row["profile"] = prof


def bench_qat(
    cfg: ModelConfig | StackConfig,
    device: torch.device,
    batch: int,
    steps: int,
    compile_modes: list[bool] | list[bool | str],
    arm_limit_s: float = 0,
    deadline: float | None = None,
    schemes: tuple[str, ...] = ("fp", "int4 g32"),
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict]:
    """Median step time per scheme, eager and compiled; ratio to fp in the same mode.

    Per compile mode, every scheme's arm is built and warmed up (compiled) first, then all are
    timed in interleaved rounds (:func:`_time_round_robin`). Building an arm gets
    ``arm_limit_s`` seconds (0: no limit), and no more than its share of the time left before
    ``deadline`` (a ``time.perf_counter()`` value; a compiled arm's share is
    :data:`COMPILED_ARM_WEIGHT` times an eager one's); one that runs over, or fails, is
    reported with its error instead of stopping the check. ``on_row`` is called with each
    finished row (incremental saving).
    """
    rows: list[dict[str, Any]] = []
    arms = [(c, n) for c in compile_modes for n in schemes]
    for compiled in compile_modes:
        mode_rows, built = [], []
        for name in schemes:
            row: dict[str, Any] = {"model": getattr(cfg, "name", ""), "arm": name, "compile": compiled}
            mode_rows.append(row)
            limit = _arm_limit(arms, arms.index((compiled, name)), arm_limit_s, deadline)
            if deadline is not None and limit < 5:
                row["error"] = "skipped: over the time budget"
                continue
            trainer = _build_arm(cfg, name, batch, device, compiled, limit, row)
            if trainer is not None:
                built.append((row, trainer))
        try:
            _time_round_robin(built, device, steps)
        except Exception as err:  # noqa: BLE001 - interleaving failed: each arm alone, as the first run did
            for row, trainer in built:
                row["interleave_error"] = short_error(err, 120)
                try:
                    _time_round_robin([(row, trainer)], device, steps)
                except Exception as err1:  # noqa: BLE001 - report it in the table, keep checking
                    row["error"] = short_error(err1, 120)
        fp = next((r["step_ms"] for r in mode_rows if r["arm"] == "fp" and "step_ms" in r), None)
        for row in mode_rows:
            if "step_ms" in row:
                row["ratio_vs_fp"] = row["step_ms"] / fp if fp else None
            rows.append(row)
            if on_row is not None:
                on_row(row)
        del built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- main


def _fmt(v: Any, spec: str = ".0f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _decode_text(r: dict[str, Any], gbs: float) -> str:
    """One decode row of the table."""
    text = ""
    if "eager_tokens_per_s" in r:
        text = f"eager {r['eager_tokens_per_s']:.0f} tok/s ({_fmt(r.get('eager_vs_bf16'), '.2f')}x bf16), "
    if r.get("decode_kernel"):
        text = f"{r['decode_kernel']}: " + text
    if "static_error" in r:
        return text + f"[red]static step failed: {r['static_error']}[/red]"
    text += (
        f"{'graph' if r['static_uses_graph'] else 'static'} {r['static_tokens_per_s']:.0f} tok/s "
        f"({_fmt(r.get('static_vs_bf16'), '.2f')}x bf16, {100 * r['static_fraction_of_bound']:.0f}% of bound "
        f"{r['bound_tokens_per_s']:.0f} at {gbs:.0f} GB/s); compile+capture "
        f"{r['compile_capture_s']:.0f} s; logit error {r['static_logit_error']:.1e}"
    )
    if r.get("graph_error"):
        text += f" [red](no graph: {r['graph_error']})[/red]"
    return text


def _us(d: dict[str, float], unit: str = "us", spec: str = ".1f") -> str:
    return "  ".join(f"{k} {v:{spec}}" for k, v in d.items()) + f" ({unit})"


def _choice_label(key: list[str]) -> str:
    """``decode int4 g32 N=6144 K=2048`` from a :func:`qtrain.quant.cuda.table.shape_key` (+ row bucket)."""
    if len(key) < 8:
        return " ".join(key)
    _, kind, bits, n, k, group, zeros, act = key[:8]
    text = f"{kind} int{bits} g{group} N={n} K={k}" + (" asym" if zeros == "True" else "")
    text += " act8" if act == "True" else ""
    return text + (f" rows<={key[8]}" if len(key) > 8 else "")


def _layer_texts(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Lines of one :func:`time_layers` row: decode and prefill kernels (device us), GB/s, eager walls."""
    us = r.get("us", {})
    lines = []
    for part in ("decode", "prefill"):
        d = {k.split(" ", 1)[1]: v for k, v in us.items() if k.startswith(part)}
        if d:
            lines.append((f"{part} device", _us(d)))
    if r.get("gbs"):
        lines.append(("decode GB/s", _us({k.split(" ", 1)[1]: v for k, v in r["gbs"].items()}, "GB/s", ".0f")))
    if r.get("wall_us"):
        chosen = "; ".join(f"{k}: {'+'.join(v)}" for k, v in r.get("chosen", {}).items())
        lines.append(("eager wall", _us(r["wall_us"], "us", ".0f") + (f"; ran {chosen}" if chosen else "")))
    for k, v in r.get("errors", {}).items():
        lines.append(("error", f"[red]{k}: {v}[/red]"))
    return lines


def _profile_text(p: dict[str, Any], top: int = 4) -> str:
    """``N kernels, T us; name xcount us, ...`` (the first ``top`` of a :func:`profile_kernels` result)."""
    if "error" in p:
        return f"profile failed: {p['error']}"
    head = ", ".join(f"{name[:40]} x{n} {us:.0f} ({us / n:.1f}/call)" for name, n, us in p["top"][:top])
    return f"{p['kernels']} kernels, {p['kernel_us']:.0f} us; {head}"


def show(result: dict[str, Any]) -> None:
    """Print the report (the README's table)."""
    t = Table(
        title=f"gpu_check on {result['device_name']} (torch {result['torch']}, Triton kernels "
        f"{result.get('triton_kernels', '?')})"
    )
    for col in ("section", "item", "result"):
        t.add_column(col)
    by_kernel: dict[str, list[dict[str, Any]]] = {}
    for r in result.get("kernels", []):
        by_kernel.setdefault(r["kernel"], []).append(r)
    for name, rs in by_kernel.items():
        bad = [r for r in rs if not r["ok"]]
        worst = max(r["worst_fraction_of_bound"] for r in rs)
        text = f"{len(rs) - len(bad)}/{len(rs)} ok, worst error {worst:.2f} of bound"
        errors = sorted({r["error"] for r in rs if r.get("error")})
        if errors:
            text += f"; {len(errors)} error(s): {errors[0]}"
        t.add_row("kernel vs reference", name, text if not bad else f"[red]{text}[/red]")
    for r in result.get("layers", []):
        for what, text in _layer_texts(r):
            t.add_row(f"layer {what} ({r['shapes']})", f"N={r['N']} K={r['K']}", text)
    for c in result.get("choices", []):
        t.add_row("table measured", _choice_label(c["key"]), f"chose {c['chosen']}: " + _us(c["us"]))
    dec = result.get("decode") or {}
    for r in dec.get("rows", []):
        t.add_row("decode", r["scheme"], r.get("error") or _decode_text(r, dec["copy_bandwidth_gbs"]))
    for r in dec.get("rows", []):
        if r.get("profile"):
            t.add_row("decode profile", r["scheme"], _profile_text(r["profile"]))
    for r in result.get("prefill", []):
        parts = [
            f"{k.split('_')[0]} tok: {v:,.0f} tok/s ({_fmt(r.get(k.split('_')[0] + '_time_vs_bf16'), '.2f')}x bf16)"
            for k, v in r.items()
            if k[0].isdigit() and k.endswith("tokens_per_s")
        ]
        used = [f"kernels {'+'.join(r['kernels'])}"] if r.get("kernels") else []
        t.add_row("prefill", r["scheme"], r.get("error") or ", ".join(parts + used))
    for r in result.get("qat", []):
        text = r.get("error") or (
            f"{r['step_ms']:.1f} ms/step"
            + (f", {r['ratio_vs_fp']:.2f}x fp" if r.get("ratio_vs_fp") else "")
            + f" (warm-up {r['warmup_s']:.1f} s)"
            + (
                f"; {r['profile']['kernels']} kernels, {r['profile']['kernel_us'] / 1e3:.1f} ms in kernels"
                if "kernels" in r.get("profile", {})
                else ""
            )
        )
        if r.get("interleave_error") and not r.get("error"):
            text += f" [yellow](timed alone: {r['interleave_error']})[/yellow]"
        how = "eager" if not r["compile"] else "compiled" if r["compile"] is True else f"compiled {r['compile']}"
        t.add_row(f"QAT step {r['model']}", f"{r['arm']} {how}", text)
    for note in result.get("skipped", []):
        t.add_row("skipped", "", note)
    took = ", ".join(f"{k} {v:.0f} s" for k, v in result.get("section_s", {}).items())
    t.add_row(
        "total",
        took,
        f"{result.get('elapsed_s', 0):.0f} s, {result.get('kernel_failures', 0)} kernel check(s) failed",
    )
    console.print(t)


def run_kernels(device: torch.device, dry: bool, result: dict[str, Any], budget: Budget | None = None) -> None:
    """Section 1 (the layer timings stop once less than :data:`LAYER_TIMES_RESERVE_S` of ``budget`` is left)."""
    from qtrain.quant.cuda import select

    cfg = MODEL_DRY if dry else MODEL_1B
    with _env("QTRAIN_TRITON_AUTOTUNE", "0"):  # correctness: one tile config per variant (compiles cost seconds)
        result["kernels"] = check_kernels(device, layer_shapes(cfg), [1, 65] if dry else [1, 16, 17, 64, 65, 512])
    select.CHOICES.clear()  # choices made with untuned kernels: measured again (tuned) by the parts below
    select.TIMINGS.clear()
    result["kernels"] += check_triton_kernels(device, layer_shapes(cfg), [65] if dry else [65, 512])
    if not dry:
        result["layers"] = time_layers(device, layer_shapes(cfg)[:4], "1b", budget)
        result["layers"] += time_layers(device, stack_shapes(STACK_8B)[1:3], "8b", budget)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected sections within the budget; returns the JSON-able result."""
    from qtrain.quant.cuda.bench import measured_choices

    device = torch.device(args.device)
    dry = device.type == "cpu"
    if not dry:  # one compiled entry per block layout per model (torch._dynamo imports in 1-2 s: not for dry runs)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    data: dict[str, Any] = {
        "torch": torch.__version__,
        "args": vars(args),
        "skipped": [],
        "device_name": torch.cuda.get_device_name(device) if not dry else "cpu (dry run)",
        "triton_kernels": K.why_unavailable(device) or "available",
    }
    results = Results(args.out, data)
    budget = Budget(args.budget_s, data["skipped"])
    sections = args.sections.split(",")
    took = data["section_s"] = {}
    if "kernels" in sections:
        t0 = time.perf_counter()
        run_kernels(device, dry, data, budget)
        data["kernel_failures"] = sum(not r["ok"] for r in data["kernels"])
        took["kernels"] = time.perf_counter() - t0
        results.save()
    if "prefill" in sections:  # before decode: cheap, and decode's compiles may use up the budget
        t0 = time.perf_counter()
        bench_prefill(MODEL_DRY if dry else MODEL_1B, device, [32] if dry else [512, 2048], budget, results)
        data["choices"] = measured_choices()
        took["prefill"] = time.perf_counter() - t0
        results.save()
    if "decode" in sections:
        t0 = time.perf_counter()
        schemes = args.decode_schemes.split(",")
        bench_decode(
            MODEL_DRY if dry else MODEL_1B, device, schemes, 4 if dry else args.tokens, not dry, budget, results
        )
        took["decode"] = time.perf_counter() - t0
    data["qat"] = []
    for sec, cfg, batch in (
        ("qat-small", MODEL_DRY if dry else MODEL_SMALL, 2 if dry else args.qat_batch),
        ("qat-8b", STACK_DRY if dry else STACK_8B, 2 if dry else args.stack_batch),
    ):
        if sec not in sections or not budget.allow(sec, 20):
            continue
        reserve = 0 if sec == "qat-8b" or "qat-8b" not in sections else budget.left() / 2
        rows = bench_qat(
            cfg,
            device,
            batch,
            1 if dry else args.qat_steps,
            [False]
            if dry
            else [False, *(args.qat_compile_small if sec == "qat-small" else args.qat_compile).split(",")],
            args.arm_limit_s,
            time.perf_counter() + budget.left() - reserve,
            tuple(QAT_SCHEMES),
            on_row=lambda r: (data["qat"].append(r), results.save()),
        )
        data["qat"] += [r for r in rows if r not in data["qat"]]
    data["choices"] = measured_choices()  # what the kernel table's measured rows timed and chose
    data["elapsed_s"] = time.perf_counter() - budget.t0
    data["kernel_failures"] = sum(not r["ok"] for r in data.get("kernels", []))
    results.save()
    return data


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 when a kernel check failed)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run on a tiny model)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per timed repeat")
    ap.add_argument(
        "--decode-schemes",
        default=",".join(k for k in DECODE_SCHEMES if decode_kernel(k) != "triton"),
        help="comma-separated, run in this order ('<packed one> triton' rows added after bf16 where Triton runs)",
    )
    ap.add_argument("--qat-batch", type=int, default=16, help="model=small batch (x 256 tokens)")
    ap.add_argument("--stack-batch", type=int, default=8, help="8B-like stack batch (x 512 tokens)")
    ap.add_argument("--qat-steps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget; later parts are skipped")
    ap.add_argument(
        "--arm-limit-s", type=float, default=75.0, help="time limit of one QAT arm, torch.compile included (0: none)"
    )
    ap.add_argument(
        "--qat-compile",
        default="regional",
        help=f"comma-separated compile modes of the QAT arms, from {','.join(QAT_COMPILE_MODES)}",
    )
    ap.add_argument("--qat-compile-small", default=None, help="the same for model=small (default: --qat-compile)")
    ap.add_argument("--out", default=None, help="write the result as JSON here (after every part)")
    args = ap.parse_args(argv)
    args.qat_compile_small = args.qat_compile_small or args.qat_compile
    for flag, given, allowed in (
        ("--sections", args.sections, SECTIONS),
        ("--qat-compile", args.qat_compile, QAT_COMPILE_MODES),
        ("--qat-compile-small", args.qat_compile_small, QAT_COMPILE_MODES),
        ("--decode-schemes", args.decode_schemes, tuple(DECODE_SCHEMES)),
    ):
        bad = sorted(set(given.split(",")) - set(allowed))
        if bad:
            console.print(f"gpu_check: {flag} has unknown {bad}; choose from {list(allowed)}")
            return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check. "
            "Run it on a machine with a GPU, or use --device cpu for a dry run of its logic."
        )
        return 0
    result = run(args)
    show(result)
    if args.out:
        console.print(f"wrote {args.out}")
    return 1 if result["kernel_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
