"""RELIABILITY.md case 37: nothing is lost silently.

A fresh start over checkpoints an earlier run left (`resume=never`; `mode=ptq`, which never
resumes) is refused with exit 2 unless `overwrite=true` says to discard them; a mode whose run
dir is the run its `init_from` checkpoint lives in never replaces (or prunes) it, even with
`overwrite=true`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.conftest import copy_run, execute, losses, published_hashes, step_names

PTQ = {"mode.name": "ptq", "quant.scheme": "int8", "eval.decode_tokens": 0, "eval.prefill_tokens": 0}


def test_case_37_resume_never_over_checkpoints_is_refused_unless_overwrite(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    root = run / "checkpoints"
    before = published_hashes(root)
    capsys.readouterr()
    assert execute({"train.max_steps": 4, "resume": "never"}, run) == 2
    err = capsys.readouterr().err
    assert "step_0000002, step_0000004" in err and "overwrite=true" in err and "resume=auto" in err
    assert published_hashes(root) == before  # nothing lost
    assert execute({"train.max_steps": 3, "resume": "never", "overwrite": True, "train.save_every": 0}, run) == 0
    cap = capsys.readouterr()
    assert "discarded the earlier run" in cap.err and "step_0000002, step_0000004, latest" in cap.err
    assert step_names(root) == ["step_0000003"]  # the new run alone: nothing of the old one mixed in
    assert [s for s, _ in losses(run)] == [1, 2, 3]  # the new run's steps alone (auto log_every: each step)


def test_case_37_ptq_never_replaces_an_earlier_result_silently(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another member of the class: `mode=ptq` writes its result at the source's step, so a second
    PTQ in the same run dir would replace the first."""
    run = tmp_path / "ptq"
    assert execute({**PTQ, "init_from": str(trained)}, run) == 0
    before = published_hashes(run / "checkpoints")
    capsys.readouterr()
    assert execute({**PTQ, "init_from": str(trained), "ptq.method": "mse"}, run) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of an earlier run (step_0000004, latest)" in err and "overwrite=true" in err
    assert published_hashes(run / "checkpoints") == before
    assert execute({**PTQ, "init_from": str(trained), "ptq.method": "mse", "overwrite": True}, run) == 0
    assert published_hashes(run / "checkpoints") != before


@pytest.mark.parametrize(
    ("changes", "init_from"),
    [
        (PTQ, "."),  # the run dir itself: its newest checkpoint
        ({"mode.name": "train", "resume": "never", "overwrite": True}, "checkpoints/step_0000002"),
        ({"mode.name": "finetune", "quant.scheme": "int8"}, "checkpoints"),
    ],
)
def test_case_37_a_mode_never_writes_over_its_own_init_from(
    changes: dict[str, object], init_from: str, tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    before = published_hashes(run / "checkpoints")
    capsys.readouterr()
    assert execute({**changes, "init_from": str(run / init_from), "train.max_steps": 2}, run) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and "own directory" in err and "Traceback" not in err
    assert published_hashes(run / "checkpoints") == before


def test_case_37_overwrite_needs_a_fresh_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`overwrite=true` with `resume=auto` (which continues the checkpoints) is a contradiction: exit 2."""
    assert execute({"train.max_steps": 1, "overwrite": True}, tmp_path / "run") == 2
    assert "overwrite: overwrite=true discards" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
