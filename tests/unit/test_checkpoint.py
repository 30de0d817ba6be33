"""Checkpoint format: round trip, tied weights, versions and migration, the committed fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtrain import checkpoint as ck
from qtrain.config import ModelConfig
from qtrain.errors import CheckpointError
from qtrain.model import GPT
from qtrain.modes.loading import model_from_checkpoint
from tests.numerics import assert_close_across_cpus, model_reductions

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _payload(model: GPT) -> ck.Payload:
    return ck.Payload(model_state=dict(model.state_dict()), trainer_meta={"x": {"t": torch.arange(3), "n": 1}},
                      manifest={"model": vars(model.cfg).copy()})


def test_save_load_identical_logits_and_tied_weights_stored_once(tmp_path: Path) -> None:
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, mlp_hidden=64, block_size=32))
    model.init_weights(0)
    path = ck.save_checkpoint(tmp_path, 7, _payload(model), keep=2)
    stored = load_file(str(path / ck.MODEL_FILE))
    assert "lm_head.weight" not in stored and "tok_emb.weight" in stored
    loaded = ck.load_checkpoint(path)
    assert loaded.manifest["format_version"] == ck.FORMAT_VERSION and loaded.manifest["step"] == 7
    assert torch.equal(loaded.trainer_meta["x"]["t"], torch.arange(3))
    again = model_from_checkpoint(loaded, torch.device("cpu"))
    assert again.lm_head.weight is again.tok_emb.weight
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert (tmp_path / ck.LATEST).read_text().strip() == "step_0000007"
    assert not list(tmp_path.glob(".tmp-*"))


def test_manifest_lists_sizes_and_hashes(tmp_path: Path) -> None:
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, mlp_hidden=64, block_size=32))
    path = ck.save_checkpoint(tmp_path, 1, _payload(model), keep=2)
    manifest = json.loads((path / ck.MANIFEST).read_text())
    for name in (ck.MODEL_FILE, ck.TRAINER_FILE, ck.TRAINER_META):
        assert manifest["files"][name]["bytes"] == (path / name).stat().st_size
        assert len(manifest["files"][name]["sha256"]) == 64
    assert {"qtrain_version", "torch_version", "quant", "model"} <= set(manifest)


def test_retention_keeps_newest(tmp_path: Path) -> None:
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, mlp_hidden=64, block_size=32))
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, _payload(model), keep=2)
    assert [d.name for d in ck.list_step_dirs(tmp_path)] == ["step_0000003", "step_0000004"]


def test_newer_format_refused(tmp_path: Path) -> None:
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, mlp_hidden=64, block_size=32))
    path = ck.save_checkpoint(tmp_path, 1, _payload(model), keep=2)
    m = json.loads((path / ck.MANIFEST).read_text())
    m["format_version"] = ck.FORMAT_VERSION + 1
    (path / ck.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=f"format_version {ck.FORMAT_VERSION + 1}.*{ck.FORMAT_VERSION}"):
        ck.load_checkpoint(path)


def test_v1_fixture_loads_migrates_and_gives_stored_logits() -> None:
    src = FIXTURES / "v1_fp"
    assert json.loads((src / ck.MANIFEST).read_text())["format_version"] == 1
    loaded = ck.load_checkpoint(src)
    assert loaded.manifest["format_version"] == ck.FORMAT_VERSION and loaded.manifest["quant"] is None
    model = model_from_checkpoint(loaded, torch.device("cpu"))
    expected = load_file(str(src) + ".expected.safetensors")["logits"]
    with torch.no_grad():
        # Not bit-exact: AVX-512 kernels sum in another order than the AVX2 machine that stored them.
        got = model(torch.arange(32).view(1, 32))
    assert_close_across_cpus(got, expected, **model_reductions(loaded.manifest["model"]))
