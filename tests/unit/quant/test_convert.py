"""prepare / convert / specs / skeletons on the GPT, tied-weight policy, golden keys."""

from __future__ import annotations

import copy

import pytest
import torch

from qtrain import quant as api
from qtrain.config import ModelConfig, QuantConfig
from qtrain.model import GPT
from qtrain.quant import primitives as P
from qtrain.quant.fake import FakeQuantEmbedding, FakeQuantLinear
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear, QuantEmbedding

TINY = ModelConfig()  # 2 layers, width 96, tied embeddings
PRESETS = {
    "tiny": ModelConfig(name="tiny", n_layer=2, n_embd=96, n_head=4, mlp_hidden=256),
    "small": ModelConfig(name="small", n_layer=6, n_embd=384, n_head=6, block_size=256, mlp_hidden=1024),
    "medium": ModelConfig(name="medium", n_layer=10, n_embd=640, n_head=10, block_size=512, mlp_hidden=1792),
}
QCFGS = {
    "int8": QuantConfig(scheme="int8"),
    "int4": QuantConfig(scheme="int4", group_size=32),
    "int4_asym_head": QuantConfig(scheme="int4", group_size=32, symmetric=False, lm_head=True),
    "int4_channel_emb": QuantConfig(scheme="int4", group_size=-1, embeddings=True),
    "int8da_int4w": QuantConfig(scheme="int8da_int4w", group_size=32),
}
LINEARS = ("attn.qkv", "attn.out", "mlp.gate_up", "mlp.down")


@pytest.fixture(scope="module")
def base() -> GPT:
    model = GPT(TINY)
    model.init_weights(0)
    return model


def _idx(t: int = 16, b: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(3))


def golden_keys(weight_keys: list[str], head: list[str] | None = None) -> list[str]:
    keys = ["tok_emb.weight"] if head is None else []
    for i in range(2):
        keys.append(f"blocks.{i}.attn_norm.weight")
        keys += [f"blocks.{i}.attn.{n}.{w}" for n in ("qkv", "out") for w in weight_keys]
        keys.append(f"blocks.{i}.mlp_norm.weight")
        keys += [f"blocks.{i}.mlp.{n}.{w}" for n in ("gate_up", "down") for w in weight_keys]
    keys.append("norm.weight")
    return keys + (["lm_head.weight"] if head is None else [f"lm_head.{w}" for w in head])


GOLDEN = {
    "int8": golden_keys(["weight_int8", "scales"]),
    "int4": golden_keys(["weight_packed", "scales"]),
    "int4_asym_head": golden_keys(["weight_packed", "scales", "zeros"], head=["weight_packed", "scales", "zeros"]),
    "int4_channel_emb": golden_keys(["weight_packed", "scales"], head=["weight_packed", "scales"]),
    "int8da_int4w": golden_keys(["weight_packed", "scales"]),
}
GOLDEN_FAKE_INT4 = golden_keys(["weight", "scales", "weight_enabled", "act_enabled", "frozen"])


def test_schemes_table_and_errors() -> None:
    assert set(api.SCHEMES) == {"int8", "int4", "int8da_int4w"}
    assert api.SCHEMES["int8"].packed is Int8Linear and api.SCHEMES["int4"].packed is Int4Linear
    with pytest.raises(ValueError, match=r"'int3' is not one of \['int8', 'int4', 'int8da_int4w'\]"):
        api.get_scheme("int3")
    assert api.spec_from_config(QuantConfig()) is None
    s = api.spec_from_config(QuantConfig(scheme="int8da_int4w", group_size=64))
    assert s == P.LayerSpec("int8da_int4w", 4, 64, True, "int8")
    assert api.spec_from_config(QuantConfig(scheme="int8", group_size=128)) == P.LayerSpec("int8", 8, -1)
    with pytest.raises(ValueError, match="quant.symmetric"):
        api.spec_from_config(QuantConfig(scheme="int8", symmetric=False))


def test_target_layers_and_tied_policy(base: GPT) -> None:
    blocks = [f"blocks.{i}.{n}" for i in range(2) for n in LINEARS]
    assert api.target_layers(base, QuantConfig(scheme="int4")) == blocks
    assert api.is_tied(base)
    # Tied: asking for either quantizes the shared matrix once, read by both.
    both = blocks + ["lm_head", "tok_emb"]
    assert api.target_layers(base, QuantConfig(scheme="int4", lm_head=True)) == both
    assert api.target_layers(base, QuantConfig(scheme="int4", embeddings=True)) == both
    untied = GPT(ModelConfig(tie_embeddings=False))
    assert api.target_layers(untied, QuantConfig(scheme="int4", embeddings=True)) == blocks + ["tok_emb"]
    assert api.target_layers(untied, QuantConfig(scheme="int4", lm_head=True)) == blocks + ["lm_head"]


@pytest.mark.parametrize("name", list(QCFGS))
def test_qat_convert_codes_and_logits(base: GPT, name: str) -> None:
    qcfg = QCFGS[name]
    model = api.prepare(copy.deepcopy(base), qcfg)
    assert isinstance(model.blocks[0].attn.qkv, FakeQuantLinear)
    idx = _idx()
    fake_logits = model(idx)
    codes = {n: m.quantized().codes.clone() for n, m in api.fake_quant_modules(model)}
    api.convert(model, qcfg)
    assert not any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) for m in model.modules())
    for n, c in codes.items():
        assert torch.equal(model.get_submodule(n).codes(), c), n
    assert list(model.state_dict()) == GOLDEN[name]
    api.set_kernel(model, "reference")
    assert torch.equal(model(idx), fake_logits)
    api.set_kernel(model, "auto")
    one = idx[:1, :8]  # 8 rows: the packed CPU kernels run
    ref = api.set_kernel(copy.deepcopy(model), "reference")(one)
    diff = (model(one) - ref).abs().max()
    assert 0 < diff <= 0.02 * ref.abs().max()


def test_rtn_convert_of_plain_model_equals_convert_after_prepare(base: GPT) -> None:
    qcfg = QCFGS["int4"]
    direct = api.convert(copy.deepcopy(base), qcfg)
    staged = api.convert(api.prepare(copy.deepcopy(base), qcfg), qcfg)
    for k, v in direct.state_dict().items():
        assert torch.equal(v, staged.state_dict()[k]), k


def test_tied_embedding_reads_the_heads_codes(base: GPT) -> None:
    qcfg = QCFGS["int4_channel_emb"]
    model = api.prepare(copy.deepcopy(base), qcfg)
    assert isinstance(model.tok_emb, FakeQuantEmbedding) and model.tok_emb.get_table() is model.lm_head
    assert "tok_emb.weight" not in model.state_dict()
    api.convert(model, qcfg)
    assert isinstance(model.tok_emb, QuantEmbedding) and model.tok_emb.get_table() is model.lm_head
    idx = _idx()
    assert torch.equal(model.tok_emb(idx), model.lm_head.dequantize()[idx])


def test_untied_embedding_is_quantized_per_row() -> None:
    model = GPT(ModelConfig(tie_embeddings=False))
    qcfg = QuantConfig(scheme="int8", embeddings=True)
    api.convert(model, qcfg)
    assert isinstance(model.tok_emb, QuantEmbedding) and model.tok_emb.tied_to is None
    assert model.state_dict()["tok_emb.table.weight_int8"].shape == (256, 96)
    assert api.layer_specs(model)["tok_emb"]["group_size"] == -1


def test_learned_scales_flow_through_convert(base: GPT) -> None:
    qcfg = QCFGS["int4_asym_head"]
    model = api.prepare(copy.deepcopy(base), qcfg, learn_scales=True)
    scales = api.scale_parameters(model)
    assert len(scales) == 9  # 8 block linears + the shared head/embedding table
    opt = torch.optim.AdamW([{"params": scales, "lr": 1e-3, "weight_decay": 0.0}])
    idx = _idx()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
    fake_logits = model(idx)
    learned = {n: P.round_scale(m.scales.detach()) for n, m in api.fake_quant_modules(model)}
    codes = {n: m.quantized().codes for n, m in api.fake_quant_modules(model)}
    assert not torch.equal(learned["lm_head"], P.choose_qparams(model.lm_head.weight, 4, 32, False)[0])
    api.convert(model, qcfg)
    for n, s in learned.items():
        mod = model.get_submodule(n)
        assert torch.equal(mod.scales, s) and torch.equal(mod.codes(), codes[n]), n
    assert torch.equal(api.set_kernel(model, "reference")(idx), fake_logits)


@pytest.mark.parametrize("name", list(QCFGS))
def test_specs_skeleton_strict_load(base: GPT, name: str) -> None:
    qcfg = QCFGS[name]
    model = api.convert(copy.deepcopy(base), qcfg)
    specs = api.layer_specs(model)
    import json

    specs = json.loads(json.dumps(specs))  # through the manifest
    skeleton = api.build_packed_skeleton(GPT(TINY), specs, kernel="auto")
    skeleton.load_state_dict(model.state_dict(), strict=True)
    idx = _idx()
    for kernel in ("reference", "auto"):
        api.set_kernel(model, kernel)
        api.set_kernel(skeleton, kernel)
        assert torch.equal(skeleton(idx), model(idx))
        assert torch.equal(skeleton(idx[:1, :4]), model(idx[:1, :4]))


def test_skeleton_on_meta_device_loads_with_assign(base: GPT) -> None:
    qcfg = QCFGS["int4_asym_head"]
    model = api.convert(copy.deepcopy(base), qcfg)
    with torch.device("meta"):
        skeleton = GPT(TINY)
    api.build_packed_skeleton(skeleton, api.layer_specs(model))
    missing = skeleton.load_state_dict(model.state_dict(), strict=True, assign=True)
    assert not missing.missing_keys
    persistent = set(model.state_dict())
    for n, b in model.named_buffers():  # non-persistent buffers (rotary tables) are not in a checkpoint
        if n not in persistent:
            owner, _, leaf = n.rpartition(".")
            setattr(skeleton.get_submodule(owner) if owner else skeleton, leaf, b)
    idx = _idx()
    assert torch.equal(skeleton(idx), model(idx))


def test_skeleton_errors_name_the_layer(base: GPT) -> None:
    specs = api.layer_specs(api.convert(copy.deepcopy(base), QCFGS["int8"]))
    bad = {**specs, "blocks.0.attn.qkv": {**specs["blocks.0.attn.qkv"], "in_features": 128}}
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv: checkpoint layer is 128->288"):
        api.build_packed_skeleton(GPT(TINY), bad)
    with pytest.raises(ValueError, match="blocks.7.attn.qkv"):
        api.build_packed_skeleton(GPT(TINY), {"blocks.7.attn.qkv": specs["blocks.0.attn.qkv"]})


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", ["int8", "int4_asym_head", "int8da_int4w"])
def test_every_size_converts_with_right_shapes(preset: str, name: str) -> None:
    cfg, qcfg = PRESETS[preset], QCFGS[name]
    with torch.device("meta"):
        model = GPT(cfg)
    api.convert(model, qcfg)
    d, h = cfg.n_embd, cfg.mlp_hidden
    shapes = {"attn.qkv": (3 * d, d), "attn.out": (d, d), "mlp.gate_up": (2 * h, d), "mlp.down": (d, h)}
    for i in range(cfg.n_layer):
        for lin, (n, k) in shapes.items():
            mod = model.get_submodule(f"blocks.{i}.{lin}")
            assert isinstance(mod, PackedLinear)
            if isinstance(mod, Int8Linear):
                assert mod.weight_int8.shape == (n, k) and mod.scales.shape == (n, 1)
            else:
                assert isinstance(mod, Int4Linear)
                assert mod.weight_packed.shape == (n, k // 2) and mod.scales.shape == (n, k // 32)
    assert len(api.layer_specs(model)) == 4 * cfg.n_layer + (2 if qcfg.lm_head else 0)


def test_group_size_errors_name_layer_and_value(base: GPT) -> None:
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: group_size=64 does not divide its input size K=96"):
        api.prepare(copy.deepcopy(base), QuantConfig(scheme="int4", group_size=64))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: group_size=64"):
        api.convert(copy.deepcopy(base), QuantConfig(scheme="int4", group_size=64))
    with pytest.raises(ValueError, match="quant.scheme=none"):
        api.prepare(copy.deepcopy(base), QuantConfig())
    with pytest.raises(ValueError, match="quant.kernel"):
        api.set_kernel(copy.deepcopy(base), "triton")


def test_to_fake_finetune_round_trip(base: GPT) -> None:
    qcfg = QCFGS["int8da_int4w"]
    packed = api.convert(copy.deepcopy(base), qcfg)
    api.set_kernel(packed, "reference")
    idx = _idx()
    ref = packed(idx)
    model = api.to_fake(copy.deepcopy(packed))
    assert torch.equal(model(idx), ref)
    again = api.convert(copy.deepcopy(model), qcfg)
    for k, v in packed.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # One fine-tuning step moves the weights; codes still follow the fake-quant forward.
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n.endswith("weight")], lr=0.5)
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    codes = {n: m.quantized().codes for n, m in api.fake_quant_modules(model)}
    tuned = api.convert(model, qcfg)
    assert any(not torch.equal(tuned.get_submodule(n).codes(), packed.get_submodule(n).codes()) for n in codes)
    assert all(torch.equal(tuned.get_submodule(n).codes(), c) for n, c in codes.items())


def test_golden_fake_quant_keys_and_qat_helpers(base: GPT) -> None:
    model = api.prepare(copy.deepcopy(base), QCFGS["int4"])
    assert list(model.state_dict()) == GOLDEN_FAKE_INT4
    seen: list[str] = []
    remove = api.register_weight_hook(model, lambda name, w: seen.append(name))
    model(_idx())
    remove()
    model(_idx())
    assert seen == [f"blocks.{i}.{n}" for i in range(2) for n in LINEARS]
    api.set_fake_quant(model, weight=False)
    assert torch.equal(model(_idx()), base(_idx()))
    api.freeze_scales(model)
    assert all(bool(m.frozen) for _, m in api.fake_quant_modules(model))


def test_keep_full_precision_marks_are_skipped(base: GPT) -> None:
    model = copy.deepcopy(base)
    api.keep_full_precision(model.blocks[1].mlp.down)
    qcfg = QCFGS["int8"]
    assert "blocks.1.mlp.down" not in api.target_layers(model, qcfg)
    api.convert(api.prepare(model, qcfg), qcfg)
    assert type(model.blocks[1].mlp.down) is torch.nn.Linear and "blocks.1.mlp.down" not in api.layer_specs(model)
    tied = copy.deepcopy(base)
    api.keep_full_precision(tied.lm_head)
    with pytest.raises(ValueError, match="tok_emb: tied to lm_head"):
        api.prepare(tied, QuantConfig(scheme="int4", embeddings=True))
