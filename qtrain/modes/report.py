"""`mode=report`: one quality/speed table (and plot) across runs and multirun sweeps.

`qtrain mode=report 'runs=[DIR,...]'` takes run dirs, or multirun sweep dirs whose job
subdirs are run dirs, and reads from each job what the run left behind (DESIGN.md section 2):
`report.json` (the result), `metrics.jsonl` (loss curves), `status.json` (exit code and
overrides of a sweep job) and `.hydra/overrides.yaml` (what the job changed). It prints one
rich table and writes, into the current run dir:

- `report_table.json`: the rows as data;
- `report.png` (when matplotlib is installed, `pip install "qtrain[plot]"`): validation
  perplexity against stored bits per weight, and the loss curves (`qtrain.modes.sweep_plot`).

Columns: the job (its overrides that differ between jobs), scheme, method, validation
perplexity, perplexity relative to the run's full-precision reference (PTQ, and
QAT/finetune with `init_from`), recovered % for each QAT run against a PTQ run of the same
model and scheme (`(ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_fp)`, with the PTQ run's reference
as `ppl_fp`; PTQ `rtn` preferred, else the best PTQ), the model's size (`model.safetensors`,
what is deployed) and the checkpoint's (which for training runs includes optimizer state),
bits per weight, decode tokens/s (measured by `mode=eval` and on the packed result of
ptq/qat/finetune), the run's wall time with the benchmarks' share of it, and the job's
status. A validation perplexity measured on another validation corpus than most rows'
(`corpus.val_sha256` in report.json) is marked: it does not compare.

Example:
    >>> qtrain -m mode=qat model=small quant=int8,int4 hydra.sweep.dir=bench_out/sweep
    >>> qtrain mode=report 'runs=[bench_out/sweep]' hydra.run.dir=bench_out/sweep_report
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from qtrain.console import info, warn
from qtrain.errors import ConfigError
from qtrain.modes.context import RunContext
from qtrain.modes.sweep_jobs import find_job_dirs, read_job
from qtrain.modes.sweep_plot import OTHER_CORPUS, PLOT_FILE, plot_available, write_plot
from qtrain.modes.sweep_rows import Row, build_rows, flag_corpora
from qtrain.report_format import fmt_number, print_wide
from qtrain.rundir import make_dirs, write_atomic

TABLE_FILE = "report_table.json"
MB = 1e6
MEASURED_DIGITS = 3
"""Significant digits of every column but perplexity (which keeps qtrain.report_format.SIGNIFICANT)."""


# ---------------------------------------------------------------- output

COLUMNS = (
    ("job", "left"),
    ("scheme", "left"),
    ("method", "left"),
    ("val ppl", "right"),
    ("val bpb", "right"),
    ("vs ref", "right"),
    ("recovered", "right"),
    ("model MB", "right"),
    ("ckpt MB", "right"),
    ("bits/w", "right"),
    ("decode tok/s", "right"),
    ("time s", "right"),
    ("bench s", "right"),
    ("status", "left"),
)
"""The printed columns (``model MB``: model.safetensors; ``ckpt MB``: the whole checkpoint;
``time s``: the run's wall time, of which ``bench s`` went to speed measurements)."""


def _mb(size: int | None) -> str:
    return "" if size is None else fmt_number(size / MB, digits=MEASURED_DIGITS)


def _cells(r: Row) -> list[Text]:
    """The row's cells; text from the runs (labels, statuses) is never read as rich markup."""
    vs_ref = None if r.ppl_vs_reference is None else 100.0 * (r.ppl_vs_reference - 1.0)
    ppl = Text(fmt_number(r.val_ppl))
    if r.corpus_differs and r.val_ppl is not None:
        ppl = Text(fmt_number(r.val_ppl) + OTHER_CORPUS, style="yellow")
    d = MEASURED_DIGITS
    plain = [
        fmt_number(r.val_bpb),  # bits per byte: compares across tokenizers
        "" if vs_ref is None else fmt_number(vs_ref, sign=True, digits=d) + "%",
        "" if r.recovered_pct is None else fmt_number(r.recovered_pct, digits=d) + "%",
        _mb(r.model_bytes),
        _mb(r.checkpoint_bytes),
        fmt_number(r.bits_per_weight, digits=d),
        fmt_number(r.decode_tokens_per_s, digits=d),
        fmt_number(r.elapsed_s, digits=d),
        fmt_number(r.bench_s, digits=d),
    ]
    return [
        Text(r.job),
        Text(r.scheme),
        Text(r.method),
        ppl,
        *map(Text, plain),
        Text(r.status, style="" if r.ok else "red"),
    ]


def rows_table(rows: list[Row], title: str = "qtrain report") -> Table:
    """The rich table of the rows (numbers through :func:`qtrain.report_format.fmt_number`)."""
    table = Table(title=Text(title), show_header=True, header_style="bold")
    for col, justify in COLUMNS:
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        table.add_row(*_cells(r))
    return table


def corpus_note(rows: list[Row], majority: str | None) -> str | None:
    """The line under the table when some rows were validated on another corpus."""
    odd = [r.job for r in rows if r.corpus_differs]
    if not odd or majority is None:
        return None
    return (
        f"{OTHER_CORPUS} validated on another corpus than the other rows (validation split SHA-256 "
        f"{majority[:12]}...): these perplexities do not compare with the rest: {'; '.join(odd)}"
    )


def write_table(run_dir: Path, rows: list[Row], runs: list[str]) -> Path:
    """Write report_table.json (atomically) into ``run_dir``."""
    make_dirs(run_dir)
    data = {"runs": runs, "rows": [asdict(r) for r in rows]}
    return write_atomic(run_dir / TABLE_FILE, json.dumps(data, indent=2, default=str) + "\n")


def run_report(ctx: RunContext) -> dict[str, Any]:
    """mode=report: one table (and plot) of the runs in ``runs=[DIR,...]``.

    Args:
        ctx: the run context; ``ctx.cfg.runs`` lists run or sweep dirs; outputs go to
            ``ctx.run_dir``.

    Returns:
        The report summary (``report.json`` of this run).

    Raises:
        ConfigError: ``runs`` is empty or names a path holding no runs.

    Example:
        >>> qtrain mode=report 'runs=[multirun/2025-01-01/12-00-00]'
    """
    runs = list(ctx.cfg.runs)
    if not runs:
        raise ConfigError("runs: mode=report needs runs=[DIR,...] (run dirs or multirun sweep dirs)")
    jobs = [read_job(p) for p in find_job_dirs(runs)]
    jobs = [j for j in jobs if (j.report or {}).get("mode") != "report"]  # earlier reports are not runs
    if not jobs:
        raise ConfigError(f"runs: {', '.join(runs)} hold only earlier mode=report results, no runs")
    rows = build_rows(jobs)
    print_wide(rows_table(rows, title=f"qtrain report: {len(rows)} runs from {', '.join(runs)}"))
    if (note := corpus_note(rows, flag_corpora(rows))) is not None:
        warn(note)
    table_path = write_table(ctx.run_dir, rows, runs)
    info(f"table: {table_path}")
    plot_path: Path | None = None
    if plot_available():
        try:
            plot_path = write_plot(ctx.run_dir / PLOT_FILE, rows, jobs)
            info(f"plot: {plot_path}")
        except (ValueError, OverflowError) as err:  # numbers matplotlib cannot draw: the table stands
            warn(f"report.png not written: the runs' numbers cannot be plotted ({err})")
    else:
        info('note: matplotlib is not installed, so no report.png (pip install "qtrain[plot]"); the table is written')
    failed = [r for r in rows if not r.ok]
    return {
        "mode": "report",
        "runs": runs,
        "jobs": len(rows),
        "failed": len(failed),
        "other_val_corpus": sum(r.corpus_differs for r in rows),
        "table": str(table_path),
        "plot": str(plot_path) if plot_path else None,
        "elapsed_s": round(time.perf_counter() - ctx.t0, 3),
    }
