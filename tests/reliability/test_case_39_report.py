"""RELIABILITY.md case 39: `mode=report` never fails because one run is broken.

A sweep of job dirs, each broken in its own way (garbled JSON, non-UTF-8 bytes, wrong types,
a FIFO, a device, a directory where a file belongs, absurd nesting, garbage metrics): every
broken run gets a row saying what is wrong, the intact run is reported as usual, exit 0, and
nothing blocks (a FIFO is never opened for reading, a device never read).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import execute

GUARD_S = 120
"""A FIFO opened for reading would block forever: the test fails instead of hanging."""


@contextlib.contextmanager
def _no_hang() -> Iterator[None]:
    def stuck(signum: int, frame: Any) -> None:
        raise AssertionError(f"mode=report blocked for {GUARD_S} s (a FIFO or device was read)")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(GUARD_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _replace(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    def go(d: Path) -> None:
        (d / name).unlink(missing_ok=True)
        make(d / name)

    return go


WRONG_TYPES = (
    b'{"mode": ["ptq"], "model": 7, "quant": {"scheme": "int4", "layers": {"a": 5, "b": {"out_features": "x"}}}, '
    b'"val_ppl": "abc", "n_params": 1e999, "checkpoint_bytes": 1' + b"0" * 400 + b', "elapsed_s": NaN}'
)
BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "1_torn": (_write("report.json", b'{"mode": "train", "val_p'), "report.json is not valid JSON"),
    "2_bytes": (_write("report.json", b'{"mode": "tr\xff\xfein"}'), "report.json is not UTF-8 text"),
    "3_types": (_write("report.json", WRONG_TYPES), "report.json: val_ppl, checkpoint_bytes, elapsed_s, n_params"),
    "4_fifo": (_replace("report.json", os.mkfifo), "report.json is a FIFO, not a regular file"),
    "5_fifos": (_replace("metrics.jsonl", os.mkfifo), "metrics.jsonl is a FIFO"),
    "6_device": (_replace("status.json", lambda p: p.symlink_to("/dev/zero")), "status.json is a character device"),
    "7_dir": (_replace("report.json", Path.mkdir), "report.json is a directory"),
    "8_list": (_write("report.json", b"[1, 2]"), "report.json holds a JSON list, not an object"),
    "9_deep": (_write("report.json", b"[" * 200_000), "report.json is nested too deeply"),
    "10_status": (_write("status.json", b'{"ok": "yes", "exit_code": [0]}'), "status.json: ok, exit_code of the wrong"),
    "11_garbage": (
        _write("metrics.jsonl", b"\xff\x00garbage\n" + b"x" * (3 << 20) + b'\n{"step": 1, "loss": 2.0}\n'),
        "metrics.jsonl: 2 unreadable lines",
    ),
}


def test_case_39_one_broken_run_never_fails_the_report(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    for name in ["0_intact", *BROKEN]:
        job = sweep / name
        job.mkdir(parents=True)
        for f in ("report.json", "metrics.jsonl"):
            shutil.copy(trained / f, job / f)
        (job / "status.json").write_text(json.dumps({"exit_code": 0, "ok": True, "overrides": [f"seed={len(name)}"]}))
        if name in BROKEN:
            BROKEN[name][0](job)
    out = tmp_path / "report"
    with _no_hang():
        assert execute({"mode.name": "report", "runs": [str(sweep)]}, out) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = {Path(r["path"]).name: r for r in json.loads((out / "report_table.json").read_text())["rows"]}
    assert sorted(rows) == sorted(["0_intact", *BROKEN])
    intact = rows["0_intact"]
    assert intact["ok"] and intact["status"] == "ok" and intact["val_ppl"] > 1 and intact["scheme"] == "fp32"
    for name, (_, says) in BROKEN.items():
        assert says in rows[name]["status"], (name, rows[name]["status"])
    for name in ("1_torn", "2_bytes", "4_fifo", "7_dir", "8_list", "9_deep"):
        assert not rows[name]["ok"] and rows[name]["val_ppl"] is None  # no report: not a result
    assert rows["3_types"]["val_ppl"] is None and rows["3_types"]["checkpoint_bytes"] is None  # blank, not garbage
    assert rows["5_fifos"]["ok"] and rows["5_fifos"]["val_ppl"] == intact["val_ppl"]  # the result itself is fine
    assert (out / "report.json").is_file()


def test_case_39_runs_named_directly_and_unreadable_sweeps(tmp_path: Path, trained: Path) -> None:
    """A run dir named in `runs=` whose report.json is a FIFO is a broken row too, not a hang or exit 1."""
    job = tmp_path / "job"
    job.mkdir()
    os.mkfifo(job / "report.json")
    out = tmp_path / "report"
    with _no_hang():
        assert execute({"mode.name": "report", "runs": [str(job), str(trained)]}, out) == 0
    rows = json.loads((out / "report_table.json").read_text())["rows"]
    assert [r["ok"] for r in rows] == [False, True] and "FIFO" in rows[0]["status"]
