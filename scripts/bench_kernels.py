"""Benchmark qtrain's packed int8 / int4 linears against fp32 and bf16 ``F.linear`` (CPU).

Not a test. For each (K, N) and batch size, times side by side, interleaved rep by rep:

- ``fp32``: ``F.linear(x, w)`` with float32 ``x`` and ``w`` (the baseline)
- ``bf16``: ``F.linear`` with bf16 ``x`` and ``w``
- ``int8_raw`` / ``int4_raw``: ``aten._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu``
  called directly with bf16 activations and prepacked weights
- ``int8_qt`` / ``int4_qt``: qtrain's own AVX2 kernels (:mod:`qtrain.quant.native`) called
  directly on the canonical packed buffers with float32 activations (absent when they cannot
  be built here)
- ``int8`` / ``int4``: qtrain's ``Int8Linear`` / ``Int4Linear`` (group 32), ``kernel="auto"``,
  fed float32 activations, as a model calls them (the qtrain kernels up to 8 rows, PyTorch's
  above, with the layer's dispatch cost)

Reports medians (and minima, robust on a shared machine), ratios to fp32, memory copy
bandwidth (large tensor copy: read + write bytes / time) and each kernel's effective weight
bandwidth (stored weight bytes / time).

Usage:
    python scripts/bench_kernels.py --out bench.json
    python scripts/bench_kernels.py --shapes 1024x1024 --batches 1 --reps 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import copy_bandwidth
from rich.console import Console
from rich.table import Table

from qtrain.quant import kernel_ops, native
from qtrain.quant import primitives as P
from qtrain.quant.packed import Int4Linear, Int8Linear

console = Console(width=120)
DEFAULT_SHAPES = ["1024x1024", "4096x4096", "4096x11008"]




def candidates(k: int, n: int, m: int) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    """Callables to time for one shape and their stored weight bytes."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(m, k, generator=gen)
    wb, xb = w.bfloat16(), x.bfloat16()
    q8 = Int8Linear.from_float(w, P.LayerSpec("int8", 8))
    q4 = Int4Linear.from_float(w, P.LayerSpec("int4", 4, 32))
    q8(x), q4(x)  # build the kernel caches
    w8, s8 = q8.weight_int8, q8.scales.reshape(-1).contiguous()
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.codes().to(torch.int32), 1)
    sz4 = kernel_ops.PackedWeights(4, q4.weight_packed, q4.scales, None, k, 32).scale_and_zero(32, 0)
    mm8, mm4 = torch.ops.aten._weight_int8pack_mm, torch.ops.aten._weight_int4pack_mm_for_cpu
    fns: dict[str, Callable[[], Any]] = {
        "fp32": lambda: F.linear(x, w),
        "bf16": lambda: F.linear(xb, wb),
        "int8_raw": lambda: mm8(xb, w8, s8),
        "int8": lambda: q8(x),
        "int4_raw": lambda: mm4(xb, w4, 32, sz4),
        "int4": lambda: q4(x),
    }
    nbytes = {
        "fp32": n * k * 4,
        "bf16": n * k * 2,
        "int8_raw": n * k + n * 2,
        "int8": n * k + n * 2,
        "int4_raw": n * k // 2 + n * (k // 32) * 4,
        "int4": n * k // 2 + n * (k // 32) * 2,
    }
    lib = native.library()
    if lib is not None:
        p4, s4 = q4.weight_packed, q4.scales
        fns["int8_qt"] = lambda: native.int8_linear(lib, x, w8, s8)
        fns["int4_qt"] = lambda: native.int4_linear(lib, x, p4, s4, None, 32)
        nbytes["int8_qt"], nbytes["int4_qt"] = nbytes["int8"], nbytes["int4"]
    return fns, nbytes


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 5) -> dict[str, list[float]]:
    """Seconds per call of every rep, all candidates run round-robin each rep (rotating order)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


def run(shapes: list[tuple[int, int]], batches: list[int], reps: int) -> dict[str, Any]:
    """Benchmark every (shape, batch); returns the JSON-able result."""
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "copy_bandwidth_gbs": copy_bandwidth(),
        "rows": [],
    }
    for k, n in shapes:
        for m in batches:
            fns, nbytes = candidates(k, n, m)
            times = time_interleaved(fns, reps)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            best = {name: min(ts) for name, ts in times.items()}
            for name, t in med.items():
                result["rows"].append(
                    {
                        "K": k,
                        "N": n,
                        "batch": m,
                        "kernel": name,
                        "ms": t * 1e3,
                        "min_ms": best[name] * 1e3,
                        "speedup_vs_fp32": med["fp32"] / t,
                        "speedup_vs_fp32_min": best["fp32"] / best[name],
                        "weight_gbs": nbytes[name] / t / 1e9,
                    }
                )
    return result


def show(result: dict[str, Any]) -> None:
    """Print the result as a rich table."""
    table = Table(
        title=f"CPU linear kernels (torch {result['torch']}, {result['threads']} threads, "
        f"{result['cpu_capability']}; copy bandwidth {result['copy_bandwidth_gbs']:.1f} GB/s)"
    )
    for col in ("K x N", "batch", "kernel", "median ms", "min ms", "x fp32", "x fp32 (min)", "weight GB/s"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        table.add_row(
            f"{row['K']}x{row['N']}",
            str(row["batch"]),
            row["kernel"],
            f"{row['ms']:.3f}",
            f"{row['min_ms']:.3f}",
            f"{row['speedup_vs_fp32']:.2f}",
            f"{row['speedup_vs_fp32_min']:.2f}",
            f"{row['weight_gbs']:.1f}",
        )
    console.print(table)


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="KxN pairs")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    result = run(shapes, args.batches, args.reps)  # type: ignore[arg-type]
    show(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
