"""RELIABILITY.md case 42: SIGTERM and SIGINT are honoured in every mode, not only between
training steps: exit 143/130 at once, one line and no traceback, and nothing half-written left
(an interrupted `upgrade`'s temporary is removed, or cleaned up by the next run after SIGKILL).

Each child is stopped in the middle of its mode's work by a hook (`child.py`,
``QTRAIN_TEST_PAUSE_IN``) placed after one unit of the mode's long loop has run; one test
sends the signal to an unhooked `generate` of a very long text.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from qtrain.checkpoint import TMP_PREFIX
from tests.reliability.conftest import SHRINK, execute, start_child, tree_hashes, wait_for_file

pytestmark = pytest.mark.usefixtures("catchable_sigint")  # tests/reliability/conftest.py


def _stop_in(args: list[str], target: str, sig: int, tmp: Path) -> tuple[int, str, str]:
    """Run a child until `target` (module:function) has run once, send `sig`; (exit code, stdout, stderr)."""
    ready = tmp / "ready"
    proc = start_child(args, {"QTRAIN_TEST_PAUSE_IN": target, "QTRAIN_TEST_PAUSE_READY": str(ready)})
    wait_for_file(ready, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _assert_stopped(code: int, err: str, sig: int) -> None:
    expected = 130 if sig == signal.SIGINT else 143
    assert code == expected, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "AssertionError" not in err
    assert f"{signal.Signals(sig).name} received: stopped at once" in err


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith((TMP_PREFIX, "tmp")))


def _ckpt(trained: Path) -> Path:
    return trained / "checkpoints" / "step_0000004"


@pytest.mark.parametrize(
    ("mode", "target", "sig"),
    [
        ("generate", "qtrain.evaluate:_sample", signal.SIGTERM),  # between sampled tokens
        ("ptq", "qtrain.quant.gptq:gptq_quantize", signal.SIGINT),  # between GPTQ layers
        ("verify", "qtrain.checkpoint.load:sha256_of", signal.SIGTERM),  # between hashed files
    ],
)
def test_case_42_signal_in_the_middle_of_a_mode(
    trained: Path, tmp_path: Path, mode: str, target: str, sig: int
) -> None:
    run = tmp_path / "run"
    args = [f"mode={mode}", f"init_from={_ckpt(trained)}", f"hydra.run.dir={run}", *SHRINK]
    if mode == "ptq":
        args += ["quant=int4", "quant.group_size=32", "ptq.method=gptq", "ptq.calib_batches=1"]
    before = tree_hashes(trained)
    code, _, err = _stop_in(args, target, sig, tmp_path)
    _assert_stopped(code, err, sig)
    assert not (run / "report.json").exists() and not (run / "checkpoints").exists()  # nothing half-written
    assert _leftovers(run) == []
    assert json.loads((run / "status.json").read_text())["exit_code"] == code
    assert tree_hashes(trained) == before  # the source is only read


def test_case_42_signal_during_report(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["mode=report", f"runs=[{trained}]", f"hydra.run.dir={out}"]
    code, _, err = _stop_in(args, "qtrain.modes.sweep_jobs:_read_json", signal.SIGINT, tmp_path)
    _assert_stopped(code, err, signal.SIGINT)
    assert {p.name for p in out.iterdir()} <= {".hydra", "status.json"}  # no table, plot or report


def test_case_42_signal_during_upgrade_leaves_no_partial_copy(trained: Path, tmp_path: Path) -> None:
    dest = tmp_path / "upgraded"
    args = ["mode=upgrade", f"init_from={_ckpt(trained)}", f"out={dest}", f"hydra.run.dir={tmp_path / 'run'}"]
    # paused after the first file of the copy is written into its temporary directory
    code, _, err = _stop_in(args, "qtrain.checkpoint.write:write_safetensors", signal.SIGTERM, tmp_path)
    _assert_stopped(code, err, signal.SIGTERM)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_case_42_killed_upgrade_temporary_removed_by_the_next_run(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "upgraded"
    args = ["mode=upgrade", f"init_from={_ckpt(trained)}", f"out={dest}", f"hydra.run.dir={tmp_path / 'run'}"]
    ready = tmp_path / "ready"
    proc = start_child(
        args,
        {"QTRAIN_TEST_PAUSE_IN": "qtrain.checkpoint.write:write_safetensors", "QTRAIN_TEST_PAUSE_READY": str(ready)},
    )
    wait_for_file(ready, proc)
    proc.kill()  # SIGKILL: no handler runs, the half-written temporary stays
    proc.communicate(timeout=120)
    left = tmp_path / f"{TMP_PREFIX}{dest.name}-{proc.pid}"
    assert left.is_dir() and not dest.exists()
    live = subprocess.Popen(["sleep", "60"])  # a temporary of a live process (a concurrent upgrade) is kept
    try:
        busy = tmp_path / f"{TMP_PREFIX}{dest.name}-{live.pid}"
        busy.mkdir()
        assert (
            execute({"mode.name": "upgrade", "init_from": str(_ckpt(trained)), "out": str(dest)}, tmp_path / "r2") == 0
        )
        assert not left.exists() and busy.is_dir()
        assert f"removed {left}" in capsys.readouterr().err
        assert (dest / "manifest.json").is_file()
    finally:
        live.kill()
        live.wait()


def test_case_42_signal_during_a_long_generation_without_hooks(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        "mode=generate",
        f"init_from={_ckpt(trained)}",
        "generate.max_new_tokens=1000000",  # minutes of sampling: only the signal ends it
        f"hydra.run.dir={run}",
    ]
    proc = start_child(args, {})
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the banner: the checkpoint is loaded, generation starts
    assert line.startswith("qtrain generate"), line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    _assert_stopped(proc.returncode, err, signal.SIGINT)
    assert not (run / "report.json").exists()
