"""Issue 12: a sweep's typos are refused before any job starts, and a schedule that cannot do
what was asked (warmup past the end, max_steps changed on resume) is said out loud."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtrain.config import RunConfig, TrainConfig
from qtrain.config_rules import warnings_for
from qtrain.modes.resume import schedule_change
from qtrain.precheck import check
from tests.reliability.conftest import SHRINK, copy_run, execute, qtrain


def _message_lines(err: str) -> list[str]:
    """The problem lines of an error paragraph, without the job notes a sweep adds."""
    lines = [line.removeprefix("error: ").removeprefix("  - ") for line in err.strip().splitlines()]
    return [line.split("  [")[0] for line in lines if line and not line.startswith("invalid ")]


def test_multirun_typo_refused_like_a_single_run_before_any_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    assert qtrain(["-m", "train.max_step=1,2", f"hydra.sweep.dir={sweep}"]) == 2
    err = capsys.readouterr().err
    assert "invalid sweep of 2 jobs; none was started (1 problem)" in err and "[every job]" in err
    assert "Traceback" not in err
    assert not sweep.exists()  # nothing created: not the sweep dir, not multirun.yaml
    # The same words as the single run's message.
    assert qtrain(["train.max_step=1", f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    single = capsys.readouterr().err
    assert _message_lines(err) == _message_lines(single)
    assert "Did you mean train.max_steps?" in single


def test_sweep_problems_listed_once_with_the_jobs_they_concern(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "quant=int4,int8", "quant.group_size=32,64", "train.lr=1e-3,abc", f"hydra.sweep.dir={sweep}"]
    assert qtrain(args) == 2
    err = capsys.readouterr().err
    assert "invalid sweep of 8 jobs; none was started (2 problems)" in err
    assert err.count("train.lr=abc: expected a float") == 1 and "[4 of 8 jobs, e.g. job 1:" in err
    # model=tiny has n_embd 96: group 64 does not divide it, only in the int4 jobs (int8 is per channel).
    assert err.count("does not divide") == 1 and "[job 2: quant=int4 quant.group_size=64 train.lr=0.001]" in err
    assert not sweep.exists()


def test_sweep_check_composes_each_group_choice_once() -> None:
    """Big sweeps stay fast: jobs that differ only in values share one Hydra composition."""
    from qtrain.precheck import Composer

    calls: list[tuple[str, ...]] = []
    original = Composer._compose_base

    def counting(self: Composer, lines: list[str]):  # type: ignore[no-untyped-def]
        calls.append(tuple(lines))
        return original(self, lines)

    mp = pytest.MonkeyPatch()
    mp.setattr(Composer, "_compose_base", counting)
    try:
        found = check(["quant=int4,int8", "train.lr=1e-3,2e-3,3e-3", "seed=1,2,3,4", "mode=train"], multirun=True)
    finally:
        mp.undo()
    assert len(found.jobs) == 24 and not found.problems
    assert sorted(calls) == [("quant=int4", "mode=train"), ("quant=int8", "mode=train")]
    assert all(isinstance(c, RunConfig) for c in found.configs)
    assert {c.seed for c in found.configs if c} == {1, 2, 3, 4}


def test_warmup_not_below_max_steps_is_said_out_loud(capsys: pytest.CaptureFixture[str]) -> None:
    found = check(["mode=train", "train.max_steps=20"], multirun=False)  # default warmup: 50
    assert not found.problems
    (msg,) = found.warnings
    assert "train.warmup_steps=50 >= train.max_steps=20" in msg and "never leaves warmup" in msg
    cfg = RunConfig(mode=RunConfig().mode, train=TrainConfig(max_steps=100, warmup_steps=10))
    assert warnings_for(cfg) == []


def test_schedule_change_on_resume_names_what_changes() -> None:
    saved = {"max_steps": 8, "warmup_steps": 2, "lr": 3e-3, "min_lr_ratio": 0.1}
    assert schedule_change(saved, TrainConfig(**saved), 4) is None
    note = schedule_change(saved, TrainConfig(**{**saved, "max_steps": 16}), 4)
    assert note is not None and "train.max_steps 8 -> 16" in note and "at step 4" in note
    assert schedule_change(None, TrainConfig(), 4) is None  # an old checkpoint without its config


def test_resume_with_longer_max_steps_warns(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(trained, tmp_path / "run")  # 4 steps done, trained with train.max_steps=4
    assert execute({"train.max_steps": 6, "train.save_every": 0}, run) == 0
    err = capsys.readouterr().err
    assert "resume: train.max_steps 4 -> 6" in err and "learning-rate schedule changes" in err


def test_valid_sweep_passes_the_check_and_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid two-job sweep passes the check and runs (the check changes nothing it accepts)."""
    sweep = tmp_path / "sweep"
    args = ["-m", "mode=train", *SHRINK, "train.max_steps=1", "train.warmup_steps=0", "seed=1,2",
            f"hydra.sweep.dir={sweep}"]
    assert qtrain(args) == 0
    assert len(list(sweep.glob("*/report.json"))) == 2
