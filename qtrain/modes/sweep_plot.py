"""`report.png` of `mode=report`: quality against size, and the loss curves (needs matplotlib).

Each run has one colour in both panels and one legend entry (its job label, unique), the
legend sits outside the axes, and the full-precision reference perplexity of the runs is
drawn as a dashed line (as validation loss, its logarithm, in the loss panel). Runs that
logged few training steps (short runs, or a large `train.log_every`) get a marker on each
logged point, and their validation points are drawn too, so they show even with one point.
Identical points (int8 at two group sizes is one model) are drawn as concentric markers; a
run validated on another validation corpus than most is marked ``*``, as in the table.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from qtrain.modes.sweep_jobs import Job
from qtrain.modes.sweep_rows import FULL_PRECISION_LABEL, Row
from qtrain.report_format import fmt_number
from qtrain.rundir import write_atomic

PLOT_FILE = "report.png"
OTHER_CORPUS = "*"
"""Marks a run validated on another validation corpus than most (as in the table)."""
MARKERS = {"ptq": "s", "qat": "o", "finetune": "^", "train": "*", "eval": "D"}
FEW_POINTS = 30
"""Curves with fewer logged points than this get a marker on every point."""
POINT_SIZE = 80.0


def plot_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def run_colors(n: int) -> list[Any]:
    """``n`` distinct colours: tab10, tab20 for more runs, then evenly spaced hues."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


def references(rows: list[Row]) -> list[float]:
    """Distinct full-precision reference perplexities: the rows' references, and fp rows' own."""
    refs: list[float] = []
    for r in rows:
        if not r.ok:
            continue
        ref = r.reference_val_ppl if r.reference_val_ppl else (r.val_ppl if r.scheme == FULL_PRECISION_LABEL else None)
        if ref and ref > 0 and all(not math.isclose(ref, seen, rel_tol=1e-9) for seen in refs):
            refs.append(ref)
    return refs


def _quality_panel(ax: Any, rows: list[Row], colors: list[Any]) -> list[int]:
    """Scatter val ppl against bits/weight; returns the indexes of the rows drawn."""
    drawn: list[int] = []
    placed: list[tuple[float, float]] = []
    for i, r in enumerate(rows):
        if not r.ok or r.val_ppl is None or r.bits_per_weight is None or r.bits_per_weight <= 0:
            continue
        same = sum(math.isclose(x, r.bits_per_weight) and math.isclose(y, r.val_ppl) for x, y in placed)
        placed.append((r.bits_per_weight, r.val_ppl))
        size = POINT_SIZE * 0.45**same  # a point hidden under an earlier one shows as a smaller one inside it
        ax.scatter(
            r.bits_per_weight,
            r.val_ppl,
            marker=MARKERS.get(r.mode or "", "X"),
            s=size,
            color=colors[i],
            edgecolors="black",
            linewidths=0.4,
            zorder=3 + same,
        )
        if r.corpus_differs:  # as in the table: this perplexity is on another validation corpus
            ax.annotate(OTHER_CORPUS, (r.bits_per_weight, r.val_ppl), xytext=(5, 2), textcoords="offset points")
        drawn.append(i)
    for ref in references(rows):
        ax.axhline(ref, color="black", linestyle="--", linewidth=1, zorder=1)
    ax.set_xscale("log", base=2)
    bits = [x for x, _ in placed] or [4.0, 32.0]
    lo, hi = min(bits) / 1.25, max(bits) * 1.25
    ax.set_xlim(lo, hi)
    ticks = [t for t in (2.0, 4.0, 8.0, 16.0, 32.0) if lo <= t <= hi]
    if len(ticks) < 2:  # all points between two powers of two: label the points' own values
        ticks = sorted({round(x, 2) for x in bits})
    ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("stored bits per weight (scales and zeros included; fp32 = 32)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("quality vs size")
    ax.grid(True, alpha=0.3)
    return drawn


def _loss_panel(ax: Any, rows: list[Row], jobs: list[Job], colors: list[Any]) -> list[int]:
    """Training loss curves and validation points; returns the indexes of the rows drawn."""
    drawn = []
    for i, (job, color) in enumerate(zip(jobs, colors, strict=True)):
        if job.losses:
            steps, losses = zip(*job.losses, strict=True)
            marker = "." if len(steps) < FEW_POINTS else None
            ax.plot(steps, losses, color=color, linewidth=1.2, marker=marker, markersize=5)
        if job.val_losses:
            vs, vl = zip(*job.val_losses, strict=True)
            ax.plot(vs, vl, "o", color=color, markersize=6, markerfacecolor="white", markeredgewidth=1.5)
        if job.losses or job.val_losses:
            drawn.append(i)
    for ref in references(rows):
        ax.axhline(math.log(ref), color="black", linestyle="--", linewidth=1)
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "no training curves\n(ptq and eval runs do not train)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte): line training, open circles validation")
    ax.set_title("loss curves")
    ax.grid(True, alpha=0.3)
    return drawn


def _label(r: Row) -> str:
    other = f"  {OTHER_CORPUS} other validation corpus" if r.corpus_differs else ""
    return f"{r.job}  ({r.scheme} {r.method}){other}"


def _legend(fig: Any, rows: list[Row], colors: list[Any], shown: list[int]) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            color=colors[i],
            marker=MARKERS.get(rows[i].mode or "", "X"),
            markeredgecolor="black",
            markeredgewidth=0.4,
            linewidth=1.2,
            label=_label(rows[i]),
        )
        for i in shown
    ]
    refs = references(rows)
    if refs:
        text = ", ".join(fmt_number(r) for r in refs)
        handles.append(Line2D([], [], color="black", linestyle="--", label=f"full-precision reference: ppl {text}"))
    if handles:
        fig.legend(
            handles=handles, loc="outside lower center", ncols=2 if len(handles) > 6 else 1, fontsize=7, frameon=False
        )


def figure(rows: list[Row], jobs: list[Job]) -> Any:
    """The report figure (a matplotlib Figure with an Agg canvas): quality panel, loss panel, legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    legend_rows = 1 + len(rows) // (2 if len(rows) > 5 else 1)
    fig = Figure(figsize=(13, 5.0 + 0.16 * legend_rows), layout="constrained")
    FigureCanvasAgg(fig)
    ax_q, ax_l = fig.subplots(1, 2)
    colors = run_colors(len(rows))
    shown = sorted(set(_quality_panel(ax_q, rows, colors)) | set(_loss_panel(ax_l, rows, jobs, colors)))
    _legend(fig, rows, colors, shown)
    return fig


def write_plot(path: Path, rows: list[Row], jobs: list[Job]) -> Path:
    """Write `report.png` (val ppl vs bits per weight; loss curves) atomically and return its path.

    Raises:
        ConfigError: `report.png` or its temporary is a planted link or not a regular file.
    """
    buf = io.BytesIO()
    figure(rows, jobs).savefig(buf, format="png", dpi=110)  # matplotlib would follow a planted link
    return write_atomic(path, buf.getvalue())
