"""Ctrl-C: SIGINT is handled like SIGTERM (issue 12 item 3; RELIABILITY.md cases 7 and 42).

Real signals go to `qtrain` children (`child.py`) paused at an exact point: during training
the first signal finishes the step, saves and exits 130; a second one, or one outside
training, ends the run at once; never a traceback.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.reliability.conftest import (
    assert_same_weights,
    execute,
    losses,
    qtrain,
    start_child,
    step_names,
    train_args,
    wait_for_file,
)


def _status(run: Path) -> dict[str, object]:
    return json.loads((run / "status.json").read_text())


pytestmark = pytest.mark.usefixtures("catchable_sigint")  # tests/reliability/conftest.py


def _signal_at_step(
    args: list[str], step: int, tmp: Path, sig: int, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], Path]:
    """Start a child, wait until it completes `step`, send it `sig`; returns (child, ready file)."""
    ready = tmp / f"ready-{step}"
    proc = start_child(
        args, {"QTRAIN_TEST_PAUSE_AT_STEP": str(step), "QTRAIN_TEST_READY_FILE": str(ready), **(env or {})}
    )
    wait_for_file(ready, proc)
    proc.send_signal(sig)
    return proc, ready


@pytest.fixture(scope="module")
def ctrl_c(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An 8-step run stopped by a real SIGINT after step 4, then the same command run again."""
    tmp = tmp_path_factory.mktemp("ctrl_c")
    run = tmp / "run"
    args = train_args(run, 8, "train.log_every=1", "train.save_every=0")
    proc, _ = _signal_at_step(args, 4, tmp, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    stopped = {"code": proc.returncode, "err": err, "steps": step_names(run / "checkpoints"), "status": _status(run)}
    return {"run": run, "stop": stopped, "resume_code": qtrain(args)}


def test_sigint_saves_exits_130_and_the_resumed_run_is_bit_identical(
    ctrl_c: dict[str, object], reference: Path
) -> None:
    stop = ctrl_c["stop"]
    assert isinstance(stop, dict)
    assert stop["code"] == 130, stop["err"]
    assert "Traceback" not in stop["err"]
    assert "SIGINT at step 4: checkpoint saved" in stop["err"]
    assert stop["steps"] == ["step_0000004"]  # the running step finished and was saved
    assert stop["status"]["exit_code"] == 130
    assert ctrl_c["resume_code"] == 0
    run = ctrl_c["run"]
    assert isinstance(run, Path)
    assert losses(run) == losses(reference)  # every per-step loss, bit for bit (same machine, same threads)
    assert_same_weights(run / "checkpoints" / "step_0000008", reference / "checkpoints" / "step_0000008")


def test_a_second_sigint_exits_at_once_without_a_traceback(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = train_args(run, 8, "train.log_every=1", "train.save_every=0")
    proc, ready = _signal_at_step(args, 2, tmp_path, signal.SIGINT, {"QTRAIN_TEST_HOLD_AFTER_STOP": "1"})
    wait_for_file(ready.with_suffix(".stopping"), proc)  # the first one asked the loop to stop
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "SIGINT received: finishing the current step" in err
    assert "SIGINT received again: stopped at once" in err
    assert step_names(run / "checkpoints") == []  # it did not wait for the save (the hold lasts 120 s)
    assert _status(run)["exit_code"] == 130


def test_sigint_stops_a_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "mode=train",
        *train_args(tmp_path / "unused", 6, "train.log_every=1")[1:-1],
        "train.lr=1e-3,2e-3,3e-3",
        f"hydra.sweep.dir={sweep}",
    ]
    proc, _ = _signal_at_step(args, 2, tmp_path, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    summary = json.loads((sweep / "sweep_status.json").read_text())
    assert [j["exit_code"] for j in summary["jobs"]] == [130, 130, 130]
    assert [bool(j.get("skipped")) for j in summary["jobs"]] == [False, True, True]
    first, later = Path(summary["jobs"][0]["dir"]), Path(summary["jobs"][1]["dir"])
    assert step_names(first / "checkpoints") == ["step_0000002"]  # the stopped job saved
    assert not (later / "checkpoints").exists()  # later jobs never ran
    assert _status(later)["exit_code"] == 130
    assert "skipped after SIGINT" in err


# SIGTERM outside training is covered mode by mode in test_case_42_signals.py.
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130)], ids=["SIGINT"])
def test_a_signal_during_eval_ends_it_at_once_without_a_traceback(
    trained: Path, tmp_path: Path, sig: int, code: int
) -> None:
    run, ready = tmp_path / "eval", tmp_path / "in-eval"
    args = [
        "mode=eval",
        f"init_from={trained / 'checkpoints' / 'step_0000004'}",
        "data.val_windows=4",
        f"hydra.run.dir={run}",
    ]
    proc = start_child(args, {"QTRAIN_TEST_PAUSE_IN_EVAL": str(ready)})
    wait_for_file(ready, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"{signal.Signals(sig).name} received: stopped at once" in err
    assert _status(run)["exit_code"] == code
    assert not (run / "report.json").exists()  # nothing half-reported


def test_a_sweep_stop_that_lands_while_a_job_starts_skips_that_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's handler recorded a signal before this job's own handler was installed: the job
    must not then run to the end (a second signal would only count as a first one)."""
    from qtrain import cli

    monkeypatch.setattr(cli, "_sweep_stopped", [130])
    run = tmp_path / "job"
    assert execute({"train.max_steps": 3}, run) == 130
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
