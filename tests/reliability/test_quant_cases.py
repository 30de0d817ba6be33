"""RELIABILITY.md cases that involve quantization: 9 (QAT state on resume), 19 (scheme mismatch),
28 (quantized vs full-precision init_from per mode)."""

from __future__ import annotations

import copy
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from qtrain import checkpoint as ck
from qtrain.train import Trainer
from tests.reliability.conftest import (
    FIXTURES,
    assert_same_weights,
    execute,
    losses,
    published_hashes,
    step_names,
)

QAT = {
    "mode.name": "qat",
    "quant.scheme": "int8da_int4w",
    "quant.activations": "int8",
    "quant.group_size": 32,
    "qat.learn_scales": True,
    "qat.start_step": 0,
    "qat.act_start_step": 5,
    "qat.freeze_step": 2,
    "train.max_steps": 6,
    "train.log_every": 1,
    "train.save_every": 0,
}


def _snapshot(trainer: Trainer) -> dict[str, Any]:
    return {
        "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()["state"]),
        "step": trainer.step,
    }


def test_case_09_qat_state_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = tmp_path / "straight"
    assert execute(QAT, straight) == 0

    at_stop: dict[str, Any] = {}
    at_fit: list[dict[str, Any]] = []
    original_after, original_fit = Trainer._after_step, Trainer.fit

    def after_step(self: Trainer, loss: float, grad_norm: float, dt: float) -> None:
        original_after(self, loss, grad_norm, dt)
        if self.step == 3 and not at_stop:
            at_stop.update(_snapshot(self))
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal; the handler asks the loop to save and stop

    def fit(self: Trainer, *args: Any, **kwargs: Any) -> dict[str, Any]:
        at_fit.append(_snapshot(self))  # after try_resume has loaded the checkpoint
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_after_step", after_step)
    monkeypatch.setattr(Trainer, "fit", fit)
    run = tmp_path / "interrupted"
    assert execute(QAT, run) == 143
    saved = ck.load_checkpoint(run / "checkpoints" / "step_0000003")
    assert saved.manifest["quant"]["state"] == "fake"
    assert execute(QAT, run) == 0

    resumed = at_fit[-1]
    assert resumed["step"] == at_stop["step"] == 3
    flags = [k for k in at_stop["model"] if k.endswith(("weight_enabled", "act_enabled", "frozen"))]
    scales = [k for k in at_stop["model"] if k.endswith("scales")]
    assert flags and scales
    assert {bool(at_stop["model"][k]) for k in flags if k.endswith("frozen")} == {True}  # frozen at step 2
    assert {bool(at_stop["model"][k]) for k in flags if k.endswith("act_enabled")} == {False}  # not yet on
    assert resumed["model"].keys() == at_stop["model"].keys()
    for k, v in at_stop["model"].items():
        assert torch.equal(resumed["model"][k], v), f"{k} differs after resume"
    assert resumed["optimizer"].keys() == at_stop["optimizer"].keys()
    for i, state in at_stop["optimizer"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(resumed["optimizer"][i][name]), torch.as_tensor(value)), (i, name)
    # The same losses step by step, and the converted model equals the uninterrupted run's.
    assert losses(run) == losses(straight)
    assert ck.load_checkpoint(run / "checkpoints" / "step_0000006").manifest["quant"]["state"] == "packed"
    assert_same_weights(run / "checkpoints" / "step_0000006", straight / "checkpoints" / "step_0000006")


WIDE = {"model.n_embd": 128, "model.mlp_hidden": 128}
INT4_G128 = {
    **WIDE,
    "mode.name": "qat",
    "quant.scheme": "int4",
    "quant.group_size": 128,
    "train.max_steps": 2,
    "train.save_every": 1,
}


@pytest.fixture(scope="module")
def int4_g128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QAT run dir (int4, group 128): fake-quant checkpoint at step 1, converted one at step 2."""
    run = tmp_path_factory.mktemp("int4g128") / "run"
    assert execute(INT4_G128, run) == 0
    assert step_names(run / "checkpoints") == ["step_0000001", "step_0000002"]
    return run


REQUESTS = {
    "int8": {"quant.scheme": "int8", "quant.group_size": 32},
    "int4 group 64": {"quant.scheme": "int4", "quant.group_size": 64},
}


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_case_19_scheme_mismatch_is_refused(
    int4_g128: Path, tmp_path: Path, request_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    requested = REQUESTS[request_name]
    packed = int4_g128 / "checkpoints" / "step_0000002"

    def refused(changes: dict[str, Any], run: Path) -> None:
        capsys.readouterr()
        code = execute(changes, run)
        err = capsys.readouterr().err
        assert code in (2, 3), err
        assert "int4" in err and "group 128" in err, err  # the checkpoint's scheme
        assert ("int8" if request_name == "int8" else "group 64") in err, err  # and the requested one
        assert "Traceback" not in err

    # finetune keeps the checkpoint's scheme: asking for another one is refused
    refused(
        {**WIDE, "mode.name": "finetune", "init_from": str(packed), "train.max_steps": 1, **requested},
        tmp_path / "finetune",
    )
    # resume=auto of a preempted QAT run with another scheme: refused before anything is loaded
    run = shutil.copytree(int4_g128, tmp_path / "resume")
    shutil.rmtree(run / "checkpoints" / "step_0000002")
    before = published_hashes(run / "checkpoints")
    refused({**INT4_G128, **requested}, run)
    assert published_hashes(run / "checkpoints") == before
    # the finished run re-run with another scheme: its int4 result is not reported as the new scheme's
    refused({**INT4_G128, **requested}, shutil.copytree(int4_g128, tmp_path / "finished"))


def test_case_19_same_scheme_resumes(int4_g128: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The guard is not a blanket refusal: the matching scheme continues from the fake-quant checkpoint."""
    run = shutil.copytree(int4_g128, tmp_path / "resume")
    shutil.rmtree(run / "checkpoints" / "step_0000002")
    assert execute(INT4_G128, run) == 0
    assert f"continuing from {run / 'checkpoints' / 'step_0000001'}" in capsys.readouterr().out


QUANTIZED = FIXTURES / "v2_int4"
FULL_PRECISION = FIXTURES / "v1_fp"


@pytest.mark.parametrize(
    "mode,init,fits",
    [
        ("ptq", QUANTIZED, "mode=finetune"),
        ("qat", QUANTIZED, "mode=finetune"),
        ("train", QUANTIZED, "mode=finetune"),
        ("finetune", FULL_PRECISION, "mode=qat"),
    ],
)
def test_case_28_init_from_of_the_wrong_kind(
    mode: str, init: Path, fits: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changes = {"mode.name": mode, "init_from": str(init), "train.max_steps": 1}
    if mode in ("ptq", "qat"):
        changes.update({"quant.scheme": "int4", "quant.group_size": 32})
    assert execute(changes, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert str(init) in err and fits in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
