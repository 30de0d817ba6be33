"""Pure tensor functions: quantization parameters, codes, dequantization, int4 packing.

Everything that turns floats into integer codes goes through this module, and every code
comes from one rounding rule, :func:`round_clamp`, so fake-quant (QAT, the LSQ backward
included), convert, PTQ and the packed kernels agree bit for bit. Code ranges and implicit
zero points come from the bit-width table :data:`qtrain.quant.spec.WIDTHS`. Conventions:

- Weights are ``[N, K]`` (``nn.Linear`` layout: N outputs, K inputs) and are quantized in
  groups of ``group_size`` consecutive input columns; ``group_size=-1`` means one group per
  row (per output channel). ``G = K // group_size`` groups per row.
- Scales are rounded to **bfloat16** by :func:`choose_qparams` itself (the stored dtype and
  what the CPU kernels consume) and codes are always computed with the rounded scale.
- A weight is reconstructed as ``(code - zero) * scale`` in float32 for every scheme:

  ========================  ===============  ==============  =====================
  scheme                    stored code      zero            signed range
  ========================  ===============  ==============  =====================
  int8 (symmetric)          int8 [-128,127]  0 (implicit)    [-128, 127]
  int4 symmetric            uint8 0..15      8 (implicit)    [-8, 7]
  int4 asymmetric           uint8 0..15      uint8 0..15     [-zero, 15 - zero]
  ========================  ===============  ==============  =====================

  Symmetric scales map the largest magnitude to half the code span:
  ``scale = amax / ((qmax - qmin) / 2)`` (127.5 for int8, 7.5 for int4), torchao's
  convention, so the most negative code is used and the largest positive value clamps by
  at most half a step. Asymmetric scales span ``[min(w, 0), max(w, 0)]`` over 15 steps with
  an integer zero point.
- int4 codes are packed two per byte, ``uint8 [N, K // 2]``, low nibble = even column.
- Activations (int8 dynamic) use one symmetric scale per row (token), int8 range [-128, 127].

Example:
    >>> w = torch.randn(64, 128)
    >>> qw = quantize_weight(w, bits=4, group_size=32)
    >>> w_hat = dequantize(qw.codes, qw.scales, qw.zeros, bits=4, group_size=32)  # (64, 128)
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtrain.quant.spec import ACTIVATION_BITS, width
from qtrain.quant.spec import ACTIVATION_MODES as ACTIVATION_MODES  # re-exported: callers look here for codes
from qtrain.quant.spec import SUPPORTED_BITS as SUPPORTED_BITS
from qtrain.quant.spec import LayerSpec as LayerSpec
from qtrain.quant.spec import QuantizedWeight as QuantizedWeight
from qtrain.quant.spec import code_dtype as code_dtype
from qtrain.quant.spec import code_range as code_range
from qtrain.quant.spec import implicit_zero as implicit_zero

SCALE_DTYPE = torch.bfloat16
"""Dtype every scale is rounded to (and stored in)."""
SCALE_EPS = float(torch.finfo(torch.float32).eps)
"""Smallest scale (before bf16 rounding): keeps all-zero groups finite."""


def group_view(weight: Tensor, group_size: int) -> Tensor:
    """View ``[N, K]`` as ``[N, G, g]`` groups along K (``group_size=-1``: g = K).

    Args:
        weight: ``[N, K]`` tensor.
        group_size: columns per group, or -1 for one group per row.

    Returns:
        A ``[N, G, g]`` view (a copy only when ``weight`` is not contiguous).

    Raises:
        ValueError: group_size does not divide K.
    """
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g != 0:
        raise ValueError(f"group_size={group_size} does not divide the input size K={k}")
    return weight.reshape(n, k // g, g)


def round_scale(scale: Tensor) -> Tensor:
    """Clamp a float scale to ``SCALE_EPS`` and round it to bfloat16 (nearest even)."""
    return scale.clamp_min(SCALE_EPS).to(SCALE_DTYPE)


def choose_qparams(
    weight: Tensor,
    bits: int,
    group_size: int = -1,
    symmetric: bool = True,
    clip_ratio: Tensor | float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scales (and zero points) for ``weight``, one per (row, group).

    Args:
        weight: ``[N, K]`` float tensor.
        bits: 4 or 8 (8 must be symmetric).
        group_size: columns per group along K, or -1 for per output channel.
        symmetric: symmetric codes (no zero point) or asymmetric with a uint8 zero point.
        clip_ratio: optional shrink factor of the range, a float or a tensor broadcastable
            to ``[N, G]`` (MSE clipping search); 1.0 means no clipping.

    Returns:
        ``(scales, zeros)``: ``bfloat16 [N, G]`` and ``uint8 [N, G]`` or ``None`` when
        symmetric.

    Raises:
        ValueError: unsupported bits, asymmetric int8, or group_size not dividing K.
    """
    lo, hi = code_range(bits)
    if not symmetric and not width(bits).asymmetric:
        asym = ", ".join(f"int{b}" for b in SUPPORTED_BITS if width(b).asymmetric)
        raise ValueError(f"int{bits} weights are symmetric; asymmetric is only supported for {asym}")
    wg = group_view(weight.detach().float(), group_size)  # (N, G, g)
    # amin + amax, not aminmax: on CPU aminmax over a short last dim is 5-20x slower than both.
    w_min, w_max = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, G) each
    if symmetric:
        amax = torch.maximum(-w_min, w_max)  # == |w|.amax(-1), without a |w| temporary
        if clip_ratio is not None:
            amax = amax * clip_ratio
        return round_scale(amax / ((hi - lo) / 2)), None
    w_min, w_max = w_min.clamp(max=0.0), w_max.clamp(min=0.0)
    if clip_ratio is not None:
        w_min, w_max = w_min * clip_ratio, w_max * clip_ratio
    scales = round_scale((w_max - w_min) / (hi - lo))
    zeros = (lo - torch.round(w_min / scales.float())).clamp(lo, hi).to(torch.uint8)
    return scales, zeros


def signed_bounds(bits: int, zeros: Tensor | None) -> tuple[Tensor | int, Tensor | int]:
    """Signed-domain clamp bounds ``(lo - zero, hi - zero)``, shaped ``[N, G, 1]`` or ints."""
    lo, hi = code_range(bits)
    if zeros is None:
        z = implicit_zero(bits)
        return lo - z, hi - z
    zf = zeros.float().unsqueeze(-1)  # (N, G, 1)
    return lo - zf, hi - zf


def clamp_codes(q: Tensor, lo: Tensor | int, hi: Tensor | int) -> Tensor:
    """Clamp to bounds from :func:`signed_bounds` (in place when they are ints)."""
    if isinstance(lo, Tensor) and isinstance(hi, Tensor):
        return torch.clamp(q, lo, hi)
    assert isinstance(lo, int) and isinstance(hi, int)
    return q.clamp_(lo, hi)


def round_clamp(
    v: Tensor, lo: Tensor | int, hi: Tensor | int, inside: bool = False, keep: bool = False
) -> tuple[Tensor, Tensor | None]:
    """THE rounding rule: ``clamp(round_half_even(v), lo, hi)`` of grid values ``v = x / scale``.

    Every code qtrain computes (fake-quant forward and LSQ backward, convert, PTQ, activations)
    comes from here, so they agree bit for bit.

    Args:
        v: values divided by their scale (``torch.div(x, scale)``), float.
        lo: lower bound (an int or a tensor broadcastable to ``v``, see :func:`signed_bounds`).
        hi: upper bound.
        inside: also return where the rounded value was within the bounds (the
            straight-through gradient's mask).
        keep: leave ``v`` unchanged (otherwise it is rounded in place, saving a temporary).

    Returns:
        ``(codes, mask)``: the clamped integer-valued floats, and the bool mask or None.
    """
    q = torch.round(v) if keep else v.round_()
    if not inside:
        return clamp_codes(q, lo, hi), None
    qc = torch.clamp(q, lo, hi) if isinstance(lo, Tensor) else q.clamp(lo, hi)  # type: ignore[arg-type]
    return qc, qc == q


def quantize(weight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int) -> Tensor:
    """Integer codes of ``weight`` for given scales and zero points.

    ``code = clamp(round(w / scale) + zero, lo, hi)`` with round-half-to-even.

    Args:
        weight: ``[N, K]`` float tensor.
        scales: ``[N, G]`` (bf16 values; any float dtype holding them).
        zeros: ``uint8 [N, G]`` (asymmetric int4) or ``None`` (implicit zero).
        bits: 4 or 8.
        group_size: columns per group, or -1.

    Returns:
        Codes ``[N, K]``: int8 for 8 bits, uint8 0..15 for 4 bits.

    Raises:
        ValueError: unsupported bits or group_size not dividing K.
    """
    q = signed_codes(weight, scales, zeros, bits, group_size)
    z = implicit_zero(bits) if zeros is None else zeros.float().unsqueeze(-1)
    n, k = weight.shape
    return (q + z).reshape(n, k).to(code_dtype(bits))


def signed_codes(weight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int) -> Tensor:
    """``clamp(round(w / scale), lo - zero, hi - zero)`` as float ``[N, G, g]`` (code - zero).

    :func:`round_clamp` on the weight's groups; arguments as :func:`quantize`.
    """
    lo, hi = signed_bounds(bits, zeros)
    wg = group_view(weight.detach().float(), group_size)
    return round_clamp(torch.div(wg, scales.float().unsqueeze(-1)), lo, hi)[0]


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int) -> Tensor:
    """Float32 weight ``(code - zero) * scale`` from unpacked codes.

    Args:
        codes: ``[N, K]`` int8 (8 bits) or uint8 0..15 (4 bits, unpacked).
        scales: ``[N, G]`` scales.
        zeros: ``uint8 [N, G]`` or ``None``.
        bits: 4 or 8.
        group_size: columns per group, or -1.

    Returns:
        Float32 ``[N, K]``.
    """
    n, k = codes.shape
    z = implicit_zero(bits) if zeros is None else zeros.float().unsqueeze(-1)
    cg = group_view(codes, group_size).to(torch.float32, copy=True)  # (N, G, g), never aliases codes
    if not isinstance(z, int) or z != 0:  # x - 0 == x exactly: skip the pass for int8
        cg = cg.sub_(z)
    return cg.mul_(scales.float().unsqueeze(-1)).reshape(n, k)


def fake_quantize(
    weight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> tuple[Tensor, Tensor]:
    """Quantize-dequantize ``weight`` and report which elements were not clamped.

    Bit-identical to ``dequantize(quantize(weight, ...), ...)``, with fewer temporaries.

    Args:
        weight: ``[N, K]`` float tensor.
        scales: ``[N, G]`` scales.
        zeros: ``uint8 [N, G]`` or ``None``.
        bits: 4 or 8.
        group_size: columns per group, or -1.

    Returns:
        ``(w_hat, inside)``: float32 ``[N, K]`` and bool ``[N, K]`` (True where the rounded
        value was inside the code range, i.e. where the straight-through gradient flows).
    """
    lo, hi = signed_bounds(bits, zeros)
    n, k = weight.shape
    s = scales.float().unsqueeze(-1)  # (N, G, 1)
    qc, inside = round_clamp(torch.div(group_view(weight.detach().float(), group_size), s), lo, hi, inside=True)
    assert inside is not None
    return qc.mul_(s).reshape(n, k), inside.reshape(n, k)


def quantize_weight(
    weight: Tensor,
    bits: int,
    group_size: int = -1,
    symmetric: bool = True,
    clip_ratio: Tensor | float | None = None,
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
) -> QuantizedWeight:
    """Codes and parameters of a weight: qparams (unless given) then :func:`quantize`.

    Args:
        weight: ``[N, K]`` float tensor.
        bits: 4 or 8.
        group_size: columns per group, or -1.
        symmetric: see :func:`choose_qparams`.
        clip_ratio: optional range shrink factor (ignored when ``scales`` is given).
        scales: explicit ``[N, G]`` scales (e.g. learned); rounded to bf16 here.
        zeros: explicit ``uint8 [N, G]`` zero points (asymmetric with explicit scales).

    Returns:
        A :class:`QuantizedWeight`.

    Raises:
        ValueError: unsupported bits, bad group size, or asymmetric scales without zeros.
    """
    if scales is None:
        scales, zeros = choose_qparams(weight, bits, group_size, symmetric, clip_ratio)
    else:
        scales = round_scale(scales.detach().float())
        if not symmetric and zeros is None:
            raise ValueError("asymmetric quantization with explicit scales needs explicit zeros")
        zeros = zeros.to(torch.uint8) if zeros is not None and not symmetric else None
    return QuantizedWeight(quantize(weight, scales, zeros, bits, group_size), scales, zeros)


def pack_int4(codes: Tensor) -> Tensor:
    """Pack 4-bit codes two per byte: ``uint8 [N, K]`` -> ``uint8 [N, K // 2]``.

    Byte ``j`` of a row holds column ``2j`` in its low nibble and ``2j + 1`` in its high one.

    Args:
        codes: ``[N, K]`` integer tensor with values 0..15.

    Returns:
        ``uint8 [N, K // 2]``.

    Raises:
        ValueError: not 2-D or K is odd.
    """
    if codes.dim() != 2 or codes.shape[1] % 2 != 0:
        raise ValueError(f"pack_int4 needs [N, K] codes with even K, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [N, K // 2]`` -> ``uint8 [N, K]`` (0..15).

    Args:
        packed: ``uint8 [..., K // 2]`` (any leading shape, e.g. gathered rows).

    Returns:
        ``uint8 [..., K]``.
    """
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def choose_qparams_per_token(x: Tensor) -> Tensor:
    """Symmetric int8 scale per row of activations: ``bf16(amax / 127.5)`` (half the int8 code span).

    Args:
        x: ``[..., K]`` activations.

    Returns:
        bfloat16 ``[..., 1]``.
    """
    xd = x.detach()
    lo, hi = xd.amin(dim=-1, keepdim=True), xd.amax(dim=-1, keepdim=True)  # faster than aminmax on CPU
    amax = torch.maximum(-lo, hi).float()
    qlo, qhi = code_range(ACTIVATION_BITS)
    return round_scale(amax / ((qhi - qlo) / 2))


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic int8 quantization of activations, one symmetric scale per row.

    Args:
        x: ``[..., K]`` float activations.

    Returns:
        ``(codes, scales)``: int8 ``[..., K]`` and bfloat16 ``[..., 1]``.
    """
    scales = choose_qparams_per_token(x)
    q, _ = round_clamp(torch.div(x.detach().float(), scales.float()), *code_range(ACTIVATION_BITS))
    return q.to(code_dtype(ACTIVATION_BITS)), scales


def fake_quantize_per_token(x: Tensor) -> Tensor:
    """Quantize-dequantize activations per row (int8 dynamic), in x's dtype (float32 math).

    Equal to ``codes.float() * scales.float()`` of :func:`quantize_per_token`.

    Args:
        x: ``[..., K]`` float activations.

    Returns:
        Tensor like ``x``.
    """
    s = choose_qparams_per_token(x).float()  # (..., 1)
    q = round_clamp(torch.div(x.detach().float(), s), *code_range(ACTIVATION_BITS))[0].mul_(s)
    return q if q.dtype == x.dtype else q.to(x.dtype)
