"""RELIABILITY.md, resume: cases 7, 8, 10, 11 (case 9, QAT state, is in test_quant_cases.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from qtrain import checkpoint as ck
from qtrain.data import BatchSampler, pydocs_text
from qtrain.train import Trainer
from tests.reliability.conftest import (
    assert_same_weights,
    execute,
    losses,
    qtrain,
    sigterm_at_step,
    step_names,
    train_args,
)


@pytest.fixture(scope="module")
def preempted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An 8-step run stopped by a real SIGTERM after step 4, then the same command run again."""
    tmp = tmp_path_factory.mktemp("preempted")
    run = tmp / "run"
    args = train_args(run, 8, "train.log_every=1", "train.save_every=0")
    code, out, err = sigterm_at_step(args, 4, tmp)
    after_stop = {
        "code": code,
        "out": out,
        "err": err,
        "steps": step_names(run / "checkpoints"),
        "metrics": (run / "metrics.jsonl").read_text(),
    }
    resumed = qtrain(args)
    return {"run": run, "stop": after_stop, "resume_code": resumed}


def test_case_07_sigterm_resume_bit_identical(preempted: dict[str, object], reference: Path) -> None:
    stop = preempted["stop"]
    assert isinstance(stop, dict)
    assert stop["code"] == 143, stop["err"]
    assert stop["steps"] == ["step_0000004"]  # saved before exiting
    assert "SIGTERM at step 4" in str(stop["err"])
    assert preempted["resume_code"] == 0
    run = preempted["run"]
    assert isinstance(run, Path)
    assert losses(run) == losses(reference)  # every per-step loss, bit for bit
    assert [s for s, _ in losses(reference)] == list(range(1, 9))
    assert_same_weights(run / "checkpoints" / "step_0000008", reference / "checkpoints" / "step_0000008")


def test_case_10_rerun_continues_same_dir_and_appends_metrics(preempted: dict[str, object]) -> None:
    run = preempted["run"]
    stop = preempted["stop"]
    assert isinstance(run, Path) and isinstance(stop, dict)
    text = (run / "metrics.jsonl").read_text()
    assert text.startswith(str(stop["metrics"]))  # appended, never truncated
    assert [s for s, _ in losses(run)] == list(range(1, 9))
    assert step_names(run / "checkpoints") == ["step_0000004", "step_0000008"]


def _small_corpus(path: Path) -> Path:
    # 700 bytes: about 4.5 batches of 4 windows per epoch, so the run crosses epochs, mid-batch too.
    path.write_bytes(pydocs_text().encode("utf-8")[:700])
    return path


def _record_batches(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    original = BatchSampler.next_batch

    def next_batch(self: BatchSampler) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = original(self)
        seen.append(x.clone())
        return x, y

    monkeypatch.setattr(BatchSampler, "next_batch", next_batch)
    return seen


def test_case_08_mid_epoch_resume_consumes_exactly_the_same_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = _small_corpus(tmp_path / "small.txt")
    changes = {
        "data.name": "text",
        "data.path": str(corpus),
        "train.log_every": 1,
        "train.save_every": 0,
        "train.max_steps": 12,
    }
    seen = _record_batches(monkeypatch)
    assert execute(changes, tmp_path / "straight") == 0
    straight = list(seen)
    assert len(straight) == 12

    seen.clear()
    original = Trainer._after_step

    def after_step(self: Trainer, loss: float, grad_norm: float, dt: float) -> None:
        original(self, loss, grad_norm, dt)
        if self.step == 3 and self.sampler.epoch == 0:  # mid-epoch: a real SIGTERM to this process
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_after_step", after_step)
    run = tmp_path / "interrupted"
    assert execute(changes, run) == 143
    state = ck.load_checkpoint(run / "checkpoints" / "step_0000003").trainer_meta["trainer"]["sampler"]
    assert state["epoch"] == 0 and state["cursor"] > 0  # stopped in the middle of the first epoch
    assert execute(changes, run) == 0
    resumed = list(seen)
    assert len(resumed) == 12  # no batch repeated, none skipped
    for i, (a, b) in enumerate(zip(straight, resumed, strict=True)):
        assert torch.equal(a, b), f"batch {i + 1} differs"
    final = ck.load_checkpoint(run / "checkpoints" / "step_0000012").trainer_meta["trainer"]["sampler"]
    assert final["epoch"] >= 2  # the resumed part crossed epoch boundaries
    assert losses(run) == losses(tmp_path / "straight")


def test_case_11_nothing_to_resume_and_bogus_init_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    must = tmp_path / "must"
    assert execute({"resume": "must", "train.max_steps": 2}, must) == 2
    assert f"no valid checkpoint in {must / 'checkpoints'}" in capsys.readouterr().err

    fresh = tmp_path / "fresh"
    assert execute({"resume": "auto", "train.max_steps": 2}, fresh) == 0
    assert f"no valid checkpoint in {fresh / 'checkpoints'}; starting fresh" in capsys.readouterr().out

    bogus = tmp_path / "no-such-checkpoint"
    for mode in ("train", "eval", "verify", "generate"):
        assert execute({"mode.name": mode, "init_from": str(bogus), "train.max_steps": 1}, tmp_path / mode) == 2
        err = capsys.readouterr().err
        assert f"init_from: {bogus} does not exist" in err and "Traceback" not in err
    assert qtrain(["mode=eval", f"init_from={bogus}", f"hydra.run.dir={tmp_path / 'cli'}"]) == 2
    assert f"init_from: {bogus} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_sigterm_in_a_sweep_stops_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "mode=train", *train_args(tmp_path / "unused", 6, "train.log_every=1")[1:-1],
            "train.lr=1e-3,2e-3,3e-3", f"hydra.sweep.dir={sweep}"]
    code, out, err = sigterm_at_step(args, 2, tmp_path)
    assert code == 143, err[-2000:]
    summary = json.loads((sweep / "sweep_status.json").read_text())
    assert [j["exit_code"] for j in summary["jobs"]] == [143, 143, 143]
    assert [bool(j.get("skipped")) for j in summary["jobs"]] == [False, True, True]
    first = Path(summary["jobs"][0]["dir"])
    assert step_names(first / "checkpoints") == ["step_0000002"]  # the stopped job saved
    assert not (Path(summary["jobs"][1]["dir"]) / "checkpoints").exists()  # later jobs never ran
    assert "skipped after SIGTERM" in err
