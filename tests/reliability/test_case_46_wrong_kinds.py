"""RELIABILITY.md case 46: files of the wrong kind in a run dir, and paths under a regular file.

`checkpoints/latest`, `checkpoints/` or `metrics.jsonl` as a directory, a regular file where a
directory belongs, or a dangling link; `out=` or `hydra.run.dir=` under a regular file: exit 2
(or 3) naming the path, never exit 1, and nothing published is changed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.conftest import copy_run, execute, published_hashes, qtrain


def _make_dir(p: Path) -> None:
    p.mkdir()


def _make_file(p: Path) -> None:
    p.write_text("not what qtrain expects\n")


def _dangle(p: Path) -> None:
    p.symlink_to(p.parent / "missing-target")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("checkpoints/latest", _make_dir),
        ("checkpoints/latest", _dangle),
        ("checkpoints", _make_file),
        ("checkpoints", _dangle),
        ("metrics.jsonl", _make_dir),
        ("metrics.jsonl", _dangle),
        ("report.json", _make_dir),
    ],
    ids=["latest-dir", "latest-dangling", "checkpoints-file", "checkpoints-dangling", "metrics-dir",
         "metrics-dangling", "report-dir"],  # fmt: skip
)
def test_case_46_a_wrong_kind_of_file_in_the_run_dir_is_exit_2_naming_it(
    name: str, make: Callable[[Path], None], tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    before = published_hashes(run / "checkpoints")
    _remove(run / name)
    make(run / name)
    capsys.readouterr()
    assert execute({"train.max_steps": 6, "train.save_every": 2}, run) == 2
    err = capsys.readouterr().err
    assert str(run / name) in err and "Traceback" not in err
    if name != "checkpoints":
        assert published_hashes(run / "checkpoints") == {k: v for k, v in before.items() if k != "latest"} | (
            {} if name == "checkpoints/latest" else {"latest": before["latest"]}
        )


@pytest.mark.parametrize("make", [_make_file, _dangle], ids=["file", "dangling"])
def test_case_46_reading_a_run_whose_checkpoints_is_not_a_directory(
    make: Callable[[Path], None], tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`init_from=RUN` whose `checkpoints` is a file or a dangling link: exit 2 naming it."""
    run = tmp_path / "run"
    shutil.copy(trained / "report.json", (run.mkdir(), run / "report.json")[1])
    make(run / "checkpoints")
    assert execute({"mode.name": "eval", "init_from": str(run)}, tmp_path / "eval") == 2
    assert f"{run / 'checkpoints'} is " in capsys.readouterr().err


def test_case_46_out_or_run_dir_under_a_regular_file(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    src = trained / "checkpoints" / "step_0000004"
    changes = {"mode.name": "upgrade", "init_from": str(src), "out": str(afile / "new")}
    assert execute(changes, tmp_path / "up") == 2
    err = capsys.readouterr().err
    assert f"out: cannot use {afile / 'new'}: {afile} is a regular file" in err
    assert qtrain(["mode=verify", f"init_from={src}", f"hydra.run.dir={afile / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"{afile / 'run'}" in err and f"{afile} is not a writable directory" in err and "Traceback" not in err
    assert afile.read_text() == "x"
