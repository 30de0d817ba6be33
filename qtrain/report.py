"""A run's result: `report.json` (written last) and the same summary as a rich table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from qtrain.console import console, rank

REPORT_FILE = "report.json"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt_nested(k, v)}" for k, v in value.items())
    return str(value)


def _fmt_nested(key: str, value: Any) -> str:
    """A value inside a dict entry: per-layer tables are counted, not listed (they are in report.json)."""
    if key == "layers" and isinstance(value, dict):
        return f"{len(value)} layers"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k}={v}" for k, v in value.items()) + ")"
    return str(value)


def summary_table(report: dict[str, Any], title: str = "qtrain run") -> Table:
    """A two-column table of the report's entries."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in report.items():
        if key in ("layers",):
            continue
        table.add_row(key, _fmt(value))
    return table


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    """Write `report.json` atomically (rank 0 only) and print the summary table."""
    path = run_dir / REPORT_FILE
    if rank() != 0:
        return path
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    console.print(summary_table(report, title=f"qtrain {report.get('mode', '')}"))
    return path
