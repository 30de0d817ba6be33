"""FakeQuantLinear / FakeQuantEmbedding: exact codes, STE, flags, learnable scales, hooks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.quant import primitives as P
from qtrain.quant.fake import FakeQuantEmbedding, FakeQuantLinear
from qtrain.quant.packed import Int4Linear, Int8Linear
from qtrain.quant.primitives import LayerSpec

SPECS = [
    LayerSpec("int8", 8),
    LayerSpec("int4", 4, 32),
    LayerSpec("int4", 4, 32, False),
    LayerSpec("int4", 4, -1),
    LayerSpec("int8da_int4w", 4, 32, True, "int8"),
]
IDS = ["int8", "int4", "int4_asym", "int4_channel", "int8da_int4w"]


def _linear(k: int = 64, n: int = 48, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=False)


def _x(k: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_forward_is_linear_of_dequantized_codes(spec: LayerSpec) -> None:
    lin = _linear()
    fq = FakeQuantLinear.from_linear(lin, spec, name="layer")
    assert fq.weight is lin.weight  # shared parameter (ties, optimizer identity)
    x = _x()
    qw = P.quantize_weight(lin.weight, spec.bits, spec.group_size, spec.symmetric)
    w_hat = P.dequantize(qw.codes, qw.scales, qw.zeros, spec.bits, spec.group_size)
    x_in = P.fake_quantize_per_token(x) if spec.activations == "int8" else x
    assert torch.equal(fq(x), F.linear(x_in, w_hat))
    got = fq.quantized()
    assert torch.equal(got.codes, qw.codes) and torch.equal(got.scales, qw.scales)


def test_straight_through_gradient_masks_clamped_weights() -> None:
    spec = LayerSpec("int4", 4, 32)
    lin = _linear()
    fq = FakeQuantLinear.from_linear(lin, spec)
    fq.freeze()
    with torch.no_grad():
        lin.weight.mul_(1.5)  # frozen scales: the largest weights now clamp
    x = _x()
    fq(x).sum().backward()
    _, inside = P.fake_quantize(lin.weight, fq.scales, None, 4, 32)
    dense = torch.ones(2, 5, 48).reshape(-1, 48).t() @ x.reshape(-1, 64)
    assert not bool(inside.all())
    assert lin.weight.grad is not None
    torch.testing.assert_close(lin.weight.grad, dense * inside)


def test_activation_gradient_passes_straight_through() -> None:
    fq = FakeQuantLinear.from_linear(_linear(), SPECS[-1])
    x = _x().requires_grad_(True)
    fq(x).sum().backward()
    w_hat = fq.fake_weight().detach()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.ones(2, 5, 48) @ w_hat)


def test_flags_switch_and_live_in_state_dict() -> None:
    spec = SPECS[-1]
    lin = _linear()
    fq = FakeQuantLinear.from_linear(lin, spec)
    x = _x()
    keys = set(fq.state_dict())
    assert {"weight", "scales", "weight_enabled", "act_enabled", "frozen"} <= keys
    fq.enable(weight=False, activations=False)
    assert torch.equal(fq(x), F.linear(x, lin.weight))
    state = fq.state_dict()
    other = FakeQuantLinear.from_linear(_linear(seed=5), spec)
    other.load_state_dict(state)
    assert not bool(other.weight_enabled) and torch.equal(other(x), fq(x))
    other.weight_enabled.fill_(True)  # direct buffer edits are honoured too
    assert not torch.equal(other(x), fq(x))


def test_compiled_forward_has_no_graph_break_and_follows_flag_changes() -> None:
    spec = SPECS[-1]  # weight and activation fake quant
    fq = FakeQuantLinear.from_linear(_linear(), spec)
    x = _x()
    explained = torch._dynamo.explain(fq)(x)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(fq, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), fq(x))
        fq.enable(weight=False, activations=False)  # as the schedule does between steps
        assert torch.equal(compiled(x), F.linear(x, fq.weight))
        fq.load_state_dict({**fq.state_dict(), "weight_enabled": torch.tensor(True)})
        assert torch.equal(compiled(x), fq(x)) and not torch.equal(compiled(x), F.linear(x, fq.weight))


def test_dynamic_scales_record_the_last_forward() -> None:
    lin = _linear()
    fq = FakeQuantLinear.from_linear(lin, SPECS[2])
    with torch.no_grad():
        lin.weight.mul_(2.0)
    fq(_x())
    s, z = P.choose_qparams(lin.weight, 4, 32, False)
    assert torch.equal(fq.scales, s.float()) and fq.zeros is not None and torch.equal(fq.zeros, z)


@pytest.mark.parametrize("spec", SPECS[:3], ids=IDS[:3])
def test_learnable_scales_get_lsq_gradients(spec: LayerSpec) -> None:
    lin = _linear()
    fq = FakeQuantLinear.from_linear(lin, spec, learn_scales=True)
    assert isinstance(fq.scales, nn.Parameter) and fq.scales.dtype == torch.float32
    s0, z0 = P.choose_qparams(lin.weight, spec.bits, spec.group_size, spec.symmetric)
    assert torch.equal(fq.scales.detach(), s0.float())
    x = _x()
    fq(x).pow(2).sum().backward()
    assert fq.scales.grad is not None and fq.scales.grad.abs().sum() > 0
    # LSQ: dL/ds = sum_group dL/dw_hat * (round(v) - v inside, clamped level outside) * g
    g_out = 2 * fq(x).detach()
    g_w = g_out.reshape(-1, 48).t() @ x.reshape(-1, 64)  # dL/dw_hat
    lo, hi = P.signed_bounds(spec.bits, fq.zeros)
    v = P.group_view(lin.weight.detach(), spec.group_size) / s0.float().unsqueeze(-1)
    q = torch.round(v)
    inside = (q >= lo) & (q <= hi)
    dq = torch.where(inside, q - v, P.clamp_codes(q.clone(), lo, hi))
    expected = (P.group_view(g_w, spec.group_size) * dq).sum(-1) * fq.grad_scale
    torch.testing.assert_close(fq.scales.grad, expected, rtol=1e-4, atol=1e-6)
    q_pos = 127 if spec.bits == 8 else (7 if spec.symmetric else 15)
    group = 64 if spec.group_size == -1 else spec.group_size
    assert fq.grad_scale == pytest.approx(1 / math.sqrt(group * q_pos))


def test_learned_scales_drive_the_codes_and_freeze_stops_them() -> None:
    lin = _linear()
    fq = FakeQuantLinear.from_linear(lin, SPECS[1], learn_scales=True)
    opt = torch.optim.SGD([fq.scales], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        fq(_x()).pow(2).sum().backward()
        opt.step()
    eff = P.round_scale(fq.scales.detach())
    assert not torch.equal(eff, P.choose_qparams(lin.weight, 4, 32)[0])
    qw = fq.quantized()
    assert torch.equal(qw.scales, eff)
    assert torch.equal(fq.fake_weight(), P.dequantize(qw.codes, qw.scales, None, 4, 32))
    fq.freeze()
    assert bool(fq.frozen) and not fq.scales.requires_grad
    assert torch.equal(fq.scales.detach(), eff.float())
    fq.zero_grad()
    fq(_x()).sum().backward()
    assert fq.scales.grad is None and lin.weight.grad is not None


def test_freeze_dynamic_scales_fixes_them() -> None:
    lin = _linear()
    fq = FakeQuantLinear.from_linear(lin, SPECS[1])
    fq.freeze()
    before = fq.qparams()[0].clone()
    with torch.no_grad():
        lin.weight.mul_(3.0)
    assert torch.equal(fq.qparams()[0], before)
    assert torch.equal(fq.quantized().codes, P.quantize(lin.weight, before, None, 4, 32))


def test_weight_hooks_see_and_replace_the_fake_weight() -> None:
    fq = FakeQuantLinear.from_linear(_linear(), SPECS[1], name="blocks.0.attn.qkv")
    seen: list[str] = []

    def hook(name: str, w: torch.Tensor) -> torch.Tensor | None:
        seen.append(name)
        return torch.zeros_like(w) if len(seen) > 1 else None

    fq.weight_hooks.append(hook)
    x = _x()
    assert not torch.equal(fq(x), torch.zeros(2, 5, 48))
    assert torch.equal(fq(x), torch.zeros(2, 5, 48))
    assert seen == ["blocks.0.attn.qkv", "blocks.0.attn.qkv"]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_from_packed_reproduces_codes(spec: LayerSpec) -> None:
    cls = Int8Linear if spec.bits == 8 else Int4Linear
    packed = cls.from_float(_linear().weight.detach(), spec, kernel="reference")
    fq = FakeQuantLinear.from_packed(packed, name="l")
    assert bool(fq.frozen)
    qw = fq.quantized()
    assert torch.equal(qw.codes, packed.codes()) and torch.equal(qw.scales, packed.scales)
    x = _x()
    assert torch.equal(fq(x), packed(x))
    learn = FakeQuantLinear.from_packed(packed, learn_scales=True)
    assert torch.equal(learn.quantized().codes, packed.codes()) and learn.scales.requires_grad


def test_to_linear_shares_the_weight_and_errors_name_the_layer() -> None:
    lin = _linear()
    assert FakeQuantLinear.from_linear(lin, SPECS[0]).to_linear().weight is lin.weight
    with pytest.raises(ValueError, match="blocks.1.mlp.down: group_size=128"):
        FakeQuantLinear.from_linear(_linear(k=96), LayerSpec("int4", 4, 128), name="blocks.1.mlp.down")
    biased = nn.Linear(64, 8)  # a bias is kept, shared (tests/unit/quant/test_bias.py)
    assert FakeQuantLinear.from_linear(biased, SPECS[0], name="x").to_linear().bias is biased.bias


def test_fake_embedding_reads_the_fake_table() -> None:
    emb = nn.Embedding(256, 64)
    fe = FakeQuantEmbedding.from_embedding(emb, LayerSpec("int4", 4, -1))
    idx = torch.randint(0, 256, (2, 7))
    table = fe.get_table()
    assert table.weight is emb.weight
    assert torch.equal(fe(idx), F.embedding(idx, table.fake_weight()))
    assert set(fe.state_dict()) >= {"table.weight", "table.scales"}
    tied = FakeQuantEmbedding(table, tied_to="lm_head")
    assert list(tied.state_dict()) == [] and torch.equal(tied(idx), fe(idx))
    assert fe.to_embedding().weight is emb.weight
