"""PTQ: rtn / mse / gptq quality ordering, reproducible codes, QAT initialisation."""

from __future__ import annotations

import copy

import pytest
import torch

from qtrain import quant as api
from qtrain.config import ModelConfig, QuantConfig
from qtrain.model import GPT
from qtrain.quant import primitives as P
from qtrain.quant import ptq
from qtrain.quant.fake import FakeQuantLinear
from qtrain.quant.packed import PackedLinear
from qtrain.quant.primitives import LayerSpec

SPECS = [LayerSpec("int4", 4, 32), LayerSpec("int4", 4, 32, False), LayerSpec("int8", 8), LayerSpec("int4", 4, -1)]
IDS = ["int4", "int4_asym", "int8", "int4_channel"]


def _weight(n: int = 64, k: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, k, generator=gen) * 0.02 + torch.randn(n, k, generator=gen).pow(3) * 0.005  # heavy tails


def _err(w: torch.Tensor, qw: P.QuantizedWeight, spec: LayerSpec) -> torch.Tensor:
    return (w - P.dequantize(qw.codes, qw.scales, qw.zeros, spec.bits, spec.group_size)).pow(2).sum()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_mse_beats_rtn_weight_error(spec: LayerSpec) -> None:
    w = _weight()
    rtn, mse = ptq.rtn_quantize(w, spec), ptq.mse_quantize(w, spec, grid=50)
    assert mse.scales.dtype == torch.bfloat16
    assert _err(w, mse, spec) < _err(w, rtn, spec)
    # per group never worse (ratio 1 is a candidate)
    per_group = lambda qw: P.group_view(  # noqa: E731
        (w - P.dequantize(qw.codes, qw.scales, qw.zeros, spec.bits, spec.group_size)).pow(2), spec.group_size
    ).sum(-1)
    assert (per_group(mse) <= per_group(rtn)).all()


@pytest.mark.parametrize("spec", SPECS[:3], ids=IDS[:3])
def test_gptq_beats_rtn_output_error_with_correlated_inputs(spec: LayerSpec) -> None:
    gen = torch.Generator().manual_seed(1)
    k = 128
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = torch.randn(2048, k, generator=gen) @ mix  # correlated features
    w = _weight(48, k)
    h = 2 * x.t() @ x / x.shape[0]
    out = x @ w.t()

    def output_error(qw: P.QuantizedWeight) -> float:
        w_hat = P.dequantize(qw.codes, qw.scales, qw.zeros, spec.bits, spec.group_size)
        return float((x @ w_hat.t() - out).pow(2).mean())

    g = ptq.gptq_quantize(w, h, spec, damp=0.01)
    assert output_error(g) < 0.8 * output_error(ptq.rtn_quantize(w, spec))
    # codes are reproducible from the stored scales
    w_hat = P.dequantize(g.codes, g.scales, g.zeros, spec.bits, spec.group_size)
    assert torch.equal(P.quantize(w_hat, g.scales, g.zeros, spec.bits, spec.group_size), g.codes)


@pytest.mark.parametrize("spec", SPECS[:3], ids=IDS[:3])
def test_gptq_act_order_static_groups(spec: LayerSpec) -> None:
    """act_order: high-energy inputs first, group ranges from the original weights (same format)."""
    gen = torch.Generator().manual_seed(2)
    k = 128
    energy = torch.logspace(-1.5, 1, k)[torch.randperm(k, generator=gen)]  # a few loud features, anywhere
    x = (torch.randn(4096, k, generator=gen) @ (torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k))) * energy
    w, h = _weight(48, k), 2 * x.t() @ x / 4096

    def output_error(qw: P.QuantizedWeight) -> float:
        w_hat = P.dequantize(qw.codes, qw.scales, qw.zeros, spec.bits, spec.group_size)
        return float((x @ (w_hat - w).t()).pow(2).mean())

    plain, act = ptq.gptq_quantize(w, h, spec), ptq.gptq_quantize(w, h, spec, act_order=True)
    assert output_error(act) < 0.9 * output_error(plain) < 0.9 * output_error(ptq.rtn_quantize(w, spec))
    static = P.choose_qparams(w, spec.bits, spec.group_size, spec.symmetric)  # fixed before any update
    assert torch.equal(act.scales, static[0]) and (act.zeros is None) == (static[1] is None)
    assert act.codes.shape == w.shape and act.codes.dtype == plain.codes.dtype
    dead = h.clone()
    dead[5, :] = dead[:, 5] = 0.0  # a feature that never fires: its column quantizes to zero
    z = ptq.gptq_quantize(w, dead, spec, act_order=True)
    assert float(P.dequantize(z.codes, z.scales, z.zeros, spec.bits, spec.group_size)[:, 5].abs().max()) < 1e-6 or (
        not spec.symmetric)


def test_gptq_hessian_uses_int8_inputs_for_int8_activations(trained_ish: GPT) -> None:
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(4)) * 3
    plain, act = ptq.HessianHook(64, torch.device("cpu")), ptq.HessianHook(64, torch.device("cpu"), act_int8=True)
    plain(torch.nn.Identity(), (x,))
    act(torch.nn.Identity(), (x,))
    xq = P.fake_quantize_per_token(x.reshape(-1, 64))
    torch.testing.assert_close(act.hessian(), 2 * xq.t() @ xq / 21)
    assert not torch.allclose(act.hessian(), plain.hessian(), rtol=0, atol=1e-6)
    # end to end: the first layer's GPTQ codes change with the int8 activations
    qcfg = QuantConfig(scheme="int8da_int4w", group_size=32)
    a = ptq.quantize_ptq(copy.deepcopy(trained_ish), qcfg, "gptq", _calib())
    b = ptq.quantize_ptq(copy.deepcopy(trained_ish), QuantConfig(scheme="int4", group_size=32), "gptq", _calib())
    name = "blocks.0.attn.qkv"  # its inputs do not depend on any quantized layer: only the Hessian differs
    assert not torch.equal(a.get_submodule(name).codes(), b.get_submodule(name).codes())


@pytest.fixture(scope="module")
def trained_ish() -> GPT:
    model = GPT(ModelConfig())
    model.init_weights(0)
    return model


def _calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, 256, (4, 32), generator=gen) for _ in range(2)]


@pytest.mark.parametrize("method", ["rtn", "mse", "gptq"])
def test_quantize_ptq_builds_reproducible_packed_models(trained_ish: GPT, method: str) -> None:
    qcfg = QuantConfig(scheme="int4", group_size=32, lm_head=True, kernel="reference")
    calib = _calib()
    model = ptq.quantize_ptq(copy.deepcopy(trained_ish), qcfg, method, calib, grid=20)
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 9
    for name, m in packed:
        s = m.spec
        assert torch.equal(P.quantize(m.dequantize(), m.scales, m.zeros, s.bits, s.group_size), m.codes()), name
    ref = trained_ish(calib[0])
    err = (model(calib[0]) - ref).pow(2).mean()
    assert err < 0.05 * ref.pow(2).mean()
    # the specs travel like any converted model's
    skeleton = api.build_packed_skeleton(GPT(ModelConfig()), api.layer_specs(model), kernel="reference")
    skeleton.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(skeleton(calib[0]), model(calib[0]))


def test_gptq_model_beats_rtn_on_calibration_logits(trained_ish: GPT) -> None:
    qcfg = QuantConfig(scheme="int4", group_size=32, kernel="reference")
    calib = _calib()
    errs = {}
    for method in ("rtn", "gptq"):
        model = ptq.quantize_ptq(copy.deepcopy(trained_ish), qcfg, method, calib)
        with torch.no_grad():
            errs[method] = sum(float((model(b) - trained_ish(b)).pow(2).mean()) for b in calib)
    assert errs["gptq"] < errs["rtn"]


def test_init_scales_feed_prepare(trained_ish: GPT) -> None:
    qcfg = QuantConfig(scheme="int4", group_size=32)
    init = ptq.init_scales(trained_ish, qcfg, "mse", grid=20)
    assert set(init) == set(api.target_layers(trained_ish, qcfg))
    assert type(trained_ish.blocks[0].attn.qkv) is torch.nn.Linear  # the model is left untouched
    fixed = api.prepare(copy.deepcopy(trained_ish), qcfg, init=init)
    learn = api.prepare(copy.deepcopy(trained_ish), qcfg, learn_scales=True, init=init)
    for name, qw in init.items():
        f, lr = fixed.get_submodule(name), learn.get_submodule(name)
        assert isinstance(f, FakeQuantLinear) and isinstance(lr, FakeQuantLinear)
        assert bool(f.frozen) and torch.equal(f.quantized().codes, qw.codes)
        assert torch.equal(f.quantized().scales, qw.scales)
        assert not bool(lr.frozen) and torch.equal(P.round_scale(lr.scales.detach()), qw.scales)
    gptq_init = ptq.init_scales(trained_ish, qcfg, "gptq", _calib())
    assert set(gptq_init) == set(init)


def test_ptq_errors(trained_ish: GPT) -> None:
    with pytest.raises(ValueError, match="ptq.method='awq'"):
        ptq.quantize_ptq(copy.deepcopy(trained_ish), QuantConfig(scheme="int4"), "awq")
    with pytest.raises(ValueError, match="calibration"):
        ptq.quantize_ptq(copy.deepcopy(trained_ish), QuantConfig(scheme="int4"), "gptq", [])
    with pytest.raises(ValueError, match="group_size=64"):
        ptq.quantize_ptq(copy.deepcopy(trained_ish), QuantConfig(scheme="int4", group_size=64), "mse")
