"""A run's result: the keys every report.json has, what quantizing modes add, and writing it.

`report.json` is written last (rank 0, atomically) and printed as a two-column table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import nn

from qtrain import checkpoint as ck
from qtrain.config import EvalConfig
from qtrain.console import plain, rank
from qtrain.corpus import describe
from qtrain.evaluate import decode_speed, perplexity, prefill_speed
from qtrain.model import GPT
from qtrain.modes.context import RunContext, n_params_of, unwrap, val_bpb
from qtrain.quant.recipe import QuantRecipe
from qtrain.report_format import REPORT_FILE, fmt_entry, print_wide
from qtrain.rundir import write_atomic
from qtrain.tokenizer import byte_tokenizer


def base_report(
    ctx: RunContext,
    model: nn.Module,
    step: int,
    vloss: float | None,
    path: Path | None,
    quant: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The keys every report.json has (DESIGN.md section 2)."""
    gpt = unwrap(model)
    size = sum(f.stat().st_size for f in path.iterdir()) if path is not None else None
    return {
        "mode": ctx.cfg.mode.name,
        "quant": quant,
        "model": gpt.cfg.name,
        "n_params": n_params_of(gpt),
        "step": step,
        "val_loss": vloss,
        "val_ppl": perplexity(vloss) if vloss is not None else None,
        "val_bpb": val_bpb(ctx, vloss),
        "tokenizer": (ctx.tokenizer or byte_tokenizer()).manifest_section(),
        "checkpoint": str(path) if path is not None else None,
        "checkpoint_bytes": size,
        "model_bytes": model_bytes(path),
        "corpus": ctx.corpus,
        **(ctx.memory or {}),
        "elapsed_s": round(time.perf_counter() - ctx.t0, 3),
    }


def model_bytes(path: Path | None) -> int | None:
    """Size of a checkpoint's ``model.safetensors``: the model a user deploys, without trainer state."""
    file = path / ck.MODEL_FILE if path is not None else None
    return file.stat().st_size if file is not None and file.is_file() else None


def benchmark(model: GPT, ev: EvalConfig, prefill: bool = True) -> dict[str, Any]:
    """Decode (and prefill) speed per `eval.*`, with the seconds they took as ``bench_s``.

    ``bench_s`` is part of the run's ``elapsed_s`` and shown apart so runs compare fairly.
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if ev.decode_tokens > 0:
        out.update(decode_speed(model, ev.decode_tokens, ev.decode_repeats))
    if prefill and ev.prefill_tokens > 0:
        out.update(prefill_speed(model, ev.prefill_tokens, ev.decode_repeats))
    if out:
        out["bench_s"] = round(time.perf_counter() - t0, 3)
    return out


def quant_report(
    ctx: RunContext,
    model: nn.Module,
    step: int,
    vloss: float,
    path: Path | None,
    recipe: QuantRecipe,
    method: str | None,
    ref_loss: float | None,
) -> dict[str, Any]:
    """`base_report` of a quantized result (`quant`: its config and method), with bits, speed and reference."""
    report = base_report(ctx, model, step, vloss, path, {**asdict(recipe.config), "method": method})
    report.update(QuantRecipe.bits_report(model))
    if isinstance(model, GPT):  # the shipped (packed) model's decode speed, timed as bench_s
        report.update(benchmark(model, ctx.cfg.eval, prefill=False))
    if ref_loss is not None:
        report["reference_val_loss"] = ref_loss
        report["reference_val_ppl"] = perplexity(ref_loss)
        report["reference_val_bpb"] = val_bpb(ctx, ref_loss)
        report["ppl_vs_reference"] = perplexity(vloss) / perplexity(ref_loss)
    return report


def summary_table(report: dict[str, Any], title: str = "qtrain run") -> Table:
    """A two-column table of the report's entries."""
    table = Table(title=plain(title), show_header=True, header_style="bold")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in report.items():
        if key in ("layers",):
            continue
        text = describe(value) if key == "corpus" and isinstance(value, dict) else fmt_entry(value)
        if key == "tokenizer" and isinstance(value, dict):
            text = f"{value.get('kind')} (vocab {value.get('vocab_size')})"
        table.add_row(plain(key), plain(text))  # paths, prompts, generated text: never markup
    return table


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    """Write `report.json` atomically (rank 0 only) and print the summary table.

    Raises:
        ConfigError: `report.json` or its temporary is a planted link or not a regular file.
    """
    path = run_dir / REPORT_FILE
    if rank() != 0:
        return path
    write_atomic(path, json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")  # never through a link
    print_wide(summary_table(report, title=f"qtrain {report.get('mode', '')}"))
    return path
