"""The table of modes: name -> function(RunContext) -> report; `run` dispatches and reports.

`qtrain.cli` composes and validates the config, builds the `RunContext` and calls `run`.

`run` holds the run directory's lock for the whole job (one writer per run dir, see
`qtrain.runlock`; DDP: rank 0), checks before any work that no file this mode writes is a planted
link or the wrong kind of file, and that nothing of an earlier run would be lost silently:
a fresh start (`resume=never`; `mode=ptq`, which never resumes) in a run dir that holds
checkpoints is refused unless `overwrite=true` discards them, and a mode never writes its
checkpoints into the run dir its `init_from` checkpoint lives in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qtrain import checkpoint as ck
from qtrain import rundir, runlock
from qtrain.console import plain_logging, rank, warn
from qtrain.errors import ConfigError
from qtrain.modes.context import RunContext
from qtrain.modes.eval import run_eval
from qtrain.modes.export import run_export
from qtrain.modes.finetune import run_finetune
from qtrain.modes.generate import run_generate
from qtrain.modes.ptq import run_ptq
from qtrain.modes.qat import run_qat
from qtrain.modes.report import TABLE_FILE, run_report
from qtrain.modes.results import write_report
from qtrain.modes.sweep_jobs import METRICS_FILE, STATUS_FILE
from qtrain.modes.sweep_plot import PLOT_FILE
from qtrain.modes.train import run_train
from qtrain.modes.upgrade import run_upgrade
from qtrain.modes.verify import run_verify
from qtrain.report_format import REPORT_FILE

MODES: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    "train": run_train,
    "eval": run_eval,
    "generate": run_generate,
    "ptq": run_ptq,
    "qat": run_qat,
    "finetune": run_finetune,
    "report": run_report,
    "verify": run_verify,
    "upgrade": run_upgrade,
    "export": run_export,
}


def run(ctx: RunContext) -> dict[str, Any]:
    """Dispatch to the mode function and write report.json."""
    fn = MODES.get(ctx.cfg.mode.name)
    if fn is None:
        raise ConfigError(f"mode: '{ctx.cfg.mode.name}' is not available; choose one of {sorted(MODES)}")
    rundir.make_dirs(ctx.run_dir, "hydra.run.dir")
    with runlock.hold(ctx.run_dir) if rank() == 0 else contextlib.nullcontext():  # DDP: rank 0 writes
        prepare_run_dir(ctx)
        with plain_logging():  # qtrain's log records as plain lines, not under Hydra's [HYDRA] root handler
            report = fn(ctx)
        if "elapsed_s" in report:  # the whole run, measured last: benchmarks included (shown apart as bench_s)
            report["elapsed_s"] = round(time.perf_counter() - ctx.t0, 3)
        report.setdefault("threads", torch.get_num_threads())  # the CPU threads this run used (`threads`)
        report.setdefault("omp_wait_policy", os.environ.get("OMP_WAIT_POLICY", "default"))  # see qtrain.runtime
        write_report(ctx.run_dir, report)
    return report


# ---------------------------------------------------------------- before any work

CHECKPOINT_WRITERS = ("train", "qat", "finetune", "ptq")
"""Modes that write checkpoints (and metrics.jsonl) into their run dir."""


def prepare_run_dir(ctx: RunContext) -> None:
    """Refuse planted links and wrong kinds of files among this mode's outputs; lose nothing silently.

    Raises:
        ConfigError: a planted link or wrong kind of file (named), `init_from` inside this
            run's checkpoints, or a fresh start over an earlier run's checkpoints without
            `overwrite=true`.
    """
    mode, run = ctx.cfg.mode.name, ctx.run_dir
    names = [REPORT_FILE, STATUS_FILE]
    if mode == "report":
        names += [TABLE_FILE, PLOT_FILE]
    if mode in CHECKPOINT_WRITERS:
        names.append(METRICS_FILE)
        rundir.check_dir(ctx.ckpt_root)
        rundir.check_file(ctx.ckpt_root / ck.LATEST)
    for name in names:
        rundir.check_file(run / name)
        rundir.check_file(run / (name + rundir.TMP_SUFFIX))
    if mode in CHECKPOINT_WRITERS:
        _refuse_own_init_from(ctx)
        _refuse_or_discard_earlier(ctx)


def _refuse_own_init_from(ctx: RunContext) -> None:
    """A mode never writes checkpoints next to (replacing, or pruning) the checkpoint it starts from."""
    if not ctx.cfg.init_from:
        return
    src = Path(str(ctx.cfg.init_from)).expanduser().resolve()
    run = ctx.run_dir.resolve()
    if src in (run, run / "checkpoints") or (run / "checkpoints") in src.parents:
        again = (
            ""
            if ctx.cfg.mode.name == "ptq"
            else " (to continue this run's training: the same command without init_from)"
        )
        raise ConfigError(
            f"init_from: {ctx.cfg.init_from} is in this run's own directory {ctx.run_dir}; mode={ctx.cfg.mode.name} "
            f"writes its checkpoints there and could replace or prune the checkpoint it reads. Choose another "
            f"hydra.run.dir{again}"
        )


def _earlier_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [*ck.list_step_dirs(root), *[p for p in (root / ck.LATEST,) if p.exists()]]


def _refuse_or_discard_earlier(ctx: RunContext) -> None:
    """A fresh start (`resume=never`, or `mode=ptq`) over checkpoints: refused, or discarded with `overwrite=true`."""
    cfg, root = ctx.cfg, ctx.ckpt_root
    fresh = cfg.mode.name == "ptq" or cfg.resume == "never"
    earlier = _earlier_checkpoints(root) if fresh else []
    if not earlier:
        return
    listed = ", ".join(p.name for p in earlier)
    if not cfg.overwrite:
        ptq = cfg.mode.name == "ptq"
        what = "mode=ptq writes its result" if ptq else "resume=never starts over"
        keep = "" if ptq else "resume=auto (continue that run) or "
        raise ConfigError(
            f"{root} holds checkpoints of an earlier run ({listed}) and {what} there, which would replace or prune "
            f"them. Keep them with {keep}a new hydra.run.dir; discard them with {what.split()[0]} overwrite=true"
        )
    if rank() != 0:
        return
    gone = [*earlier, *(p for p in (ctx.run_dir / METRICS_FILE, ctx.run_dir / REPORT_FILE) if p.is_file())]
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    warn(f"overwrite=true: discarded the earlier run in {ctx.run_dir}: {', '.join(p.name for p in gone)}")
