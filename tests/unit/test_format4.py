"""Checkpoint format 4: the model's attention/rotary fields and the tokenizer section; the v3 fixture."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

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
V3 = FIXTURES / "v3_int4"
NEW_FIELDS = {
    "n_kv_head": None,
    "head_dim": None,
    "attn_bias": False,
    "qk_norm": False,
    "rope_scaling": "none",
    "rope_factor": 8.0,
    "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0,
    "rope_original_context": 8192,
}
BYTES = {"kind": "bytes", "vocab_size": 256, "file": None, "sha256": None}
SHAPE = dict(n_layer=1, n_embd=64, n_head=4, n_kv_head=2, head_dim=24, attn_bias=True, qk_norm=True,
             rope_scaling="llama3", rope_original_context=16, block_size=32, mlp_hidden=96,
             tie_embeddings=False)  # fmt: skip


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / ck.MANIFEST).read_text())


def test_format_is_4_and_every_older_version_migrates() -> None:
    assert ck.FORMAT_VERSION == 4
    assert set(ck.MIGRATIONS) == {1, 2, 3}


def test_v3_fixture_loads_migrates_and_gives_stored_logits() -> None:
    raw = _manifest(V3)
    assert raw["format_version"] == 3 and "tokenizer" not in raw and "n_kv_head" not in raw["model"]
    loaded = ck.load_checkpoint(V3, with_trainer=False)
    m = loaded.manifest
    assert m["format_version"] == 4 and m["migrated_from"] == 3
    assert m["model"] == {**raw["model"], **NEW_FIELDS}
    assert m["tokenizer"] == BYTES
    body = {k: v for k, v in m.items() if k != "migrated_from"}  # added after the migration, never stored
    assert m[ck.MANIFEST_HASH] == ck.manifest_digest(body) != raw[ck.MANIFEST_HASH]  # sealed again
    assert ModelConfig(**m["model"]) == ModelConfig(**raw["model"])  # the same model as before format 4
    expected = load_file(str(V3) + ".expected.safetensors")["logits"]
    # The stored logits came from PyTorch's packed int4 kernel: the same kernel here, so only the
    # summation order of this CPU can differ (tests/numerics.py).
    model = model_from_checkpoint(loaded, torch.device("cpu"), "torch")
    with torch.no_grad():
        got = model(torch.arange(32).view(1, 32))
    assert_close_across_cpus(got, expected, **model_reductions(m["model"]))


def test_migration_fills_defaults_keeps_a_tokenizer_and_reseals() -> None:
    raw = _manifest(V3)
    out = ck.migrate_v3_to_v4(raw)
    assert out is not raw and raw["format_version"] == 3  # the input is not changed
    assert out["format_version"] == 4 and out[ck.MANIFEST_HASH] == ck.manifest_digest(out)
    assert out[ck.MANIFEST_HASH] != raw[ck.MANIFEST_HASH]
    tok = {"kind": "bpe", "vocab_size": 1024, "file": "tokenizer.json", "sha256": "0" * 64}
    kept = ck.migrate_v3_to_v4({**raw, "tokenizer": tok})
    assert kept["tokenizer"] == tok
    assert ck.migrate_v3_to_v4({**raw, "model": None})["model"] is None


def test_upgrade_writes_a_sealed_v4_that_loads_without_migration(tmp_path: Path) -> None:
    out = ck.upgrade_checkpoint(V3, tmp_path / "v4")
    m = _manifest(out)
    assert m["format_version"] == 4 and m["upgraded_from"]["format_version"] == 3
    assert m["model"]["n_kv_head"] is None and m["tokenizer"] == BYTES
    assert (out / ck.MANIFEST).read_bytes() == ck.json_file_bytes(m)
    assert "migrated_from" not in ck.load_checkpoint(out).manifest
    m["model"]["n_kv_head"] = 1  # a new field is protected by the seal like the others
    (out / ck.MANIFEST).write_bytes(ck.json_file_bytes(m))
    with pytest.raises(CheckpointError, match="manifest hash mismatch"):
        ck.load_checkpoint(out)


def _saved(tmp_path: Path) -> tuple[GPT, Path]:
    model = GPT(ModelConfig(**SHAPE))
    model.init_weights(0)
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias.normal_(generator=torch.Generator().manual_seed(1))
    payload = ck.Payload(model_state=dict(model.state_dict()), manifest={"model": asdict(model.cfg)})
    return model.eval(), ck.save_checkpoint(tmp_path / "ckpts", 1, payload, keep=2)


def test_a_gqa_model_with_biases_and_qk_norms_round_trips(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    loaded = ck.load_checkpoint(path)
    assert loaded.manifest["format_version"] == 4 and loaded.manifest["model"] == asdict(model.cfg)
    again = model_from_checkpoint(loaded, torch.device("cpu"))
    assert again.cfg == model.cfg
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    m = _manifest(path)
    change(m["model"])
    (path / ck.MANIFEST).write_bytes(ck.json_file_bytes(ck.seal_manifest(m)))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda m: m.update(n_kv_head=3), "model.n_kv_head"),
        (lambda m: m.update(n_kv_head="2"), "model.n_kv_head"),
        (lambda m: m.update(n_kv_head=0), "model.n_kv_head"),
        (lambda m: m.update(head_dim=23), "model.head_dim"),
        (lambda m: m.update(attn_bias=1), "model.attn_bias"),
        (lambda m: m.update(rope_scaling="yarn"), "model.rope_scaling"),
        (lambda m: m.update(rope_high_freq_factor=0.5), "model.rope_high_freq_factor"),
        (lambda m: m.pop("qk_norm"), "lacks ['qk_norm']"),
        # a valid value that describes other tensor shapes
        (lambda m: m.update(n_kv_head=1), "blocks.0.attn.qkv.bias. is F32 .192., but .* needs F32 .144."),
        (lambda m: m.update(qk_norm=False), "unexpected blocks.0.attn.k_norm.weight"),
    ],
    ids=["n_kv_head=3", "n_kv_head str", "n_kv_head=0", "odd head_dim", "bias int", "yarn", "high<low",
         "missing", "kv shape", "norms"],  # fmt: skip
)
def test_the_new_fields_are_checked_before_building(tmp_path: Path, change: Callable, needle: str) -> None:
    _, path = _saved(tmp_path)
    _edit(path, change)
    with pytest.raises(CheckpointError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        ck.load_checkpoint(path)
