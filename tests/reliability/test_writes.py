"""RELIABILITY.md, checkpoint writes: cases 1-5 (case 6, DDP, is in test_ddp.py)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from qtrain import checkpoint as ck
from qtrain.checkpoint import write as ck_write  # the low-level writers the tests break
from qtrain.config import ModelConfig
from qtrain.model import GPT
from qtrain.train import Trainer
from tests.reliability.conftest import (
    assert_same_weights,
    execute,
    losses,
    published_hashes,
    qtrain,
    start_child,
    step_names,
    temps,
    train_args,
)


def test_case_01_sigkill_between_weights_and_manifest(
    tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    root = run / "checkpoints"
    args = train_args(run, 8, "train.save_every=2", "train.log_every=1")
    hashes_file = tmp_path / "hashes-at-kill.json"
    proc = start_child(args, {"QTRAIN_TEST_KILL_BEFORE_MANIFEST": "4", "QTRAIN_TEST_HASHES_FILE": str(hashes_file)})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, f"child was not SIGKILLed at the save of step 4:\n{out}\n{err}"
    # The weights files of step 4 exist in the temporary directory, without a manifest.
    (tmp,) = [p for p in root.glob(".tmp-step_0000004-*")]
    assert (tmp / ck.MODEL_FILE).is_file() and not (tmp / ck.MANIFEST).exists()
    # Nothing lost: `latest` names step 2, byte-identical to what was published before the kill.
    assert (root / ck.LATEST).read_text().strip() == "step_0000002"
    assert step_names(root) == ["step_0000002"]
    assert published_hashes(root) == json.loads(hashes_file.read_text())
    # The same command resumes from step 2 and says which incomplete directory it ignored.
    capsys.readouterr()
    assert qtrain(args) == 0
    cap = capsys.readouterr()
    assert f"ignoring {tmp}" in cap.err and "incomplete" in cap.err
    assert f"continuing from {root / 'step_0000002'} (step 2)" in cap.out
    assert temps(root) == []  # the next save cleaned the killed process's leftovers
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]  # appended, steps 3-4 redone
    assert_same_weights(root / "step_0000008", reference / "checkpoints" / "step_0000008")


def test_case_02_unserializable_trainer_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    root = run / "checkpoints"
    before: dict[str, Any] = {}
    original = Trainer.state_dict

    def state_dict(self: Trainer) -> dict[str, Any]:
        state = original(self)
        if self.step == 4:
            before.update(published_hashes(root))
            state["extra_hook"] = {"handle": object()}  # e.g. a hook stored an object in the state
        return state

    monkeypatch.setattr(Trainer, "state_dict", state_dict)
    code = qtrain(train_args(run, 4, "train.save_every=2"))
    assert code == 1
    err = capsys.readouterr().err
    assert "trainer state key 'meta.trainer.extra_hook.handle'" in err
    assert before and published_hashes(root) == before  # nothing lost
    assert temps(root) == [] and step_names(root) == ["step_0000002"]


class _FullDisk:
    """A file whose writes fail with ENOSPC once `free` bytes are used up (a real partial write)."""

    def __init__(self, real: IO[bytes], budget: list[int]) -> None:
        self.real, self.budget = real, budget

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.budget[0]:
            self.real.write(bytes(memoryview(data).cast("B")[: self.budget[0]]))
            self.budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.real.name)
        self.budget[0] -= n
        return self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()


def test_case_03_disk_full_during_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    root = run / "checkpoints"
    before: dict[str, str] = {}
    budget = [50_000]  # the disk fills up in the middle of step 6's model file
    original = ck_write.open_new

    def open_new(path: Path) -> IO[bytes]:
        if "step_0000006" not in path.parent.name:
            return original(path)
        if not before:
            before.update(published_hashes(root))
        return _FullDisk(original(path), budget)  # type: ignore[return-value]

    monkeypatch.setattr(ck_write, "open_new", open_new)
    code = execute({"train.max_steps": 6, "train.save_every": 2, "train.keep": 2}, run)
    assert code == 5
    err = capsys.readouterr().err
    assert "disk full" in err and "needs about" in err and "bytes free" in err
    assert budget[0] == 0, "the fault was never reached"
    assert temps(root) == []  # temporary directory removed
    assert step_names(root) == ["step_0000002", "step_0000004"]  # retention deleted nothing
    assert published_hashes(root) == before  # previous checkpoints byte-identical
    assert (root / ck.LATEST).read_text().strip() == "step_0000004"


def test_case_03_safetensors_writes_report_enospc_as_oserror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights go through Python file I/O, so a full disk is an OSError(ENOSPC), not a Rust error."""
    budget = [100]
    original = ck_write.open_new
    monkeypatch.setattr(ck_write, "open_new", lambda p: _FullDisk(original(p), budget))
    with pytest.raises(OSError) as info:
        ck.write_safetensors({"w": torch.zeros(1000)}, tmp_path / "w.safetensors")
    assert info.value.errno == errno.ENOSPC


def test_case_04_output_dir_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_model(*_: object, **__: object) -> None:
        raise AssertionError("a model was built before the output directory was checked")

    monkeypatch.setattr(GPT, "__init__", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    targets = [blocker / "run"]  # under a regular file: never writable, even for root
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        targets.append(locked / "run")
    for run in targets:
        code = qtrain(train_args(run, 2))
        assert code == 2
        err = capsys.readouterr().err
        assert str(run) in err and "not writable" in err
        assert not run.exists()


def _payload(model: GPT) -> ck.Payload:
    return ck.Payload(model_state=dict(model.state_dict()), manifest={"model": vars(model.cfg).copy()})


def test_case_05_retention_keeps_the_last_valid_checkpoint(tmp_path: Path) -> None:
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, mlp_hidden=64, block_size=32))
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, _payload(model), keep=2)
    assert step_names(tmp_path) == ["step_0000002", "step_0000003"]

    # Pruning happens only after the new checkpoint is published.
    seen: list[list[str]] = []
    ck.save_checkpoint(
        tmp_path, 4, _payload(model), keep=2, before_publish=lambda tmp: seen.append(step_names(tmp_path))
    )
    assert seen == [["step_0000002", "step_0000003"]]
    assert step_names(tmp_path) == ["step_0000003", "step_0000004"]

    # The newest is corrupt: the last valid one (3) is never pruned, whatever else happens.
    newest = tmp_path / "step_0000004" / ck.MODEL_FILE
    newest.write_bytes(newest.read_bytes()[:-10])
    assert ck.prune(tmp_path, keep=2) == []
    assert step_names(tmp_path) == ["step_0000003", "step_0000004"]

    # A new checkpoint is published corrupt (the disk lied): keep=2 counts valid ones, so 3 survives.
    def corrupt(tmp: Path) -> None:
        f = tmp / ck.MODEL_FILE
        f.write_bytes(f.read_bytes()[:-10])

    ck.save_checkpoint(tmp_path, 5, _payload(model), keep=2, before_publish=corrupt)
    assert "step_0000003" in step_names(tmp_path)
    found, _ = ck.find_latest_valid(tmp_path)
    assert found == tmp_path / "step_0000003"

    # Two newer valid ones: now 3 may go, the corrupt 4 and 5 are older than the cutoff too.
    for step in (6, 7):
        ck.save_checkpoint(tmp_path, step, _payload(model), keep=2)
    assert step_names(tmp_path) == ["step_0000006", "step_0000007"]
