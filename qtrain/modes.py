"""The table of modes: name -> function(RunContext) -> report; `run` dispatches and reports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtrain.ckpt_tools import CHECKPOINT_MODES
from qtrain.errors import ConfigError
from qtrain.quant_modes import run_finetune, run_ptq, run_qat
from qtrain.report import write_report
from qtrain.runner import BASE_MODES, RunContext
from qtrain.sweep_report import run_report

MODES: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    **BASE_MODES,
    "ptq": run_ptq,
    "qat": run_qat,
    "finetune": run_finetune,
    "report": run_report,
    **CHECKPOINT_MODES,
}


def run(ctx: RunContext) -> dict[str, Any]:
    """Dispatch to the mode function and write report.json."""
    fn = MODES.get(ctx.cfg.mode.name)
    if fn is None:
        raise ConfigError(f"mode: '{ctx.cfg.mode.name}' is not available; choose one of {sorted(MODES)}")
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    report = fn(ctx)
    write_report(ctx.run_dir, report)
    return report
