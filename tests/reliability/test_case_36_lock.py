"""RELIABILITY.md case 36: one run directory, one writer.

A second qtrain on a run dir that a live process holds exits 2 naming the holder's pid and
changes nothing there (not even Hydra's `.hydra/`); a lock left by a dead process is taken
over with a warning naming that pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qtrain.runlock import LOCK_FILE
from tests.reliability.conftest import (
    REPO,
    copy_run,
    execute,
    losses,
    qtrain,
    start_child,
    train_args,
    tree_hashes,
    wait_for_file,
)

HOLDER = """
import sys
from pathlib import Path
from qtrain.runlock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
Path(sys.argv[2]).write_text("held")
sys.stdin.read()  # holds the lock until the test closes stdin
lock.release()
"""


def _hold(run: Path, tmp_path: Path) -> subprocess.Popen[str]:
    """A separate process that holds `run`'s lock (as a running qtrain does) until its stdin closes."""
    ready = tmp_path / "held"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run), str(ready)], cwd=REPO, stdin=subprocess.PIPE, text=True
    )
    wait_for_file(ready, proc, deadline_s=60)  # type: ignore[arg-type]
    return proc


def test_case_36_a_held_run_dir_refuses_a_second_writer_and_changes_nothing(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("the holder's config\n")
    holder = _hold(run, tmp_path)
    try:
        before = tree_hashes(run)
        capsys.readouterr()
        assert execute({"train.max_steps": 6, "train.save_every": 2}, run) == 2  # the same run, continued
        assert f"in use by qtrain pid {holder.pid}" in capsys.readouterr().err
        # other modes writing report.json there, and the full command line (before Hydra writes .hydra/)
        assert execute({"mode.name": "eval", "init_from": str(trained), "eval.decode_tokens": 0}, run) == 2
        assert qtrain(["mode=verify", f"init_from={trained}", f"hydra.run.dir={run}"]) == 2
        err = capsys.readouterr().err
        assert err.count(f"pid {holder.pid}") == 2 and "Traceback" not in err
        assert tree_hashes(run) == before  # checkpoints, metrics, report, .hydra: untouched
    finally:
        holder.communicate(input="", timeout=60)
    assert holder.returncode == 0 and not (run / LOCK_FILE).exists()  # released by the holder


def test_case_36_a_running_qtrain_holds_its_run_dir_and_a_killed_ones_lock_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = train_args(run, 4, "train.save_every=2", "train.log_every=1")
    ready = tmp_path / "ready"
    child = start_child(args, {"QTRAIN_TEST_PAUSE_AT_STEP": "3", "QTRAIN_TEST_READY_FILE": str(ready)})
    try:
        wait_for_file(ready, child)
        capsys.readouterr()
        assert qtrain(args) == 2  # the same command again, while the first one runs
        assert f"in use by qtrain pid {child.pid}" in capsys.readouterr().err
        assert [s for s, _ in losses(run)] == [1, 2, 3]  # the second wrote nothing
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    assert (run / LOCK_FILE).read_text().strip() == str(child.pid)  # left behind by the killed run
    assert qtrain(args) == 0
    cap = capsys.readouterr()
    assert f"taking over the lock left by pid {child.pid}" in cap.err
    assert "continuing from" in cap.out and [s for s, _ in losses(run)][-2:] == [3, 4]
    assert json.loads((run / "status.json").read_text())["ok"] and not (run / LOCK_FILE).exists()


def test_case_36_stale_or_garbled_lock_files_are_taken_over(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lock file naming a process that is gone, or holding garbage: nobody holds it, so it is taken."""
    run = copy_run(trained, tmp_path / "run")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    for content, warned in ((f"{dead}\n", f"left by pid {dead}"), ("\x00garbage", None)):
        (run / LOCK_FILE).write_text(content)
        capsys.readouterr()
        assert execute({"mode.name": "verify", "init_from": str(run)}, run) == 0
        err = capsys.readouterr().err
        assert (warned in err) if warned else ("taking over" not in err)
        assert not (run / LOCK_FILE).exists()
    (run / LOCK_FILE).symlink_to(tmp_path / "elsewhere")  # a planted link as the lock file: refused
    assert execute({"mode.name": "verify", "init_from": str(run)}, run) == 2
    assert not (tmp_path / "elsewhere").exists() and os.path.islink(run / LOCK_FILE)
