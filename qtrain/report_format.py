"""How every table qtrain prints shows its values, and the name of a run's result file.

Every table formats numbers through :func:`fmt_number`, so one quantity reads the same in
the run summary, `mode=report` and `mode=verify`; :func:`print_wide` keeps tables readable
in pipes and log files. Writing `report.json` is `qtrain.modes.results.write_report`.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from qtrain.console import console, rank

REPORT_FILE = "report.json"
TABLE_WIDTH = 200
"""Columns of a printed table when the output is not a terminal (pipes, log files, CI)."""
SIGNIFICANT = 5
"""Significant digits of a float in any table."""
SMALL = 1e-3
"""Below this (and not 0) a float is written in scientific notation: a KL of 2.3e-05, never 0.0000."""
LARGE = 1e4
"""From this up a float is written as a whole number with thousands separators."""


def fmt_number(value: float | int | None, sign: bool = False, digits: int = SIGNIFICANT) -> str:
    """One number format for every table.

    ``None`` is blank; ints get thousands separators (``2,974,815``); floats get ``digits``
    significant digits, trailing zeros kept (``4.6561``, ``11.830``, ``143.52``), scientific
    notation below :data:`SMALL` (``2.3457e-05``), and whole numbers with separators once the
    integer part alone has ``digits`` digits or reaches :data:`LARGE` (``12,346``); ``sign``
    adds ``+`` to positive numbers.

    Example:
        >>> fmt_number(0.0000234567), fmt_number(4.65612), fmt_number(-3.66, sign=True), fmt_number(1246.3, digits=3)
        ('2.3457e-05', '4.6561', '-3.6600', '1,246')
    """
    if value is None:
        return ""
    plus = "+" if sign else ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return format(value, f"{plus},")
    if math.isnan(value) or math.isinf(value):
        return str(value)
    size = abs(value)
    if size == 0:
        return "0"
    if size < SMALL:
        return format(value, f"{plus}.{digits - 1}e")
    if size >= min(LARGE, 10.0**digits - 0.5):
        return format(value, f"{plus},.0f")
    return format(value, f"{plus}#.{digits}g").rstrip(".")  # '#': 11.830, not 11.83 beside 11.831


def fmt_entry(value: Any) -> str:
    """A report entry as a table cell: numbers through :func:`fmt_number`, dicts as ``key=value`` lists."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt_number(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt_nested(k, v)}" for k, v in value.items())
    return str(value)


def _fmt_nested(key: str, value: Any) -> str:
    """A value inside a dict entry: per-layer tables are counted, not listed (they are in report.json)."""
    if key == "layers" and isinstance(value, dict):
        return f"{len(value)} layers"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k}={_fmt_nested(k, v)}" for k, v in value.items()) + ")"
    if isinstance(value, float):
        return fmt_number(value)
    return str(value)


def print_wide(table: Table) -> None:
    """Print a table on rank 0; a pipe or log file gets :data:`TABLE_WIDTH` columns, not rich's 80.

    Paths and labels then stay on one line where they fit instead of being cut mid-word.
    """
    if rank() != 0:
        return
    if console.is_terminal:
        console.print(table)
        return
    saved = console.__dict__.get("_width")
    console.width = max(console.width, TABLE_WIDTH)
    try:
        console.print(table)
    finally:
        console.__dict__["_width"] = saved
