"""The one rich console all qtrain output goes through, and rank-aware printing."""

from __future__ import annotations

import os

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def info(msg: str) -> None:
    """Print a line on rank 0 only."""
    if rank() == 0:
        console.print(msg)


def warn(msg: str) -> None:
    """Print a warning on rank 0 only (stderr)."""
    if rank() == 0:
        err_console.print(f"[yellow]warning:[/yellow] {msg}")
