"""Helpers shared by the benchmark scripts (not part of the package; imported from scripts/)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from qtrain.config import DataConfig


def copy_bandwidth(mbytes: int = 256, reps: int = 9) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written over the median time).

    Copies into a preallocated, already touched destination: a fresh ``clone`` would mostly
    time page faults of the new allocation.
    """
    x = torch.ones(mbytes * 2**20 // 4)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t)
    return 2 * x.numel() * 4 / statistics.median(times) / 1e9


def run_and_report(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    show: Callable[[dict[str, Any]], None],
    console: Console,
) -> dict[str, Any]:
    """Set ``--threads``, run the benchmark, print its table, write ``--out`` as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    show(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.out}")
    return result


def add_data_arg(ap: argparse.ArgumentParser) -> None:
    """Add ``--data PATH``: the corpus a training benchmark reads (default: embedded pydocs)."""
    ap.add_argument("--data", metavar="PATH", default=None,
                    help="text file or directory of .txt files to train on (default: the embedded pydocs corpus)")


def data_config(ap: argparse.ArgumentParser, args: argparse.Namespace) -> DataConfig:
    """The DataConfig ``--data`` names; a missing path is a usage error (exit 2) naming it."""
    if args.data is None:
        return DataConfig()
    path = Path(args.data).resolve()
    if not path.exists():
        ap.error(f"--data {args.data}: no such file or directory")
    return DataConfig(name="text", path=str(path))
