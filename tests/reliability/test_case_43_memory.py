"""RELIABILITY.md case 43: memory that does not fit is refused before anything is allocated (exit 5).

The class: a model, batch, context or calibration set larger than the memory the process may
use, and an allocator that runs out anyway. The available memory is set by monkeypatching
`qtrain.sysmem.available_memory` (the real machine's is printed in every run); nothing here
allocates more than a tiny model needs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from qtrain import checkpoint as ck
from qtrain import sysmem
from qtrain.model import GPT
from qtrain.modes import memory, memory_fixes
from tests.conftest import compose_cfg
from tests.reliability.conftest import (
    copy_run,
    execute,
    losses,
    manifest,
    published_hashes,
    qtrain,
    step_names,
    temps,
    train_args,
    write_manifest,
)

MACHINE_24GB = 22 * 2**30
"""What one process may use on a 24 GiB machine, leaving 2 GiB to the operating system."""
SIZES = ("tiny", "small", "medium", "base", "1b")


def _limit(monkeypatch: pytest.MonkeyPatch, n: int, source: str = "test: a 24 GB machine") -> None:
    monkeypatch.setattr(sysmem, "available_memory", lambda *a, **k: sysmem.Available(n, source))


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any model is built or any checkpoint tensor read (refused before allocating)."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("allocated before the memory check refused the run")

    monkeypatch.setattr(GPT, "__init__", refuse)
    monkeypatch.setattr(ck, "load_checkpoint", refuse)


def _fixes(err: str) -> list[list[str]]:
    """The override sets a refusal suggests ("Overrides that fit: a=1 b=2 (...); or c=3 (...)")."""
    tail = err.split("Overrides that fit:", 1)[1]
    return [re.findall(r"[\w.]+=\S+", part.split("(")[0]) for part in tail.split("; or ")]


def _fits(overrides: list[str]) -> int:
    cfg = compose_cfg(overrides)
    GlobalHydra.instance().clear()
    return memory.estimate(cfg, cfg.model, memory.Setting(baseline=sysmem.current_rss())).total


def test_case_43_default_base_refused_before_allocating_with_overrides_that_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _limit(monkeypatch, MACHINE_24GB)
    code = qtrain(["mode=train", "model=base", "train.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 5, err
    assert "Traceback" not in err and "not enough memory" in err
    for needle in (
        "train.batch_size=32",
        "model.block_size=1024",
        "train.grad_accum=",
        "activation_checkpointing=true",
    ):
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "test: a 24 GB machine" in err and "activations" in err  # what it compared, and why
    fixes = _fixes(err)
    assert fixes and all(_fits(["mode=train", "model=base", *f]) <= MACHINE_24GB for f in fixes)


def test_case_43_1b_refused_with_a_combination_that_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _limit(monkeypatch, MACHINE_24GB)
    code = qtrain(["mode=train", "model=1b", "train.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 5 and "Traceback" not in err, err
    fixes = _fixes(err)
    assert any("train.activation_checkpointing=true" in f for f in fixes), err  # batch splitting alone cannot fit
    assert all(_fits(["mode=train", "model=1b", *f]) <= MACHINE_24GB for f in fixes)


@pytest.mark.parametrize("mode", ["train", "qat"])
@pytest.mark.parametrize("size", SIZES)
def test_case_43_every_model_size_fits_24gb_or_names_the_override(mode: str, size: str) -> None:
    """Pure arithmetic: each preset's defaults fit one process on a 24 GB machine, or the refusal's
    overrides (the same the CLI prints) do."""
    cfg = compose_cfg([f"mode={mode}", f"model={size}"])
    GlobalHydra.instance().clear()
    setting = memory.Setting(baseline=memory.RUNTIME_BYTES)
    if memory.estimate(cfg, cfg.model, setting).total <= MACHINE_24GB:
        return
    fixes = memory_fixes.remedies(cfg, cfg.model, MACHINE_24GB, setting)
    assert fixes, f"model={size} mode={mode}: nothing fits 24 GB"
    for fix in fixes:
        overrides = re.findall(r"[\w.]+=\S+", fix.split("(")[0])
        changed = compose_cfg([f"mode={mode}", f"model={size}", *overrides])
        GlobalHydra.instance().clear()
        assert memory.estimate(changed, changed.model, setting).total <= MACHINE_24GB, fix


def test_case_43_gptq_calibration_too_big_refused_before_loading(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another member: PTQ whose calibration set (ptq.calib_batches x train.batch_size windows) cannot fit."""
    _limit(monkeypatch, 2 * 2**30)
    loads: list[object] = []
    monkeypatch.setattr(ck, "load_checkpoint", lambda *a, **k: loads.append(a) or pytest.fail("tensors read"))
    changes = {"mode.name": "ptq", "quant.scheme": "int4", "ptq.method": "gptq", "ptq.calib_batches": 10**6}
    code = execute({**changes, "init_from": str(trained)}, tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 5 and not loads, err
    assert "calibration" in err and re.search(r"ptq\.calib_batches=\d+ \(about", err), err
    assert "Traceback" not in err


def test_case_43_manifest_claiming_a_huge_model_is_refused_as_damaged_not_as_too_big(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resealed manifest saying n_layer=100000: the checkpoint is checked first (exit 3), never allocated."""
    run = copy_run(trained, tmp_path / "copy")
    ckpt = run / "checkpoints" / "step_0000004"
    m = manifest(ckpt)
    m["model"]["n_layer"] = 100_000
    write_manifest(ckpt, m)
    code = execute({"mode.name": "ptq", "quant.scheme": "int8", "init_from": str(ckpt)}, tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 3, err
    assert "Traceback" not in err and str(ckpt) in err


@pytest.mark.parametrize("fault", ["cpu allocator", "torch.OutOfMemoryError", "MemoryError"])
def test_case_43_out_of_memory_while_training_exits_5_with_advice(
    fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The allocator runs out anyway (the estimate is an estimate): exit 5, advice, nothing lost."""
    run = tmp_path / "run"
    assert execute({"train.max_steps": 2, "train.save_every": 2}, run) == 0
    before = published_hashes(run / "checkpoints")
    original = GPT.forward

    def forward(self: GPT, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.training:
            if fault == "cpu allocator":  # a real allocation the allocator refuses (4 EiB), not a simulation
                torch.empty(2**62, dtype=torch.uint8)
            raise torch.OutOfMemoryError("out of memory") if fault != "MemoryError" else MemoryError()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward)
    code = execute({"train.max_steps": 4, "train.save_every": 2}, run)
    err = capsys.readouterr().err
    assert code == 5, err
    assert "Traceback" not in err and "out of memory" in err
    assert "train.batch_size=4" in err and "model.block_size=32" in err  # the sizes in use
    for needle in ("train.grad_accum", "train.activation_checkpointing=true", "model.block_size"):
        assert needle in err
    assert published_hashes(run / "checkpoints") == before and temps(run / "checkpoints") == []
    assert step_names(run / "checkpoints") == ["step_0000002"]


def test_case_43_estimate_printed_first_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert qtrain(train_args(run, 2, "train.activation_checkpointing=true")) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    memory_line = next(i for i, line in enumerate(lines) if line.startswith("memory: about"))
    assert memory_line <= 2 and "available" in lines[memory_line], out  # right after the banner
    report = json.loads((run / "report.json").read_text())
    assert 0 < report["memory_estimate_bytes"] < report["memory_available_bytes"]


def test_case_43_activation_checkpointing_trains_the_same(tmp_path: Path) -> None:
    """The suggested remedy changes memory, not results: the same losses step by step."""
    runs = {}
    for flag in ("false", "true"):
        run = tmp_path / flag
        assert qtrain(train_args(run, 3, "train.log_every=1", f"train.activation_checkpointing={flag}")) == 0
        runs[flag] = losses(run)
    assert [s for s, _ in runs["true"]] == [s for s, _ in runs["false"]] == [1, 2, 3]
    for (_, a), (_, b) in zip(runs["true"], runs["false"], strict=True):
        # the same float32 ops recomputed; three AdamW steps amplify last-bit differences only slightly
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
