"""The rows of `mode=report`: one per job, from what the job left behind.

Each row names the scheme and method, takes perplexity, sizes, speed and times from the
job's `report.json` (older reports: sizes from the checkpoint on disk), computes QAT's
recovery against a PTQ row of the same model and scheme, and marks rows validated on
another validation corpus than most (`corpus.val_sha256`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qtrain import checkpoint as ck
from qtrain.modes.sweep_jobs import Job, finite, job_labels
from qtrain.quant.recipe import QuantRecipe
from qtrain.report_format import REPORT_FILE

FULL_PRECISION_BITS = float(QuantRecipe.from_config(None).weight_bits)
FULL_PRECISION_LABEL = QuantRecipe.from_config(None).short_label
"""The scheme column of a full-precision run (``fp32``)."""
SCALE_BITS = 16
ZERO_BITS = 8


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
    model_bytes: int | None
    """`model.safetensors` of the run's checkpoint: what a user deploys."""
    checkpoint_bytes: int | None
    """The whole checkpoint dir (training runs: optimizer state included)."""
    bits_per_weight: float | None
    decode_tokens_per_s: float | None
    elapsed_s: float | None
    """The run's wall time, benchmarks included."""
    bench_s: float | None
    """The part of ``elapsed_s`` spent measuring decode/prefill speed."""
    status: str
    ok: bool
    val_corpus_sha256: str | None = None
    corpus_differs: bool = False
    """True when ``val_corpus_sha256`` is not the one most rows were validated on."""
    val_bpb: float | None = None
    """Validation bits per byte: compares across tokenizers (perplexity does not)."""
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
    """Stored bits per quantized weight from manifest layer specs (codes, scales, zeros).

    Layers whose entries are not whole non-negative numbers (a garbled report) are not counted.
    """
    weights = stored = 0
    for meta in layers.values():
        if not isinstance(meta, dict) or meta.get("tied_to"):
            continue  # the shared matrix is counted once, under the head
        n, k = _int(meta.get("out_features", 0)), _int(meta.get("in_features", 0))
        g = k if meta.get("group_size", -1) == -1 else _int(meta.get("group_size"))
        if n is None or k is None or g is None or min(n, k, g) < 0 or not finite(meta.get("bits", 8)):
            continue
        groups = n * (k // g) if g else 0
        weights += n * k
        stored += n * k * int(meta.get("bits", 8)) + groups * SCALE_BITS
        if not meta.get("symmetric", True):
            stored += groups * ZERO_BITS
    return stored / weights if weights else None


def _bits_per_weight(report: dict[str, Any], cfg: dict[str, Any] | None) -> float | None:
    stored = _num(report.get("bits_per_weight"))
    if stored is not None and stored > 0:
        return stored
    if cfg is None:
        return FULL_PRECISION_BITS
    q = report.get("quant")
    layers = q.get("layers") if isinstance(q, dict) else None
    return bits_from_layers(layers) if isinstance(layers, dict) else None


def _num(value: Any) -> float | None:
    """A finite number as float, else None (strings, bools, NaN, inf, ints too large for a float)."""
    return float(value) if finite(value) else None


def _int(value: Any) -> int | None:
    number = _num(value)
    return int(number) if number is not None else None


NUMBER_KEYS = (
    "val_ppl", "val_loss", "val_bpb", "reference_val_ppl", "ppl_vs_reference", "model_bytes", "checkpoint_bytes",
    "bits_per_weight", "decode_tokens_per_s", "elapsed_s", "bench_s", "step", "n_params",
)  # fmt: skip
"""report.json entries that must be numbers (or null) to be shown."""
TEXT_KEYS = ("mode", "model", "checkpoint")
OBJECT_KEYS = ("quant", "corpus")


def report_problems(rep: dict[str, Any]) -> list[str]:
    """The report.json entries of the wrong type or value, in words (their cells stay blank)."""
    wrong = [k for k in NUMBER_KEYS if rep.get(k) is not None and _num(rep[k]) is None]
    wrong += [k for k in TEXT_KEYS if rep.get(k) is not None and not isinstance(rep[k], str)]
    wrong += [k for k in OBJECT_KEYS if rep.get(k) is not None and not isinstance(rep[k], (dict, str))]
    return [f"{REPORT_FILE}: {', '.join(wrong)} of the wrong type or not finite"] if wrong else []


def _status(job: Job, notes: list[str]) -> tuple[str, bool]:
    """The status cell, and whether the row is a usable result; `notes` say what is wrong."""
    also = f"; {'; '.join(notes)}" if notes else ""
    if job.status is not None and not job.status.get("ok", job.status.get("exit_code") == 0):
        return f"failed (exit {job.status.get('exit_code', '?')}){also}", False
    if job.report is None:
        return ("; ".join(notes) or f"no {REPORT_FILE}"), False
    return f"ok{' (ignored: ' + '; '.join(notes) + ')' if notes else ''}", True


def _model_bytes(rep: dict[str, Any]) -> int | None:
    """``model_bytes``, or for reports older than it the size of the checkpoint's model file."""
    if (size := _int(rep.get("model_bytes"))) is not None:
        return size
    ckpt = rep.get("checkpoint")
    if not isinstance(ckpt, str) or not ckpt:
        return None
    try:
        file = Path(ckpt) / ck.MODEL_FILE
        return file.stat().st_size if file.is_file() else None
    except (OSError, ValueError):  # a garbled path in a garbled report
        return None


def _val_sha(rep: dict[str, Any]) -> str | None:
    corpus = rep.get("corpus")
    sha = corpus.get("val_sha256") if isinstance(corpus, dict) else None
    return sha if isinstance(sha, str) else None


def job_row(job: Job, label: str) -> Row:
    """The table row of one job (blank cells where the job has no such number, or a wrong one)."""
    rep = job.report or {}
    status, ok = _status(job, [*job.problems, *report_problems(rep)])
    cfg, _ = quant_config(rep) if rep else (None, None)
    recipe = QuantRecipe.from_config(cfg)  # None: full precision
    val_ppl = _num(rep.get("val_ppl"))
    ref = _num(rep.get("reference_val_ppl"))
    vs_ref = _num(rep.get("ppl_vs_reference"))
    if vs_ref is None and ref and val_ppl is not None:
        vs_ref = val_ppl / ref
    return Row(
        job=label,
        path=str(job.path),
        mode=_text(rep.get("mode")),
        model=_text(rep.get("model")),
        scheme=recipe.short_label if rep else "",
        method=method_label(rep) if rep else "",
        val_ppl=val_ppl,
        ppl_vs_reference=vs_ref,
        reference_val_ppl=ref,
        recovered_pct=None,
        model_bytes=_model_bytes(rep),
        checkpoint_bytes=_int(rep.get("checkpoint_bytes")),
        bits_per_weight=_bits_per_weight(rep, cfg) if rep else None,
        decode_tokens_per_s=_num(rep.get("decode_tokens_per_s")),
        elapsed_s=_num(rep.get("elapsed_s")),
        bench_s=_num(rep.get("bench_s")),
        status=status,
        ok=ok,
        val_corpus_sha256=_val_sha(rep),
        val_bpb=_num(rep.get("val_bpb")),
        scheme_key=scheme_key(recipe) if rep else [],
    )


def scheme_key(recipe: QuantRecipe) -> list[Any]:
    """What makes two runs' schemes the same (for matching QAT to PTQ), as report_table.json stores it."""
    return [FULL_PRECISION_LABEL] if recipe.full_precision else list(recipe.key)  # as report_table.json has it


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def broken_row(job: Job, label: str, err: Exception) -> Row:
    """The row of a job whose files are too garbled to make a row of: it says so, nothing else."""
    why = f"unusable {REPORT_FILE} ({type(err).__name__}: {str(err)[:200]})"
    blank: dict[str, Any] = dict.fromkeys(f.name for f in fields(Row) if f.default is MISSING_FIELD)
    blank.update(job=label, path=str(job.path), scheme="", method="", status="; ".join([*job.problems, why]))
    return Row(**{**blank, "ok": False})


def flag_corpora(rows: list[Row]) -> str | None:
    """Mark rows validated on another corpus than most; return the majority's SHA-256.

    Rows without a corpus fingerprint (runs older than it) are neither counted nor marked.
    """
    counts = Counter(r.val_corpus_sha256 for r in rows if r.val_corpus_sha256)
    if not counts:
        return None
    majority = counts.most_common(1)[0][0]  # ties: the first one seen
    for r in rows:
        r.corpus_differs = r.val_corpus_sha256 is not None and r.val_corpus_sha256 != majority
    return majority


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


def build_rows(jobs: list[Job]) -> list[Row]:
    """Rows for the jobs, with recovery filled in and other validation corpora marked."""
    rows = []
    for job, label in zip(jobs, job_labels(jobs), strict=True):
        try:
            rows.append(job_row(job, label))
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as err:  # one broken run, one row
            rows.append(broken_row(job, label, err))
    fill_recovery(rows)
    flag_corpora(rows)
    return rows
