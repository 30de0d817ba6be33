"""`qtrain mode=verify` / `mode=upgrade` and the safetensors writer behind every checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtrain import checkpoint as ck
from tests.reliability.conftest import FIXTURES, copy_run, execute, manifest, tree_hashes, write_manifest


def test_write_safetensors_round_trips_every_dtype(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.tensor(5),
        "i8": torch.randint(-8, 8, (4, 3), dtype=torch.int8),
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6)[:, ::2],
    }
    path = tmp_path / "t.safetensors"
    ck.write_safetensors(tensors, path, metadata={"format": "qtrain"})
    ck.check_safetensors_header(path)
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k


def test_verify_prints_the_summary_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixture = FIXTURES / "v2_int4"
    assert execute({"mode.name": "verify", "init_from": str(fixture)}, tmp_path / "v") == 0
    out = capsys.readouterr().out
    for needle in ("quantization per layer", "blocks.0.attn.qkv", "model.safetensors", "total", "format_version"):
        assert needle in out
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["ok"] and report["step"] == manifest(fixture)["step"]
    assert report["format_version"] == 2 and report["scheme"] == "int4 group 32"
    assert report["checkpoint_bytes"] == sum(p.stat().st_size for p in fixture.iterdir())
    assert report["torch_version"] and report["qtrain_version"]


def test_verify_of_a_run_dir_checks_every_checkpoint(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    assert execute({"mode.name": "verify", "init_from": str(run)}, tmp_path / "ok") == 0
    assert json.loads((tmp_path / "ok" / "report.json").read_text())["verified"] == 2
    old = run / "checkpoints" / "step_0000002" / ck.TRAINER_FILE
    old.write_bytes(old.read_bytes()[:-4])  # an older checkpoint went bad: verify says so
    capsys.readouterr()
    assert execute({"mode.name": "verify", "init_from": str(run)}, tmp_path / "bad") == 3
    err = capsys.readouterr().err
    assert "1 of 2 checkpoint(s) refused" in err and str(old) in err


def test_verify_refuses_weights_that_do_not_fit_the_manifest_model(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = copy_run(trained / "checkpoints" / "step_0000004", tmp_path / "ckpt")
    m = manifest(ckpt)
    m["model"]["n_layer"] = 2  # consistent files, but the weights cannot fill this model
    write_manifest(ckpt, m)
    assert execute({"mode.name": "verify", "init_from": str(ckpt)}, tmp_path / "v") == 3
    assert "blocks.1" in capsys.readouterr().err


def test_upgrade_of_a_current_checkpoint_is_a_verified_copy(trained: Path, tmp_path: Path) -> None:
    src = trained / "checkpoints" / "step_0000004"
    before = tree_hashes(src)
    out = tmp_path / "new" / "copy"
    assert execute({"mode.name": "upgrade", "init_from": str(trained), "out": str(out)}, tmp_path / "u") == 0
    assert tree_hashes(src) == before
    a, b = ck.load_checkpoint(src), ck.load_checkpoint(out)
    assert a.model_state.keys() == b.model_state.keys()
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert a.trainer_tensors.keys() == b.trainer_tensors.keys()
    assert manifest(out)["upgraded_from"]["path"] == str(src.resolve())
