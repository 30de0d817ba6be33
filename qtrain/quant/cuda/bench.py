"""Side-by-side layer timings of every CUDA kernel candidate (for ``scripts/gpu_check.py``).

Two clocks, because they answer different questions:

- :func:`graph_us`: device time per call, from a CUDA graph of back-to-back calls (no launch
  overhead): what a call costs inside :class:`qtrain.fastdecode.FastDecoder`'s graph, and how
  close a kernel gets to the memory bound (``GB/s`` = weight bytes / time).
- :func:`wall_us`: host + device time per call, calls issued back to back (eager forward, as
  ``mode=eval`` prefill runs the packed layers): launch overhead included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qtrain.quant import kernels as table
from qtrain.quant.cuda import select
from qtrain.quant.cuda import table as rows
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear
from qtrain.quant.spec import LayerSpec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_us(fn: Callable[[], Any], device: torch.device, reps: int = 20) -> float:
    """Microseconds per call, ``reps`` calls back to back (host and device), after warm-up calls."""
    return select.time_call(fn, device, reps)


def graph_us(fn: Callable[[], Any], device: torch.device, calls: int = 20, replays: int = 5) -> float:
    """Device microseconds per call: ``calls`` calls captured in one CUDA graph, replayed
    ``replays`` times (median); :func:`wall_us` off CUDA."""
    if device.type != "cuda":
        return wall_us(fn, device, calls)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up (compile, autotune) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        _sync(device)
        t = time.perf_counter()
        graph.replay()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] / calls * 1e6


def _bytes(mod: PackedLinear) -> int:
    return sum(b.numel() * b.element_size() for b in mod.buffers())


def _candidates(
    w: Tensor, q8: PackedLinear, q4: PackedLinear, x1: Tensor, xm: Tensor
) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    """Every kernel candidate as a zero-argument call, and the weight bytes each reads."""
    w8, w4 = q8.packed_weights(), q4.packed_weights()
    fns: dict[str, Callable[[], Any]] = {"decode bf16": lambda: F.linear(x1, w)}
    paths = {
        "decode int8 compiled_gemv": (table.int8_gemv_cuda, w8, x1),
        "decode int8 triton_gemv": (rows.triton_gemv_cuda, w8, x1),
        "decode int4 tinygemm": (table.tinygemm_cuda, w4, x1),
        "decode int4 triton_gemv": (rows.triton_gemv_cuda, w4, x1),
        "prefill int8 triton_gemm": (rows.triton_gemm_cuda, w8, xm),
        "prefill int8 triton_dequant": (table.triton_dequant_cuda, w8, xm),
        "prefill int4 triton_gemm": (rows.triton_gemm_cuda, w4, xm),
        "prefill int4 triton_dequant": (table.triton_dequant_cuda, w4, xm),
    }
    for name, (build, pw, x) in paths.items():
        fns[name] = _checked(build, pw, x)
    fns["prefill bf16"] = lambda: F.linear(xm, w)
    nbytes = {"bf16": w.numel() * w.element_size(), "int8": _bytes(q8), "int4": _bytes(q4)}
    return fns, nbytes


def _checked(build: Callable[[Any], Callable[[Tensor], Tensor | None]], w: Any, x: Tensor) -> Callable[[], Tensor]:
    """A call of the path ``build(w)`` on ``x`` (built on the first call: a failure to build is
    that candidate's error); a path that declines (None) raises."""
    path: list[Callable[[Tensor], Tensor | None]] = []

    def call() -> Tensor:
        if not path:
            path.append(build(w))
        y = path[0](x)
        if y is None:
            raise RuntimeError("the kernel declined (see the log)")
        return y

    return call


def layer_times(w: Tensor, device: torch.device, prefill_rows: int = 512) -> dict[str, Any]:
    """Device time (CUDA graph) of each candidate kernel of one ``[N, K]`` layer at 1 row and at
    ``prefill_rows`` rows, the decode candidates' GB/s, and the wall time of the layers' own
    (measured) paths.

    Returns:
        ``{"us": {name: us}, "gbs": {name: GB/s}, "wall_us": {name: us}, "chosen": {...}, "errors": {name: why}}``.
    """
    gen = torch.Generator().manual_seed(1)
    k = w.shape[1]
    x1 = torch.randn(1, k, generator=gen).to(device, torch.bfloat16)
    xm = torch.randn(prefill_rows, k, generator=gen).to(device, torch.bfloat16)
    out: dict[str, Any] = {"us": {}, "gbs": {}, "wall_us": {}, "chosen": {}, "errors": {}}
    q8 = Int8Linear.from_float(w, LayerSpec("int8", 8))  # outside inference mode: the layers
    q4 = Int4Linear.from_float(w, LayerSpec("int4", 4, 32))  # key their kernels on buffer versions
    with torch.inference_mode():
        fns, nbytes = _candidates(w, q8, q4, x1, xm)
        for name, fn in fns.items():
            try:
                us = graph_us(fn, device)
            except Exception as err:  # noqa: BLE001 - reported next to the others
                out["errors"][name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
                continue
            out["us"][name] = us
            if name.startswith("decode"):
                out["gbs"][name] = nbytes[name.split()[1]] / us / 1e3
        _layer_walls(w, q8, q4, x1, xm, device, out)
    return out


def _layer_walls(
    w: Tensor, q8: PackedLinear, q4: PackedLinear, x1: Tensor, xm: Tensor, device: torch.device, out: dict[str, Any]
) -> None:
    """Eager wall time of the packed layers (the kernel table, measured rows included) and bf16."""
    for label, fn in (
        ("1 row bf16", lambda: F.linear(x1, w)),
        ("1 row int8 layer", lambda: q8(x1)),
        ("1 row int4 layer", lambda: q4(x1)),
        (f"{xm.shape[0]} rows bf16", lambda: F.linear(xm, w)),
        (f"{xm.shape[0]} rows int8 layer", lambda: q8(xm)),
        (f"{xm.shape[0]} rows int4 layer", lambda: q4(xm)),
    ):
        try:
            out["wall_us"][label] = wall_us(fn, device)
        except Exception as err:  # noqa: BLE001 - reported next to the others
            out["errors"][label] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    for label, mod in (("int8", q8), ("int4", q4)):
        out["chosen"][label] = chosen_kernels(mod)


def chosen_kernels(mod: torch.nn.Module) -> list[str]:
    """The kernels the packed layers under ``mod`` ran: table row names, with the candidate a
    measured row chose (``decode:triton_gemv``)."""
    names = set()
    for m in mod.modules():
        plan = getattr(m, "_fast_fn", None)
        if plan is None:
            continue
        for i, fn in plan._fns.items():
            pick = getattr(fn, "chosen", None)
            names.add(f"{plan.rows[i].name}:{pick}" if pick else plan.rows[i].name)
    return sorted(names)


def measured_choices() -> list[dict[str, Any]]:
    """What the measured table rows timed and chose in this process (:mod:`qtrain.quant.cuda.select`)."""
    return [
        {
            "key": [str(p) for p in key] if isinstance(key, tuple) else [str(key)],
            "chosen": select.CHOICES.get(key),
            "us": times,
        }
        for key, times in select.TIMINGS.items()
    ]
