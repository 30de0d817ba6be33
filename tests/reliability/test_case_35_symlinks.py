"""RELIABILITY.md case 35: qtrain never writes through a symbolic link it did not create in a run dir.

Each test plants links to a "victim" file or directory outside the run dir, where qtrain
would write, and checks that the run is refused with exit 2 naming the link, and that the
victim is byte-identical afterwards. Planted before the run (refused before any work) and
during it (the writers themselves open with O_NOFOLLOW / O_EXCL).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qtrain import checkpoint as ck
from qtrain import rundir
from qtrain.errors import ConfigError
from qtrain.modes.results import write_report
from tests.reliability.conftest import copy_run, execute, published_hashes, qtrain

PRECIOUS = b"precious: nobody may write here\n"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(PRECIOUS)
    return victim


def _plant(link: Path, target: Path) -> Path:
    if link.is_dir() and not link.is_symlink():
        os.rename(link, link.with_name(link.name + ".moved"))
    elif link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)
    return link


@pytest.mark.parametrize(
    "name",
    ["metrics.jsonl", "report.json", "report.json.tmp", "status.json.tmp", "checkpoints/latest"],
)
def test_case_35_a_planted_file_link_refuses_the_run_and_is_never_written_through(
    name: str, tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    victim = _victim(tmp_path)
    link = _plant(run / name, victim)
    before = published_hashes(run / "checkpoints")
    capsys.readouterr()
    assert execute({"train.max_steps": 6, "train.save_every": 2}, run) == 2
    err = capsys.readouterr().err
    assert str(link) in err and "symbolic link" in err and "Traceback" not in err
    assert victim.read_bytes() == PRECIOUS and link.is_symlink()
    assert published_hashes(run / "checkpoints") == before  # refused before any work


def test_case_35_a_planted_directory_link_is_refused_not_filled(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`checkpoints/` linked elsewhere: no checkpoint is written into the link's target."""
    run = copy_run(trained, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_bytes(PRECIOUS)
    link = _plant(run / "checkpoints", elsewhere)
    capsys.readouterr()
    assert execute({"train.max_steps": 2}, run) == 2
    assert str(link) in capsys.readouterr().err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    assert (elsewhere / "keep.txt").read_bytes() == PRECIOUS


def test_case_35_links_planted_while_running_are_refused_by_the_writers(tmp_path: Path) -> None:
    """The writers themselves never follow a link (one planted after the start-up checks)."""
    run = tmp_path / "run"
    run.mkdir()
    victim = _victim(tmp_path)
    writers = {
        "metrics.jsonl": lambda path: rundir.append_text(path, "{}\n"),  # the trainer's per-step log
        "status.json": lambda path: rundir.write_atomic(path, "{}"),
        "report.json.tmp": lambda path: write_report(run, {"mode": "train"}),
        "report.png.tmp": lambda path: rundir.write_atomic(run / "report.png", b"png"),
    }
    for name, write in writers.items():
        link = _plant(run / name, victim)
        with pytest.raises(ConfigError, match="symbolic link"):
            write(link)
        assert victim.read_bytes() == PRECIOUS and link.is_symlink()
    # a checkpoint's temporary directory and its final name
    root = run / "checkpoints"
    root.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    for link in (root / f"{ck.TMP_PREFIX}step_0000002-{os.getpid()}", root / "step_0000002"):
        _plant(link, other)
        with pytest.raises(ConfigError, match="symbolic link"):
            ck.write_dir_atomically(root / "step_0000002", lambda tmp: (tmp / "f").write_bytes(b"x"), 1)
        assert list(other.iterdir()) == [] and link.is_symlink()
        link.unlink()


def test_case_35_links_hydra_or_a_sweep_would_write_through_are_refused_first(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`.hydra/config.yaml` (written by Hydra) and `sweep_status.json`: refused before Hydra writes anything."""
    run = copy_run(trained, tmp_path / "run")
    victim = _victim(tmp_path)
    (run / ".hydra").mkdir()
    link = _plant(run / ".hydra" / "config.yaml", victim)
    capsys.readouterr()
    assert qtrain(["mode=report", f"runs=[{trained}]", f"hydra.run.dir={run}"]) == 2
    assert str(link) in capsys.readouterr().err and victim.read_bytes() == PRECIOUS
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    link = _plant(sweep / "sweep_status.json", victim)
    assert qtrain(["-m", "mode=report", f"runs=[{trained}]", f"hydra.sweep.dir={sweep}"]) == 2
    assert str(link) in capsys.readouterr().err and victim.read_bytes() == PRECIOUS
    assert sorted(p.name for p in sweep.iterdir()) == ["sweep_status.json"]  # no job ran


def test_case_35_report_outputs_are_never_written_through(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = _victim(tmp_path)
    for name in ("report_table.json", "report.png"):
        link = _plant(out / name, victim)
        capsys.readouterr()
        assert execute({"mode.name": "report", "runs": [str(trained)]}, out) == 2
        assert str(link) in capsys.readouterr().err and victim.read_bytes() == PRECIOUS
        link.unlink()
