"""RELIABILITY.md, training faults: cases 21-23."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from qtrain.model import GPT
from tests.reliability.conftest import execute, published_hashes, step_names, temps

FAULT_STEP = 6
"""The 1-based optimizer step whose forward/backward goes non-finite; checkpoints every 3 steps."""


def _inject(monkeypatch: pytest.MonkeyPatch, fault: str, root: Path) -> dict[str, Any]:
    """Make the FAULT_STEP-th training forward produce `fault`; count optimizer steps."""
    seen: dict[str, Any] = {"forwards": 0, "optimizer_steps": 0}
    original_forward = GPT.forward
    original_step = torch.optim.AdamW.step

    def forward(self: GPT, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = original_forward(self, *args, **kwargs)
        if not self.training:
            return logits
        seen["forwards"] += 1
        if seen["forwards"] != FAULT_STEP:
            return logits
        seen["before"] = published_hashes(root)
        if fault == "nan loss":
            return logits * float("nan")
        if fault == "inf grad":  # finite loss, infinite gradient (what a zero scale does)
            logits.register_hook(lambda g: torch.full_like(g, float("inf")))
            return logits
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        seen["optimizer_steps"] += 1
        return original_step(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(GPT, "forward", forward)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def _nonfinite(fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    run = tmp_path / "run"
    root = run / "checkpoints"
    seen = _inject(monkeypatch, fault, root)
    code = execute({"train.max_steps": 10, "train.save_every": 3}, run)
    err = capsys.readouterr().err
    assert code == 4, err
    assert seen["optimizer_steps"] == FAULT_STEP - 1  # stopped before the optimizer step
    assert step_names(root) == ["step_0000003"]  # none at or after the fault
    assert published_hashes(root) == seen["before"] and temps(root) == []  # the last checkpoint untouched
    assert "non-finite" in err and "loss=" in err and "grad_norm=" in err
    assert f"step {FAULT_STEP - 1}" in err or f"step {FAULT_STEP}" in err
    assert str(root / "step_0000003") in err  # the last good checkpoint
    return err


def test_case_21_nan_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    err = _nonfinite("nan loss", tmp_path, monkeypatch, capsys)
    assert "loss=nan" in err


def test_case_22_finite_loss_infinite_grad_norm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _nonfinite("inf grad", tmp_path, monkeypatch, capsys)
    loss = float(re.search(r"loss=([^,\s]+)", err).group(1))  # type: ignore[union-attr]
    grad = re.search(r"grad_norm=([^,\s.]+(?:\.\d+)?)", err).group(1)  # type: ignore[union-attr]
    assert math.isfinite(loss) and not math.isfinite(float(grad))


def test_case_23_out_of_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _inject(monkeypatch, "oom", run / "checkpoints")
    code = execute({"train.max_steps": 10, "train.save_every": 3}, run)
    err = capsys.readouterr().err
    assert code == 5, err
    assert "out of memory" in err and "Traceback" not in err
    assert "train.batch_size=4" in err and "model.block_size=32" in err  # the sizes in use
    assert "train.grad_accum" in err and "train.batch_size=<smaller>" in err  # the overrides that reduce memory
