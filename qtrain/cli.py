"""The `qtrain` entrypoint: compose with Hydra, validate, dispatch, map errors to exit codes.

Before Hydra creates a run directory, a plain (non-multirun) invocation is composed once
and validated: typos, unknown group options and out-of-range values are all reported
together with exit code 2, and no directory is created.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qtrain import distributed
from qtrain.config import RunConfig, register_configs, validate
from qtrain.console import err_console, rank
from qtrain.errors import (
    EXIT_BUG,
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_RESOURCES,
    EXIT_SIGTERM,
    ConfigError,
    NonFiniteError,
    QtrainError,
)

CONF_MODULE = "qtrain.conf"
NO_PRECHECK_FLAGS = {
    "-m",
    "--multirun",
    "--cfg",
    "-c",
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--version",
    "--resolve",
    "-p",
    "--package",
}
STATUS_FILE = "status.json"
DISTRIBUTED_MODES = ("train", "qat", "finetune")
_failures: list[dict[str, Any]] = []
_started: list[bool] = []
_jobs: list[dict[str, Any]] = []
_sweep_dir: list[Path] = []
_sweep_stopped: list[bool] = []
"""Set when a multirun job ended on SIGTERM: the jobs after it are skipped, not run."""


def conf_dir() -> Path:
    """The shipped config directory (`qtrain.conf`)."""
    import qtrain.conf

    return Path(qtrain.conf.__file__).parent


def group_options(group: str) -> list[str]:
    """The YAML options of a config group, as users type them."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def fail(message: str, code: int) -> None:
    """Print one clear error paragraph and exit with `code`."""
    err_console.print(f"[bold red]error:[/bold red] {message}", markup=True, highlight=False)
    sys.exit(code)


# ---------------------------------------------------------------- pre-validation


def _overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-")]


def _explain_composition_error(err: Exception, overrides: list[str]) -> str:
    text = str(err).strip()
    missing = re.search(r"Could not (?:find|load) '([\w/]+)/([\w.-]+)'", text)
    if missing:
        group, opt = missing.group(1), missing.group(2)
        return f"{group}={opt}: no such option in group '{group}'; valid choices: {', '.join(group_options(group))}"
    key = re.search(r"Key '([\w]+)' (?:is )?not in '(\w+)'", text) or re.search(r"Could not override '([\w.]+)'", text)
    if key:
        bad = next((o.split("=")[0].lstrip("+~") for o in overrides if key.group(1) in o.split("=")[0]), key.group(1))
        parent, _, leaf = bad.rpartition(".")
        valid = _valid_keys(parent)
        close = difflib.get_close_matches(leaf, valid, n=3)
        hint = f" Did you mean {', '.join(f'{parent}.{c}' if parent else c for c in close)}?" if close else ""
        return f"{bad}: unknown config key.{hint} Valid keys{' of ' + parent if parent else ''}: {', '.join(valid)}"
    return text.splitlines()[0] if text else type(err).__name__


def _valid_keys(parent: str) -> list[str]:
    node: Any = OmegaConf.structured(RunConfig)
    for part in filter(None, parent.split(".")):
        node = node.get(part) if isinstance(node, DictConfig) else None
    node = node if isinstance(node, DictConfig) else OmegaConf.structured(RunConfig)
    return sorted(str(k) for k in node)


def _check_writable(run_dir: str) -> str | None:
    p = Path(run_dir).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK):
        return f"hydra.run.dir: output directory {run_dir} is not writable ({p} is not a writable directory)"
    return None


def precheck(argv: list[str]) -> None:
    """Compose and validate like the real run; on problems print them all and exit 2."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = _overrides(argv)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONF_MODULE, version_base=None):
            dcfg = compose("config", overrides=overrides, return_hydra_config=True)
            run_dir = str(dcfg.hydra.run.dir)
            OmegaConf.set_struct(dcfg, False)
            dcfg.pop("hydra")
            cfg = OmegaConf.to_object(dcfg)
    except Exception as err:  # noqa: BLE001 - every composition failure is a user error here
        fail(_explain_composition_error(err, overrides), EXIT_CONFIG)
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(cfg, RunConfig)
    problems = validate(cfg)
    if (msg := _check_writable(run_dir)) is not None:
        problems.append(msg)
    if problems:
        listed = "\n  - ".join(problems)
        fail(
            f"invalid configuration ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  - {listed}",
            EXIT_CONFIG,
        )


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


def _oom_message(cfg: RunConfig) -> str:
    return (
        f"out of memory with train.batch_size={cfg.train.batch_size} and model.block_size={cfg.model.block_size} "
        f"(model={cfg.model.name}). Reduce memory with train.batch_size=<smaller> and train.grad_accum=<larger> "
        f"(same effective batch), a smaller model.block_size, or device=cpu."
    )


def execute(cfg: RunConfig, run_dir: Path, overrides: list[str] | None = None) -> int:
    """Run one job in `run_dir`; return its exit code (messages printed, never raised)."""
    import torch

    from qtrain.modes import run
    from qtrain.runner import RunContext

    problems = validate(cfg)
    if problems:
        err_console.print("[bold red]error:[/bold red] invalid configuration:\n  - " + "\n  - ".join(problems))
        _cleanup_empty_run_dir(run_dir)
        return EXIT_CONFIG
    distributed.init(cfg.device)  # no-op unless torchrun/SLURM started several processes
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if use_cuda else "cpu")
    if distributed.is_distributed() and cfg.mode.name not in DISTRIBUTED_MODES and rank() != 0:
        return EXIT_OK  # ptq / eval / generate / tools run on rank 0 alone
    torch.manual_seed(cfg.seed)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=device, overrides=list(overrides or []))
    previous = signal.signal(signal.SIGTERM, lambda *_: ctx.stop.set())
    try:
        run(ctx)
        return EXIT_SIGTERM if ctx.stop.is_set() else EXIT_OK
    except NonFiniteError as err:
        err_console.print(f"[bold red]error:[/bold red] {_nonfinite_message(err, run_dir)}")
        return err.exit_code
    except QtrainError as err:
        err_console.print(f"[bold red]error:[/bold red] {err}")
        if isinstance(err, ConfigError):
            _cleanup_empty_run_dir(run_dir)
        return err.exit_code
    except ValueError as err:  # DataError and config checks raised below the CLI
        from qtrain.data import DataError

        if not isinstance(err, DataError):
            raise
        err_console.print(f"[bold red]error:[/bold red] {err}")
        _cleanup_empty_run_dir(run_dir)
        return EXIT_CONFIG
    except (torch.cuda.OutOfMemoryError, MemoryError):
        err_console.print(f"[bold red]error:[/bold red] {_oom_message(cfg)}")
        return EXIT_RESOURCES
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        err_console.print(f"[bold red]error:[/bold red] disk full: {err}")
        return EXIT_RESOURCES
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_status(run_dir: Path, code: int, overrides: list[str]) -> None:
    if rank() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    status = {"exit_code": code, "ok": code == 0, "overrides": overrides}
    (run_dir / STATUS_FILE).write_text(json.dumps(status, indent=2) + "\n")


def _task(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    _started.append(True)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if _sweep_stopped:  # an earlier job of this sweep was stopped by SIGTERM
        err_console.print(f"skipped after SIGTERM: {' '.join(overrides)}")
        _write_status(run_dir, EXIT_SIGTERM, overrides)
        _jobs.append(
            {"dir": str(run_dir), "exit_code": EXIT_SIGTERM, "ok": False, "overrides": overrides, "skipped": True}
        )
        _failures.append({"dir": str(run_dir), "exit_code": EXIT_SIGTERM, "overrides": overrides})
        return
    try:
        cfg = OmegaConf.to_object(dcfg)
        assert isinstance(cfg, RunConfig)
        code = execute(cfg, run_dir, overrides)
    except Exception:  # noqa: BLE001 - a bug: show it, record it, keep sweeps going
        traceback.print_exc()
        code = EXIT_BUG
    if hc.mode == RunMode.MULTIRUN:
        _write_status(run_dir, code, overrides)
        _jobs.append({"dir": str(run_dir), "exit_code": code, "ok": code == EXIT_OK, "overrides": overrides})
        _sweep_dir[:] = [Path(hc.sweep.dir)]
        if code != EXIT_OK:
            _failures.append({"dir": str(run_dir), "exit_code": code, "overrides": overrides})
        if code == EXIT_SIGTERM:  # a stop request ends the sweep, not only this job
            _sweep_stopped.append(True)
        return
    if run_dir.exists():
        _write_status(run_dir, code, overrides)
    if code != EXIT_OK:
        sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entrypoint (`qtrain ...`)."""
    import hydra

    argv = sys.argv[1:] if argv is None else argv
    _started.clear()  # fresh per call: tests and notebooks call main() repeatedly in one process
    _failures.clear()
    _jobs.clear()
    _sweep_dir.clear()
    _sweep_stopped.clear()
    register_configs()
    if not NO_PRECHECK_FLAGS.intersection(argv):
        precheck(argv)
    if distributed.env_world_size() > 1:
        device = next((a.split("=", 1)[1] for a in argv if a.startswith("device=")), "auto")
        distributed.init(device)
        argv = distributed.shared_run_dir(argv)
    sys.argv = [sys.argv[0] if sys.argv else "qtrain", *argv]
    wrapped = hydra.main(version_base=None, config_path="pkg://" + CONF_MODULE, config_name="config")(_task)
    try:
        wrapped()
    except SystemExit as exit_:
        if exit_.code == 1 and not _started:  # Hydra's own composition errors exit 1
            sys.exit(EXIT_CONFIG)
        raise
    finally:
        distributed.finish()
    if _jobs and rank() == 0:
        sweep_dir = _sweep_dir[0] if _sweep_dir else Path(_jobs[0]["dir"]).parent
        summary = {"jobs": _jobs, "failed": len(_failures), "succeeded": len(_jobs) - len(_failures)}
        (sweep_dir / "sweep_status.json").write_text(json.dumps(summary, indent=2) + "\n")
    if _failures:
        err_console.print(f"[bold red]{len(_failures)} job(s) failed:[/bold red]")
        for f in _failures:
            err_console.print(f"  exit {f['exit_code']}: {' '.join(f['overrides'])}  ({f['dir']})")
        sys.exit(_failures[0]["exit_code"])
