"""The `qtrain` entrypoint: compose with Hydra, validate, dispatch, map errors to exit codes.

Before Hydra creates a run or sweep directory, the run (or every job of a `-m` sweep) is
composed and validated (`qtrain.precheck`): typos, unknown group options, out-of-range values,
`device=cuda` without CUDA and hooks that cannot be built are all reported together with exit
code 2, and no directory is created. `--version`, `--help` and tab completion never import
torch (`qtrain.cli_flags`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qtrain import cli_flags, runlock, runtime
from qtrain.config import RunConfig, register_configs
from qtrain.config_rules import validate
from qtrain.console import console, err_console, error, plain, rank
from qtrain.errors import (
    EXIT_BUG,
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_RESOURCES,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ConfigError,
    Interrupted,
    NonFiniteError,
    Preempted,
    QtrainError,
)
from qtrain.modes import sweep_jobs
from qtrain.precheck import CONF_MODULE, fail, precheck  # noqa: F401 - fail: part of the CLI's API

DISTRIBUTED_MODES = ("train", "qat", "finetune")
_failures: list[dict[str, Any]] = []
_started: list[bool] = []
_jobs: list[dict[str, Any]] = []
_sweep_dir: list[Path] = []
_sweep_stopped: list[int] = []
"""Set (to 130/143) when a multirun job or the sweep got SIGINT/SIGTERM: later jobs are skipped, not run."""
STOP_CODES = (EXIT_SIGINT, EXIT_SIGTERM)


# ---------------------------------------------------------------- running one job


def _cleanup_empty_run_dir(run_dir: Path) -> None:
    """Remove a run dir that holds nothing but Hydra's bookkeeping (a refused start)."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


def _nonfinite_message(err: NonFiniteError, run_dir: Path) -> str:
    from qtrain.checkpoint import find_latest_valid

    last, _ = find_latest_valid(run_dir / "checkpoints")
    return (
        f"{err}. Training stopped before the optimizer step; last good checkpoint: "
        f"{last if last is not None else 'none (nothing saved yet)'}. Try a lower train.lr or train.grad_clip."
    )


_OOM_TEXT = re.compile(r"DefaultCPUAllocator|(can't|cannot) allocate memory|not enough memory|out of memory", re.I)
"""What the allocators' RuntimeErrors say when memory runs out (CPU: ``DefaultCPUAllocator: can't
allocate memory: you tried to allocate N bytes``; MPS and others: ``... out of memory``)."""


def _is_oom(err: BaseException) -> bool:
    """Whether `err` is an allocator's out-of-memory error (by type, or a RuntimeError by its text)."""
    return (
        isinstance(err, MemoryError)
        or type(err).__name__ == "OutOfMemoryError"
        or bool(isinstance(err, RuntimeError) and _OOM_TEXT.search(str(err)))
    )


def _oom_message(cfg: RunConfig, ctx: Any = None, device: str = "cpu") -> str:
    """Exit-5 advice: the sizes in use and the overrides that reduce memory (no traceback)."""
    model = getattr(ctx, "memory_model", None) or cfg.model
    mem = getattr(ctx, "memory", None) or {}
    estimate = ""
    if mem:
        need, avail = mem["memory_estimate_bytes"] / 1e9, mem["memory_available_bytes"] / 1e9
        estimate = f"; qtrain estimated {need:.2f} GB of the {avail:.2f} GB available"
    fixes = [
        "train.batch_size=<smaller> and train.grad_accum=<larger> (the same sequences per step)",
        "train.activation_checkpointing=true (recompute activations in the backward pass)",
        "a smaller model.block_size (a new model)",
    ]
    if cfg.mode.name not in DISTRIBUTED_MODES:  # ptq, eval, generate: calibration and validation batches
        fixes = ["fewer ptq.calib_batches or a smaller train.batch_size (GPTQ calibration)", *fixes[2:]]
    fixes.append("fewer data.val_windows (validation runs min(32, data.val_windows) windows at once)")
    return (
        f"out of memory with train.batch_size={cfg.train.batch_size} and model.block_size={model.block_size} "
        f"(mode={cfg.mode.name}, model={model.name}{estimate}). Reduce memory with "
        + "; ".join(fixes)
        + ("; or device=cpu" if device == "cuda" else "")
        + "."
    )


def execute(cfg: RunConfig, run_dir: Path, overrides: list[str] | None = None) -> int:
    """Run one job in `run_dir`; return its exit code (messages printed, never raised)."""
    import torch

    from qtrain import distributed
    from qtrain.modes.context import RunContext
    from qtrain.modes.dispatch import run

    problems = validate(cfg)
    if problems:
        error("invalid configuration:\n  - " + "\n  - ".join(problems))
        _cleanup_empty_run_dir(run_dir)
        return EXIT_CONFIG
    distributed.init(cfg.device)  # no-op unless torchrun/SLURM started several processes
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if use_cuda else "cpu")
    if distributed.is_distributed() and cfg.mode.name not in DISTRIBUTED_MODES and rank() != 0:
        return EXIT_OK  # ptq / eval / generate / tools run on rank 0 alone
    torch.manual_seed(cfg.seed)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=device, overrides=list(overrides or []))
    stopper = runtime.SignalStop(lambda _: ctx.stop.set())  # SIGINT/SIGTERM: see qtrain.runtime
    previous = runtime.install(stopper)
    threads_before = torch.get_num_threads()
    try:
        if _sweep_stopped:  # the signal came while this sweep job was starting: it is skipped like the rest
            return _sweep_stopped[0]
        torch.set_num_threads(_threads(cfg))
        run(ctx)
        return stopper.exit_code or (EXIT_SIGTERM if ctx.stop.is_set() else EXIT_OK)
    except Interrupted as err:
        error(str(err), "stopped")
        return err.exit_code
    except Preempted as err:
        code = stopper.exit_code or err.exit_code
        error(_preempted_message(err, code), "stopped")
        return code
    except NonFiniteError as err:
        error(_nonfinite_message(err, run_dir))
        return err.exit_code
    except QtrainError as err:
        error(str(err))
        if isinstance(err, ConfigError):
            _cleanup_empty_run_dir(run_dir)
        return err.exit_code
    except (ValueError, MemoryError, RuntimeError, OSError) as err:
        failure = _user_failure(err, cfg, ctx, run_dir, device.type)
        if failure is None:  # a bug: the traceback is shown (`_task`)
            raise
        return failure
    finally:
        runtime.restore(previous)
        torch.set_num_threads(threads_before)


def _user_failure(err: Exception, cfg: RunConfig, ctx: Any, run_dir: Path, device: str) -> int | None:
    """Print the message of a data error, out-of-memory or full disk and return its exit code; None for a bug."""
    if isinstance(err, ValueError):  # DataError and config checks raised below the CLI
        from qtrain.data import DataError

        if not isinstance(err, DataError):
            return None
        error(str(err))
        _cleanup_empty_run_dir(run_dir)
        return EXIT_CONFIG
    if isinstance(err, (MemoryError, RuntimeError)):  # torch.OutOfMemoryError, the CPU allocator's RuntimeError
        if not _is_oom(err):
            return None
        error(_oom_message(cfg, ctx, device))
        return EXIT_RESOURCES
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        error(f"disk full: {err}")
        return EXIT_RESOURCES
    return None


def _threads(cfg: RunConfig) -> int:
    """The run's thread count (``threads``), with a warning when it exceeds the usable cores."""
    n, cores = runtime.resolve_threads(cfg.threads), runtime.available_cores()
    if n > cores:
        err_console.print(
            f"[yellow]warning:[/yellow] threads={n} exceeds the {cores} core(s) this process may run on; "
            f"threads compete for cores (slower, noisier timings). threads=auto uses {runtime.auto_threads()}"
        )
    return n


def _preempted_message(err: Preempted, code: int) -> str:
    """The trainer's "SIGTERM at step N: ..." naming the signal that actually came."""
    return str(err).replace("SIGTERM", runtime.signal_name(code), 1)


def _task(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    _started.append(True)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if _sweep_stopped:  # an earlier job of this sweep, or the sweep, was stopped by SIGINT/SIGTERM
        stop = _sweep_stopped[0]
        err_console.print(plain(f"skipped after {runtime.signal_name(stop)}: {' '.join(overrides)}"))
        sweep_jobs.write_status(run_dir, stop, overrides)
        _jobs.append({"dir": str(run_dir), "exit_code": stop, "ok": False, "overrides": overrides, "skipped": True})
        _failures.append({"dir": str(run_dir), "exit_code": stop, "overrides": overrides})
        return
    try:
        cfg = OmegaConf.to_object(dcfg)
        assert isinstance(cfg, RunConfig)
        code = execute(cfg, run_dir, overrides)
    except Interrupted as err:  # a signal before execute took over (composing this job's config)
        error(str(err), "stopped")
        code = err.exit_code
    except Exception:  # noqa: BLE001 - a bug: show it, record it, keep sweeps going
        traceback.print_exc()
        code = EXIT_BUG
    if hc.mode == RunMode.MULTIRUN:
        sweep_jobs.write_status(run_dir, code, overrides)
        _jobs.append({"dir": str(run_dir), "exit_code": code, "ok": code == EXIT_OK, "overrides": overrides})
        _sweep_dir[:] = [Path(hc.sweep.dir)]
        if code != EXIT_OK:
            _failures.append({"dir": str(run_dir), "exit_code": code, "overrides": overrides})
        if code in STOP_CODES and not _sweep_stopped:  # a stop request ends the sweep, not only this job
            _sweep_stopped.append(code)
        return
    if run_dir.exists():
        sweep_jobs.write_status(run_dir, code, overrides)
    if code != EXIT_OK:
        sys.exit(code)


def _stop_sweep(code: int) -> None:
    if not _sweep_stopped:
        _sweep_stopped.append(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entrypoint (`qtrain ...`).

    SIGINT/SIGTERM outside a job (start-up, between the jobs of a sweep) are handled here;
    inside a job, `execute`'s handler takes over (see `qtrain.runtime`).
    """
    argv = sys.argv[1:] if argv is None else argv
    _started.clear()  # fresh per call: tests and notebooks call main() repeatedly in one process
    _failures.clear()
    _jobs.clear()
    _sweep_dir.clear()
    _sweep_stopped.clear()
    sweep = bool({"-m", "--multirun"}.intersection(argv))
    note = "the sweep stops; jobs not started are skipped"
    guard = runtime.SignalStop(_stop_sweep if sweep else None, only_in_training=False, note=note)
    previous = runtime.install(guard)
    # Before torch is imported. Not printed (it would be the first line of every command,
    # --version and tab completion included); report.json records it as `omp_wait_policy`.
    runtime.openmp_wait_policy()
    try:
        _main(argv)
    except Interrupted as err:
        error(str(err), "stopped")
        sys.exit(err.exit_code)
    finally:
        runtime.restore(previous)


def _before_hydra(flags: cli_flags.Flags, argv: list[str]) -> tuple[list[str], Path | None, str | None]:
    """Check the run (exit 2 on problems); pick a scratch run dir or a distributed one.

    Returns:
        The argv Hydra gets, the scratch run dir to remove afterwards (or None), the mode.
    """
    scratch: Path | None = None
    mode: str | None = None
    if flags.precheck:
        configs = precheck(flags.overrides, flags.multirun)
        mode = configs[0].mode.name if configs and configs[0] is not None else None
        if rank() == 0:  # before Hydra writes .hydra/ there: no planted links, no live holder
            try:
                runlock.check_named_dirs(flags.overrides, flags.multirun)
            except ConfigError as err:
                fail(str(err))  # plain text: fail never reads markup
        if flags.scratch(mode):  # eval/generate/verify: no outputs/DATE/TIME unless asked (cli_flags)
            scratch = Path(tempfile.mkdtemp(prefix=f"qtrain-{mode}-"))
            argv = [*argv, f"hydra.run.dir={scratch}"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from qtrain import distributed  # imports torch: only for torchrun/SLURM launches

        if distributed.env_world_size() > 1:
            device = next((a.split("=", 1)[1] for a in argv if a.startswith("device=")), "auto")
            distributed.init(device)
            argv = distributed.shared_run_dir(argv)
    return argv, scratch, mode


def _answered(flags: cli_flags.Flags) -> bool:
    """Answer `--version` and `--help` here (fast, no torch); check `--cfg`/`--info` overrides.

    Returns:
        True when the command is done.
    """
    if flags.version:  # before Hydra, which would print only its own version
        console.print(cli_flags.version_line(), markup=False)
        return True
    register_configs()
    cli_flags.register_help()
    if flags.help and not flags.own_config:  # one composition, not Hydra's listing of every group
        cli_flags.print_help(flags.overrides, flags.resolve)
        return True
    if flags.shows_config and not flags.own_config:  # typos get qtrain's message, not Hydra's
        precheck(flags.overrides, flags.multirun, values=False)
    return False


def _main(argv: list[str]) -> None:
    flags = cli_flags.parse_flags(argv)
    if _answered(flags):
        return
    import hydra

    argv, scratch, mode = _before_hydra(flags, argv)
    sys.argv = [sys.argv[0] if sys.argv else "qtrain", *argv]
    wrapped = hydra.main(version_base=None, config_path="pkg://" + CONF_MODULE, config_name="config")(_task)
    try:
        with cli_flags.completion_output() if flags.completion else contextlib.nullcontext():
            wrapped()
    except SystemExit as exit_:
        if exit_.code == 1 and not _started:  # Hydra's own composition errors exit 1
            sys.exit(EXIT_CONFIG)
        raise
    finally:
        if "qtrain.distributed" in sys.modules:  # a process group may have been joined
            sys.modules["qtrain.distributed"].finish()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if scratch is not None and rank() == 0:
        note = f"note: mode={mode} kept no run directory; pass hydra.run.dir=DIR to keep report.json"
        err_console.print(plain(note, "dim"))
    if _jobs and rank() == 0:
        sweep_dir = _sweep_dir[0] if _sweep_dir else Path(_jobs[0]["dir"]).parent
        try:
            sweep_jobs.write_sweep_status(sweep_dir, _jobs, len(_failures))
        except ConfigError as err:  # a planted link or a directory in its place: refused, never written through
            error(str(err))
            if not _failures:
                sys.exit(EXIT_CONFIG)
    if _sweep_stopped and not _failures:  # stopped after the last job had finished: still not a clean exit
        sys.exit(_sweep_stopped[0])
    if _failures:
        err_console.print(f"[bold red]{len(_failures)} job(s) failed:[/bold red]")
        for f in _failures:
            err_console.print(plain(f"  exit {f['exit_code']}: {' '.join(f['overrides'])}  ({f['dir']})"))
        sys.exit(_sweep_stopped[0] if _sweep_stopped else _failures[0]["exit_code"])
