"""Primitives: qparams, codes, round trips, packing, STE, activation quantization."""

from __future__ import annotations

import pytest
import torch

from qtrain.quant import primitives as P
from qtrain.quant.primitives import LayerSpec

# (N, K) of every linear in the model presets tiny..1b: qkv, out, gate_up, down, lm_head.
PRESETS = {"tiny": (96, 256), "small": (384, 1024), "medium": (640, 1792), "base": (1024, 2048), "1b": (2048, 5632)}
MODEL_SHAPES = sorted({s for d, h in PRESETS.values() for s in ((3 * d, d), (d, d), (2 * h, d), (d, h), (256, d))})

SCHEMES = [  # bits, group_size, symmetric
    (8, -1, True),
    (4, 32, True),
    (4, 32, False),
    (4, 128, True),
    (4, -1, True),
    (4, -1, False),
]


def _w(n: int = 64, k: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits,group,sym", SCHEMES)
def test_qparams_shapes_dtypes_and_bf16_rounding(bits: int, group: int, sym: bool) -> None:
    w = _w()
    scales, zeros = P.choose_qparams(w, bits, group, sym)
    g = 1 if group == -1 else 256 // group
    assert scales.shape == (64, g) and scales.dtype == torch.bfloat16
    assert (zeros is None) == sym
    if zeros is not None:
        assert zeros.dtype == torch.uint8 and zeros.shape == (64, g) and int(zeros.max()) <= 15


@pytest.mark.parametrize("bits,group,sym", SCHEMES)
def test_round_trip_error_bound(bits: int, group: int, sym: bool) -> None:
    """|w - w_hat| <= scale / 2 except where the range clamps (at most one step at the edge)."""
    w = _w()
    qw = P.quantize_weight(w, bits, group, sym)
    lo, hi = P.code_range(bits)
    assert qw.codes.dtype == P.code_dtype(bits)
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
    w_hat = P.dequantize(qw.codes, qw.scales, qw.zeros, bits, group)
    step = P.group_view(torch.ones_like(w), group) * qw.scales.float().unsqueeze(-1)
    err = P.group_view((w - w_hat).abs(), group)
    assert bool((err <= step * 0.5 + 1e-7).float().mean() > 0.99)
    assert bool((err <= step * 1.01).all())
    rel = (w - w_hat).norm() / w.norm()
    assert rel < (0.01 if bits == 8 else 0.2)


def test_codes_use_the_rounded_scale_and_explicit_scales() -> None:
    w = _w()
    scales, _ = P.choose_qparams(w, 4, 32, True)
    qw = P.quantize_weight(w, 4, 32, True)
    expected = torch.clamp(torch.round(P.group_view(w, 32) / scales.float().unsqueeze(-1)), -8, 7) + 8
    assert torch.equal(qw.codes, expected.reshape(64, 256).to(torch.uint8))
    # Explicit (e.g. learned) scales are honoured after bf16 rounding.
    custom = torch.full((64, 8), 0.013)
    qc = P.quantize_weight(w, 4, 32, True, scales=custom)
    assert torch.equal(qc.scales, custom.to(torch.bfloat16))
    assert torch.equal(qc.codes, P.quantize(w, qc.scales, None, 4, 32))
    with pytest.raises(ValueError, match="explicit zeros"):
        P.quantize_weight(w, 4, 32, False, scales=custom)


def test_symmetric_scale_convention() -> None:
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.0] * 8])
    s8, _ = P.choose_qparams(w, 8, -1, True)
    s4, _ = P.choose_qparams(w, 4, 32, True)
    assert s8.item() == pytest.approx(1 / 127.5, rel=4e-3)
    assert s4.item() == pytest.approx(1 / 7.5, rel=4e-3)
    # -1.0 -> round(-1 / bf16(1 / 7.5)) = -7 (bf16 rounded the scale up) -> stored -7 + 8 = 1
    assert int(P.quantize(w, s4, None, 4, 32)[0, 0]) == round(-1.0 / s4.float().item()) + 8 == 1


def test_asymmetric_zero_point_and_all_positive_group() -> None:
    w = torch.linspace(0.1, 1.0, 32).reshape(1, 32)
    scales, zeros = P.choose_qparams(w, 4, 32, False)
    assert zeros is not None and int(zeros) == 0
    w_hat = P.dequantize(P.quantize(w, scales, zeros, 4, 32), scales, zeros, 4, 32)
    assert (w - w_hat).abs().max() <= scales.float().item() / 2 + 1e-6


def test_zero_weights_are_finite() -> None:
    w = torch.zeros(4, 256)
    for bits, group, sym in SCHEMES:
        qw = P.quantize_weight(w, bits, group, sym)
        assert torch.isfinite(qw.scales.float()).all() and (qw.scales.float() > 0).all()
        assert torch.equal(P.dequantize(qw.codes, qw.scales, qw.zeros, bits, group), w)


def test_clip_ratio_shrinks_the_scale() -> None:
    w = _w()
    full, _ = P.choose_qparams(w, 4, 32, True)
    half, _ = P.choose_qparams(w, 4, 32, True, clip_ratio=0.5)
    per_group, _ = P.choose_qparams(w, 4, 32, True, clip_ratio=torch.full((64, 8), 0.5))
    assert torch.equal(half, per_group)
    assert (half.float() < full.float()).all()


@pytest.mark.parametrize("bits,group,sym", SCHEMES)
def test_fake_quantize_equals_dequantize_of_quantize(bits: int, group: int, sym: bool) -> None:
    w = _w(seed=3)
    scales, zeros = P.choose_qparams(w, bits, group, sym)
    w_hat, inside = P.fake_quantize(w * 1.3, scales, zeros, bits, group)  # 1.3: force clamping
    ref = P.dequantize(P.quantize(w * 1.3, scales, zeros, bits, group), scales, zeros, bits, group)
    assert torch.equal(w_hat, ref)
    assert inside.dtype == torch.bool and not bool(inside.all())


@pytest.mark.parametrize("n,k", MODEL_SHAPES + [(1, 2), (3, 2), (5, 6), (17, 34), (2, 1024)])
def test_pack_unpack_identity(n: int, k: int) -> None:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n * k))
    packed = P.pack_int4(codes)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(P.unpack_int4(packed), codes)


def test_pack_layout_low_nibble_is_even_column() -> None:
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert P.pack_int4(codes).tolist() == [[0x21, 0x0F]]
    with pytest.raises(ValueError, match="even K"):
        P.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    rows = P.unpack_int4(P.pack_int4(codes).expand(2, 3, 2))  # leading dims are kept
    assert rows.shape == (2, 3, 4)


def test_round_clamp_is_half_even_then_clamp() -> None:
    v = torch.tensor([0.4, 1.6, -2.5, 2.5, 9.0, -9.5])
    codes, inside = P.round_clamp(v, -8, 7, inside=True, keep=True)
    assert codes.tolist() == [0.0, 2.0, -2.0, 2.0, 7.0, -8.0]
    assert inside is not None and inside.tolist() == [True, True, True, True, False, False]
    assert v.tolist() == [0.4000000059604645, 1.600000023841858, -2.5, 2.5, 9.0, -9.5]  # keep: untouched
    codes2, none = P.round_clamp(v, -8, 7)  # in place
    assert none is None and codes2.data_ptr() == v.data_ptr() and torch.equal(codes2, codes)


def test_bit_widths_derive_ranges_and_zero_points() -> None:
    assert (P.code_range(8), P.implicit_zero(8), P.code_dtype(8)) == ((-128, 127), 0, torch.int8)
    assert (P.code_range(4), P.implicit_zero(4), P.code_dtype(4)) == ((0, 15), 8, torch.uint8)
    with pytest.raises(ValueError, match=r"bits=3 is not supported; use one of \[4, 8\]"):
        P.code_range(3)


def test_per_token_activation_quantization() -> None:
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)) * 4
    codes, scales = P.quantize_per_token(x)
    assert codes.dtype == torch.int8 and scales.shape == (3, 5, 1) and scales.dtype == torch.bfloat16
    fq = P.fake_quantize_per_token(x)
    assert torch.equal(fq, codes.float() * scales.float())
    err = (fq - x).abs()
    assert (err <= scales.float() * 0.5 + 1e-6).float().mean() > 0.99  # the row max may clamp
    assert (err <= scales.float() * 1.01).all()
    assert P.fake_quantize_per_token(x.bfloat16()).dtype == torch.bfloat16


def test_group_and_bits_errors() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        P.choose_qparams(torch.zeros(4, 96), 4, 64)
    with pytest.raises(ValueError, match="bits=3"):
        P.choose_qparams(torch.zeros(4, 96), 3, 32)
    with pytest.raises(ValueError, match="symmetric"):
        P.choose_qparams(torch.zeros(4, 96), 8, -1, symmetric=False)


def test_layer_spec_checks_name_the_layer_and_round_trip() -> None:
    spec = LayerSpec("int4", 4, 64, False, "int8")
    assert LayerSpec.from_dict({**spec.to_dict(), "kind": "linear"}) == spec
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.down: group_size=64 does not divide .* K=96"):
        spec.check("blocks.0.mlp.down", 96)
    with pytest.raises(ValueError, match="lm_head: bits=2"):
        LayerSpec("int4", 2).check("lm_head", 96)
    with pytest.raises(ValueError, match="lacks key"):
        LayerSpec.from_dict({"scheme": "int4"})
