"""`mode=report`: one quality/speed table (and plot) across runs and multirun sweeps.

`qtrain mode=report 'runs=[DIR,...]'` takes run dirs, or multirun sweep dirs whose job
subdirs are run dirs, and reads from each job what the run left behind (DESIGN.md section 2):
`report.json` (the result), `metrics.jsonl` (loss curves), `status.json` (exit code of a
sweep job) and `.hydra/overrides.yaml` (what the job changed). It prints one rich table and
writes, into the current run dir:

- `report_table.json`: the rows as data;
- `report.png` (when matplotlib is installed, `pip install -e .[plot]`): validation
  perplexity against stored bits per weight, and the training loss curves.

Columns: scheme, method, validation perplexity, perplexity relative to the run's full-precision
reference (PTQ, and QAT/finetune with `init_from`), recovered % for each QAT run against a
PTQ run of the same model and scheme (`(ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_fp)`, with the PTQ
run's reference as `ppl_fp`; PTQ `rtn` preferred, else the best PTQ), checkpoint bytes, bits
per weight, decode tokens/s (measured by `mode=eval` and on the packed result of
ptq/qat/finetune) and the job's status.

Example:
    >>> qtrain -m mode=qat model=small quant=int8,int4 hydra.sweep.dir=bench_out/sweep
    >>> qtrain mode=report 'runs=[bench_out/sweep]' hydra.run.dir=bench_out/sweep_report
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from qtrain.console import console, info, rank
from qtrain.errors import ConfigError
from qtrain.report import REPORT_FILE
from qtrain.runner import RunContext
from qtrain.sweep_jobs import METRICS_FILE, STATUS_FILE, Job, find_job_dirs, read_job  # noqa: F401 - re-exported

TABLE_FILE = "report_table.json"
PLOT_FILE = "report.png"
FULL_PRECISION_BITS = 32.0
SCALE_BITS = 16
ZERO_BITS = 8
TABLE_WIDTH = 160
"""Columns of the printed table when the output is not a terminal."""


@dataclass
class Row:
    """One line of the table (also one record of report_table.json)."""

    job: str
    path: str
    mode: str | None
    model: str | None
    scheme: str
    method: str
    val_ppl: float | None
    ppl_vs_reference: float | None
    reference_val_ppl: float | None
    recovered_pct: float | None
    checkpoint_bytes: int | None
    bits_per_weight: float | None
    decode_tokens_per_s: float | None
    status: str
    ok: bool
    scheme_key: list[Any] = field(default_factory=list)


# ---------------------------------------------------------------- one row per job


def quant_config(report: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(quant config dict or None for full precision, method) from either report form.

    Quantizing modes store ``{scheme, group_size, ..., method}``; ``mode=eval`` stores the
    checkpoint manifest's ``{config, state, method, layers}``.
    """
    q = report.get("quant")
    if not isinstance(q, dict):
        return None, None
    cfg = q.get("config", q)
    if not isinstance(cfg, dict) or cfg.get("scheme") in (None, "none"):
        return None, q.get("method")
    return cfg, q.get("method")


def scheme_label(cfg: dict[str, Any] | None) -> str:
    """Short scheme text: ``fp32``, ``int8``, ``int4 g32``, ``int4 g128 asym +head``."""
    if cfg is None:
        return "fp32"
    scheme = str(cfg["scheme"])
    text = scheme
    if scheme != "int8":
        g = cfg.get("group_size", 32)
        text += " per-channel" if g == -1 else f" g{g}"
        if not cfg.get("symmetric", True):
            text += " asym"
    if scheme == "int8" and cfg.get("activations") == "int8":
        text += " +act8"
    for key, tag in (("lm_head", "+head"), ("embeddings", "+emb")):
        if cfg.get(key):
            text += f" {tag}"
    return text


def scheme_key(cfg: dict[str, Any] | None) -> list[Any]:
    """What makes two runs' schemes the same (for matching QAT to PTQ)."""
    if cfg is None:
        return ["fp32"]
    four = cfg["scheme"] != "int8"
    return [
        cfg["scheme"],
        cfg.get("group_size", 32) if four else -1,
        bool(cfg.get("symmetric", True)) if four else True,
        cfg.get("activations", "none") if cfg["scheme"] != "int8da_int4w" else "int8",
        bool(cfg.get("lm_head", False)),
        bool(cfg.get("embeddings", False)),
    ]


def method_label(report: dict[str, Any]) -> str:
    """``ptq rtn``, ``qat``, ``finetune``, ``train``, ``eval (qat)``..."""
    mode = str(report.get("mode", "?"))
    _, method = quant_config(report)
    if mode == "ptq":
        return f"ptq {method or ''}".strip()
    if mode in ("qat", "finetune"):
        return str(method or mode)
    if mode == "eval":
        return f"eval ({method})" if method else "eval"
    return mode


def bits_from_layers(layers: dict[str, Any]) -> float | None:
    """Stored bits per quantized weight from manifest layer specs (codes, scales, zeros)."""
    weights = stored = 0
    for meta in layers.values():
        if meta.get("tied_to"):
            continue  # the shared matrix is counted once, under the head
        n, k = int(meta.get("out_features", 0)), int(meta.get("in_features", 0))
        g = k if meta.get("group_size", -1) == -1 else int(meta["group_size"])
        groups = n * (k // g) if g else 0
        weights += n * k
        stored += n * k * int(meta.get("bits", 8)) + groups * SCALE_BITS
        if not meta.get("symmetric", True):
            stored += groups * ZERO_BITS
    return stored / weights if weights else None


def _bits_per_weight(report: dict[str, Any], cfg: dict[str, Any] | None) -> float | None:
    if isinstance(report.get("bits_per_weight"), (int, float)) and report["bits_per_weight"] > 0:
        return float(report["bits_per_weight"])
    if cfg is None:
        return FULL_PRECISION_BITS
    q = report.get("quant")
    layers = q.get("layers") if isinstance(q, dict) else None
    return bits_from_layers(layers) if isinstance(layers, dict) else None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _status(job: Job) -> tuple[str, bool]:
    if job.status is not None and not job.status.get("ok", job.status.get("exit_code") == 0):
        return f"failed (exit {job.status.get('exit_code', '?')})", False
    if job.report is None:
        return (job.problem or f"no {REPORT_FILE}"), False
    return "ok", True


def job_row(job: Job, label: str) -> Row:
    """The table row of one job (blank cells where the job has no such number)."""
    status, ok = _status(job)
    rep = job.report or {}
    cfg, _ = quant_config(rep) if rep else (None, None)
    val_ppl = _num(rep.get("val_ppl"))
    ref = _num(rep.get("reference_val_ppl"))
    vs_ref = _num(rep.get("ppl_vs_reference"))
    if vs_ref is None and ref and val_ppl is not None:
        vs_ref = val_ppl / ref
    return Row(
        job=label,
        path=str(job.path),
        mode=rep.get("mode"),
        model=rep.get("model"),
        scheme=scheme_label(cfg) if rep else "",
        method=method_label(rep) if rep else "",
        val_ppl=val_ppl,
        ppl_vs_reference=vs_ref,
        reference_val_ppl=ref,
        recovered_pct=None,
        checkpoint_bytes=int(rep["checkpoint_bytes"]) if _num(rep.get("checkpoint_bytes")) is not None else None,
        bits_per_weight=_bits_per_weight(rep, cfg) if rep else None,
        decode_tokens_per_s=_num(rep.get("decode_tokens_per_s")),
        status=status,
        ok=ok,
        scheme_key=scheme_key(cfg) if rep else [],
    )


def _ptq_for(row: Row, rows: list[Row]) -> Row | None:
    """The PTQ run of the same model and scheme to compare a QAT run with (rtn preferred)."""
    cands = [
        r
        for r in rows
        if r.ok and r.mode == "ptq" and r.model == row.model and r.scheme_key == row.scheme_key and r.val_ppl
    ]
    rtn = [r for r in cands if r.method == "ptq rtn"]
    pool = rtn or cands
    return min(pool, key=lambda r: r.val_ppl or math.inf) if pool else None


MIN_RECOVERY_GAP = 0.005
"""Recovery is left blank when PTQ is within this fraction of its reference perplexity: the
ratio of two tiny differences says nothing (and explodes)."""


def fill_recovery(rows: list[Row]) -> None:
    """Set ``recovered_pct`` on QAT rows that have a matching PTQ row with a reference.

    Only where the PTQ gap is at least :data:`MIN_RECOVERY_GAP` of the reference perplexity.
    """
    for row in rows:
        if not row.ok or row.mode != "qat" or row.val_ppl is None:
            continue
        ptq = _ptq_for(row, rows)
        if ptq is None or ptq.val_ppl is None or ptq.reference_val_ppl is None:
            continue
        gap = ptq.val_ppl - ptq.reference_val_ppl
        if gap >= MIN_RECOVERY_GAP * ptq.reference_val_ppl:
            row.recovered_pct = 100.0 * (ptq.val_ppl - row.val_ppl) / gap


def job_labels(jobs: list[Job]) -> list[str]:
    """Short names: the overrides that differ between jobs, else the directory names."""
    sets = [set(j.overrides) for j in jobs]
    common = set.intersection(*sets) if sets and all(sets) else set()
    labels = []
    for job in jobs:
        varying = [o for o in job.overrides if o not in common]
        labels.append(",".join(varying) if varying else job.path.name)
    return labels


def build_rows(jobs: list[Job]) -> list[Row]:
    """Rows for the jobs, with recovery filled in."""
    rows = [job_row(j, label) for j, label in zip(jobs, job_labels(jobs), strict=True)]
    fill_recovery(rows)
    return rows


# ---------------------------------------------------------------- output


def _cell(value: float | int | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "" if value is None else str(value)
    return format(value, fmt)


def rows_table(rows: list[Row], title: str = "qtrain report") -> Table:
    """The rich table of the rows."""
    table = Table(title=title, show_header=True, header_style="bold")
    for col, justify in (
        ("job", "left"),
        ("scheme", "left"),
        ("method", "left"),
        ("val ppl", "right"),
        ("vs ref", "right"),
        ("recovered", "right"),
        ("ckpt MB", "right"),
        ("bits/w", "right"),
        ("decode tok/s", "right"),
        ("status", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        vs_ref = None if r.ppl_vs_reference is None else 100.0 * (r.ppl_vs_reference - 1.0)
        table.add_row(
            r.job,
            r.scheme,
            r.method,
            _cell(r.val_ppl, ".3f"),
            "" if vs_ref is None else f"{vs_ref:+.2f}%",
            "" if r.recovered_pct is None else f"{r.recovered_pct:.1f}%",
            "" if r.checkpoint_bytes is None else f"{r.checkpoint_bytes / 1e6:.2f}",
            _cell(r.bits_per_weight, ".2f"),
            _cell(r.decode_tokens_per_s, ".1f"),
            r.status if r.ok else f"[red]{r.status}[/red]",
        )
    return table


def print_wide(table: Table) -> None:
    """Print through the qtrain console; a pipe or log file gets TABLE_WIDTH columns, not rich's 80."""
    if console.is_terminal or rank() != 0:
        info_table(table)
        return
    saved = console.__dict__.get("_width")
    console.width = max(console.width, TABLE_WIDTH)
    try:
        console.print(table)
    finally:
        console.__dict__["_width"] = saved


def info_table(table: Table) -> None:
    """Print a table on rank 0 only."""
    if rank() == 0:
        console.print(table)


def write_table(run_dir: Path, rows: list[Row], runs: list[str]) -> Path:
    """Write report_table.json (atomically) into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / TABLE_FILE
    data = {"runs": runs, "rows": [asdict(r) for r in rows]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def plot_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(path: Path, rows: list[Row], jobs: list[Job]) -> Path:
    """`report.png`: val ppl vs bits per weight, and loss curves. Needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_q, ax_l = fig.subplots(1, 2)
    markers = {"ptq": "s", "qat": "o", "finetune": "^", "train": "*", "eval": "D"}
    for r in rows:
        if not r.ok or r.val_ppl is None or r.bits_per_weight is None:
            continue
        ax_q.scatter(r.bits_per_weight, r.val_ppl, marker=markers.get(r.mode or "", "x"), s=50)
        ax_q.annotate(
            f"{r.scheme} {r.method}",
            (r.bits_per_weight, r.val_ppl),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax_q.set_xlabel("stored bits per quantized weight (scales and zeros included)")
    ax_q.set_ylabel("validation perplexity")
    ax_q.set_title("quality vs size")
    ax_q.grid(True, alpha=0.3)
    for job, row in zip(jobs, rows, strict=True):
        if job.losses:
            steps, losses = [s for s, _ in job.losses], [v for _, v in job.losses]
            line = ax_l.plot(steps, losses, label=row.job, linewidth=1.2)[0]
            if job.val_losses:
                vs, vl = [s for s, _ in job.val_losses], [v for _, v in job.val_losses]
                ax_l.plot(vs, vl, "o", color=line.get_color(), markersize=4)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss (nats/byte; dots: validation)")
    ax_l.set_title("loss curves")
    ax_l.grid(True, alpha=0.3)
    if ax_l.lines:
        ax_l.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


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
    rows = build_rows(jobs)
    print_wide(rows_table(rows, title=f"qtrain report: {len(rows)} runs from {', '.join(runs)}"))
    table_path = write_table(ctx.run_dir, rows, runs)
    info(f"table: {table_path}")
    plot_path: Path | None = None
    if plot_available():
        plot_path = write_plot(ctx.run_dir / PLOT_FILE, rows, jobs)
        info(f"plot: {plot_path}")
    else:
        info("note: matplotlib is not installed, so no report.png (pip install -e .\\[plot]); the table is written")
    failed = [r for r in rows if not r.ok]
    return {
        "mode": "report",
        "runs": runs,
        "jobs": len(rows),
        "failed": len(failed),
        "table": str(table_path),
        "plot": str(plot_path) if plot_path else None,
        "elapsed_s": round(time.perf_counter() - ctx.t0, 3),
    }
