"""QuantRecipe: one object for what a quant config or a manifest's `quant` section means."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest
import torch

from qtrain.config import ModelConfig, QuantConfig
from qtrain.model import GPT
from qtrain.quant import ptq
from qtrain.quant.fake import FakeQuantLinear
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear, QuantEmbedding
from qtrain.quant.recipe import QuantRecipe

TINY = ModelConfig()  # 2 layers, width 96, tied embeddings


@pytest.fixture(scope="module")
def base() -> GPT:
    model = GPT(TINY)
    model.init_weights(0)
    return model


def _idx() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


LABELS = [  # config -> (label, short_label, banner_label)
    (QuantConfig(), ("full precision", "fp32", "full precision")),
    (QuantConfig(scheme="int8"), ("int8", "int8", "int8")),
    (QuantConfig(scheme="int8", activations="int8"), ("int8 + int8 activations", "int8 +act8", "int8")),
    (QuantConfig(scheme="int4", group_size=32), ("int4 group 32", "int4 g32", "int4 (group 32, symmetric)")),
    (
        QuantConfig(scheme="int4", group_size=128, symmetric=False, lm_head=True),
        ("int4 group 128 asymmetric + lm_head", "int4 g128 asym +head", "int4 (group 128, asymmetric)"),
    ),
    (
        QuantConfig(scheme="int4", group_size=-1, embeddings=True, lm_head=True),
        ("int4 per channel + embeddings + lm_head", "int4 per-channel +head +emb", "int4 (per channel, symmetric)"),
    ),
    (
        QuantConfig(scheme="int8da_int4w"),
        ("int8da_int4w group 32", "int8da_int4w g32", "int8da_int4w (group 32, symmetric)"),
    ),
    (
        QuantConfig(scheme="int8da_int4w", group_size=64, activations="int8"),
        ("int8da_int4w group 64", "int8da_int4w g64", "int8da_int4w (group 64, symmetric)"),
    ),
]


@pytest.mark.parametrize(("qcfg", "texts"), LABELS, ids=[t[0] for _, t in LABELS])
def test_labels(qcfg: QuantConfig, texts: tuple[str, str, str]) -> None:
    r = QuantRecipe.from_config(qcfg)
    assert (r.label, r.short_label, r.banner_label) == texts
    assert r.full_precision == (qcfg.scheme == "none")
    assert r.weight_bits == {"none": 32, "int8": 8}.get(qcfg.scheme, 4)
    assert r.quantizes_activations == (qcfg.activations == "int8" or qcfg.scheme == "int8da_int4w")
    # a report's `quant` dict (with `method`) builds the same recipe
    assert QuantRecipe.from_config({**asdict(qcfg), "method": "rtn"}).key == r.key


def test_from_config_copies_and_with_changes_only_what_it_names() -> None:
    qcfg = QuantConfig(scheme="int4")
    r = QuantRecipe.from_config(qcfg)
    qcfg.group_size = 64
    assert r.config.group_size == 32  # a copy: the run's config object can change independently
    r2 = r.with_(kernel="reference", learn_scales=True)
    assert (r2.config.kernel, r2.learn_scales, r.config.kernel, r.learn_scales) == ("reference", True, "auto", False)
    assert r2.same_as(r)  # the kernel is not part of what is stored


def test_same_as_and_difference_in_words() -> None:
    int4 = QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=32))
    int8 = QuantRecipe.from_config(QuantConfig(scheme="int8", group_size=128))
    assert int8.same_as(QuantRecipe.from_config(QuantConfig(scheme="int8")))  # int8 ignores group_size
    assert int4.difference(int8) == "holds int4 group 32 weights, but this run asks for int8"
    head = QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=32, lm_head=True))
    assert not int4.same_as(head)
    assert int4.difference(head, weights_only=True) is None
    fp = QuantRecipe.from_manifest(None)
    assert fp.full_precision and fp.label == "full precision"
    assert fp.difference(int4) == "holds full precision weights, but this run asks for int4 group 32"
    da = QuantRecipe.from_config(QuantConfig(scheme="int8da_int4w"))
    assert da.same_as(QuantRecipe.from_config(QuantConfig(scheme="int8da_int4w", activations="int8")))


def test_problems_name_layer_and_value(base: GPT) -> None:
    assert QuantRecipe.from_config(QuantConfig()).problems(base) == []
    assert QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=32)).problems(base) == []
    (bad,) = QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=64)).problems(base)
    assert "group_size=64" in bad and "blocks.0.attn.qkv" in bad and "K=96" in bad
    (sym,) = QuantRecipe.from_config(QuantConfig(scheme="int8", symmetric=False)).problems(base)
    assert "quant.symmetric" in sym
    (kern,) = QuantRecipe.from_config(QuantConfig(scheme="int8", kernel="fast")).problems(base)
    assert "quant.kernel='fast'" in kern


def test_prepare_convert_facade(base: GPT) -> None:
    r = QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=32, lm_head=True))
    assert r.label == "int4 group 32 + lm_head"
    model = r.prepare(copy.deepcopy(base))
    assert isinstance(model.lm_head, FakeQuantLinear)
    assert r.target_layers(model)[-2:] == ["lm_head", "tok_emb"]  # tied: asking for the head takes both
    model = r.convert(model)
    assert isinstance(model.lm_head, Int4Linear) and isinstance(model.tok_emb, QuantEmbedding)
    with pytest.raises(ValueError, match="nothing to quantize|scheme=none"):
        QuantRecipe.from_config(QuantConfig()).prepare(copy.deepcopy(base))


def test_manifest_section_round_trip_and_rebuild(base: GPT) -> None:
    qcfg = QuantConfig(scheme="int4", group_size=32, symmetric=False, lm_head=True, kernel="reference")
    r = QuantRecipe.from_config(qcfg)
    model = r.quantize(copy.deepcopy(base), "rtn")
    section = r.manifest_section(model, method="rtn")
    expected = {
        "config": asdict(r.config),
        "state": "packed",
        "method": "rtn",
        "learn_scales": False,
        "layers": QuantRecipe.layers_of(model),
    }  # what mode=ptq wrote before the recipe existed
    assert json.dumps(section, sort_keys=True) == json.dumps(expected, sort_keys=True)
    ranges = QuantRecipe.qparam_ranges(model)
    assert ranges["lm_head.zeros"] == ("int4", 0, 15) and ranges["blocks.0.attn.qkv.scales"] is None
    assert "tok_emb.scales" not in ranges  # tied: the head's table, stored once
    stored = QuantRecipe.from_manifest(json.loads(json.dumps(section)))
    assert stored.same_as(r) and stored.layer_difference(model) is None
    assert (stored.state, stored.method, stored.label) == ("packed", "rtn", "int4 group 32 asymmetric")
    fresh = stored.rebuild(GPT(TINY), kernel="reference")
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(_idx()), model(_idx()))
    int8 = QuantRecipe.from_config(QuantConfig(scheme="int8"))
    other = QuantRecipe.from_manifest(int8.manifest_section(int8.convert(copy.deepcopy(base))))
    assert stored.difference(other) == "holds int4 group 32 asymmetric weights, but this run asks for int8"
    assert QuantRecipe.from_manifest(None).manifest_section(copy.deepcopy(base)) is None


def test_fake_manifest_rebuilds_a_fake_model_and_expected_layers(base: GPT) -> None:
    r = QuantRecipe.from_config(QuantConfig(scheme="int8da_int4w"), learn_scales=True)
    model = r.prepare(copy.deepcopy(base))
    section = r.manifest_section(model)
    assert section is not None and (section["state"], section["learn_scales"]) == ("fake", True)
    stored = QuantRecipe.from_manifest(section)
    with torch.device("meta"):
        fresh = stored.rebuild(GPT(TINY))
        implied = stored.expected_layers(GPT(TINY))
    assert isinstance(fresh.blocks[0].attn.qkv, FakeQuantLinear) and fresh.blocks[0].attn.qkv.learn_scales
    assert implied == section["layers"] == QuantRecipe.layers_of(fresh)


def test_bits_report_and_ptq_registry(base: GPT) -> None:
    r = QuantRecipe.from_config(QuantConfig(scheme="int8"))
    assert r.bits_report(copy.deepcopy(base)) == {"bits_per_weight": 0.0, "quantized_weights": 0}
    model = r.quantize(copy.deepcopy(base), "mse", grid=4)
    assert isinstance(model.blocks[0].mlp.down, Int8Linear)
    n = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))
    rep = r.bits_report(model)
    assert rep["quantized_weights"] == n and 8.0 < rep["bits_per_weight"] < 8.5  # int8 codes + bf16 row scales
    assert {m: e.needs_calibration for m, e in ptq.METHODS.items()} == {"rtn": False, "mse": False, "gptq": True}
    with pytest.raises(ValueError, match="ptq.method=gptq needs calibration"):
        r.quantize(copy.deepcopy(base), "gptq", None)
    with pytest.raises(ValueError, match="ptq.method='awq' is not one of"):
        r.quantize(copy.deepcopy(base), "awq")


def test_manifest_state_of_a_model_whose_targets_are_all_kept(base: GPT) -> None:
    """Hooks may keep every target in full precision: still "fake" while training, "packed" when finished."""
    r = QuantRecipe.from_config(QuantConfig(scheme="int4"), learn_scales=True)
    training = r.manifest_section(copy.deepcopy(base))
    assert training is not None and (training["state"], training["learn_scales"], training["layers"]) == (
        "fake",
        True,
        {},
    )
    finished = r.manifest_section(copy.deepcopy(base), method="qat")
    assert finished is not None and (finished["state"], finished["learn_scales"]) == ("packed", False)
