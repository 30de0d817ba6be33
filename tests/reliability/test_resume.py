"""RELIABILITY.md, resume: cases 7, 8, 10, 11 (case 9, QAT state, is in test_quant_cases.py)."""

from __future__ import annotations

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
    after_stop = {"code": code, "out": out, "err": err, "steps": step_names(run / "checkpoints"),
                  "metrics": (run / "metrics.jsonl").read_text()}
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
    # 1400 bytes: about 9 batches of 4 windows per epoch, so the run crosses epochs, mid-batch too.
    path.write_bytes(pydocs_text().encode("utf-8")[:1400])
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


def test_case_08_mid_epoch_resume_consumes_exactly_the_same_batches(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = _small_corpus(tmp_path / "small.txt")
    extra = ("data=text", f"data.path={corpus}", "train.log_every=1", "train.save_every=0")
    seen = _record_batches(monkeypatch)
    assert qtrain(train_args(tmp_path / "straight", 20, *extra)) == 0
    straight = list(seen)
    assert len(straight) == 20

    seen.clear()
    original = Trainer._after_step

    def after_step(self: Trainer, loss: float, grad_norm: float, dt: float) -> None:
        original(self, loss, grad_norm, dt)
        if self.step == 5 and self.sampler.epoch == 0:  # mid-epoch: a real SIGTERM to this process
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_after_step", after_step)
    run = tmp_path / "interrupted"
    assert qtrain(train_args(run, 20, *extra)) == 143
    state = ck.load_checkpoint(run / "checkpoints" / "step_0000005").trainer_meta["trainer"]["sampler"]
    assert state["epoch"] == 0 and 0 < state["cursor"]  # stopped in the middle of the first epoch
    assert qtrain(train_args(run, 20, *extra)) == 0
    resumed = list(seen)
    assert len(resumed) == 20  # no batch repeated, none skipped
    for i, (a, b) in enumerate(zip(straight, resumed)):
        assert torch.equal(a, b), f"batch {i + 1} differs"
    final = ck.load_checkpoint(run / "checkpoints" / "step_0000020").trainer_meta["trainer"]["sampler"]
    assert final["epoch"] >= 2  # the resumed part crossed epoch boundaries
    assert losses(run) == losses(tmp_path / "straight")


def test_case_11_nothing_to_resume_and_bogus_init_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    must = tmp_path / "must"
    assert qtrain(train_args(must, 2, "resume=must")) == 2
    assert f"no valid checkpoint in {must / 'checkpoints'}" in capsys.readouterr().err

    fresh = tmp_path / "fresh"
    assert qtrain(train_args(fresh, 2, "resume=auto")) == 0
    assert f"no valid checkpoint in {fresh / 'checkpoints'}; starting fresh" in capsys.readouterr().out

    bogus = tmp_path / "no-such-checkpoint"
    for mode in ("train", "eval"):
        args = [f"mode={mode}", f"init_from={bogus}", f"hydra.run.dir={tmp_path / mode}"]
        assert qtrain(args if mode == "eval" else train_args(tmp_path / mode, 2, f"init_from={bogus}")) == 2
        err = capsys.readouterr().err
        assert "init_from" in err and str(bogus) in err and "Traceback" not in err
