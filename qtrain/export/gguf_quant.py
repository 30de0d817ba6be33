"""qtrain's packed codes as ggml quantization blocks (Q4_0, Q4_1, Q8_0), without re-quantizing.

ggml quantizes rows in blocks of 32 consecutive weights (``ggml-quants.h``):

========  ==========================================  ===========================  =====
type      block layout (bytes)                        weight                        bytes
========  ==========================================  ===========================  =====
Q4_0      ``d`` fp16, ``qs[16]``                      ``d * (nibble - 8)``          18
Q4_1      ``d`` fp16, ``m`` fp16, ``qs[16]``          ``d * nibble + m``            20
Q8_0      ``d`` fp16, ``qs[32]`` int8                 ``d * q``                     34
========  ==========================================  ===========================  =====

In ``qs`` byte ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high
nibble (qtrain packs adjacent columns instead, so the codes are unpacked and re-packed).

The mapping from qtrain (weight ``(code - zero) * scale``, scales stored as bfloat16):

- int4 symmetric, group a multiple of 32 (or per channel with K a multiple of 32) -> Q4_0:
  the nibble *is* qtrain's stored code (0..15, implicit zero 8), ``d`` is the group's scale,
  repeated for every block of the group. Lossless whenever the scale is an fp16 value.
- int8 per channel -> Q8_0: ``qs`` are qtrain's codes, ``d`` the row's scale per block.
- int4 asymmetric -> Q4_1: ``d = scale`` and ``m = -zero * scale`` rounded to fp16. ``zero * scale``
  needs up to 12 significant bits (4-bit zero times an 8-bit bfloat16 mantissa) and fp16 holds 11,
  so ``m`` can move by half an fp16 ulp: per weight ``|error| <= 2^-11 * zero * scale
  <= 15/2048 * scale`` (under 0.75% of one quantization step), measured exactly here.

Every bfloat16 scale in fp16's normal range (6.1e-5 .. 65504) is an fp16 value (bfloat16 has 8
significant bits, fp16 11). A smaller scale lands in fp16's subnormals and may lose bits; a
larger one overflows. Those blocks are *counted and reported* (:class:`Fp16Report`), never
silently rounded: blocks whose codes all sit at the zero point carry no weight and are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

QK = 32
"""Weights per ggml block (Q4_0, Q4_1, Q8_0)."""
Q4_1_REL_BOUND = 15.0 / 2048.0
"""Q4_1 bound per weight, as a fraction of the block's scale: ``max zero * 2^-11``."""


@dataclass
class Fp16Report:
    """Blocks of one tensor whose scale (or Q4_1 ``d``) is not an fp16 value.

    Attributes:
        blocks: blocks (with at least one non-zero weight) whose scale changed in fp16.
        max_weight_error: the largest change of a dequantized weight that causes.
        smallest_scale: the smallest such scale, to say why (fp16 subnormal or overflow).
    """

    blocks: int = 0
    max_weight_error: float = 0.0
    smallest_scale: float = field(default=float("inf"))


def block_scales(scales: Tensor, group_size: int, k: int) -> np.ndarray:
    """Per-block float32 scales ``[N, K/32]``: each group's scale repeated for its blocks.

    Args:
        scales: ``[N, G]`` (bfloat16 values).
        group_size: columns per group (a multiple of 32), or -1 for one per row.
        k: K, a multiple of 32.

    Returns:
        ``float32 [N, K // 32]``.
    """
    g = k if group_size == -1 else group_size
    return np.repeat(scales.float().cpu().numpy(), g // QK, axis=1)


def _fp16(values: np.ndarray, signed_codes: np.ndarray, report: Fp16Report) -> np.ndarray:
    """``values`` [N, B] as fp16, counting blocks (codes ``[N, B, 32]``) that the rounding changes."""
    h = values.astype(np.float16)
    with np.errstate(invalid="ignore"):
        changed = h.astype(np.float32) != values
    reach = np.abs(signed_codes).max(axis=-1)  # (N, B): the largest |code - zero| of each block
    bad = changed & (reach > 0)
    if bad.any():
        err = np.abs(h.astype(np.float64) - values.astype(np.float64)) * reach
        report.blocks += int(bad.sum())
        report.max_weight_error = max(report.max_weight_error, float(err[bad].max()))
        report.smallest_scale = min(report.smallest_scale, float(np.abs(values[bad]).min()))
    return h


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """``uint8 [N, B, 32]`` codes 0..15 -> ``[N, B, 16]`` bytes, weight j low, weight j+16 high."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _blocks(codes: Tensor) -> np.ndarray:
    n, k = codes.shape
    return codes.cpu().numpy().reshape(n, k // QK, QK)


def _join(*parts: np.ndarray) -> np.ndarray:
    """Concatenate per-block byte fields ``[N, B, *]`` into rows ``uint8 [N, B * block_bytes]``."""
    n, b = parts[0].shape[:2]
    raw = [p.reshape(n, b, -1).view(np.uint8) for p in parts]
    return np.concatenate(raw, axis=-1).reshape(n, -1)


def encode_q4_0(codes: Tensor, scales: Tensor, group_size: int, report: Fp16Report) -> np.ndarray:
    """Q4_0 rows from symmetric int4 codes.

    Args:
        codes: unpacked ``uint8 [N, K]`` codes 0..15 (implicit zero 8).
        scales: ``[N, G]`` scales.
        group_size: a multiple of 32, or -1.
        report: where non-fp16 scales are counted.

    Returns:
        ``uint8 [N, K/32 * 18]``.
    """
    c = _blocks(codes)
    d = _fp16(block_scales(scales, group_size, codes.shape[1]), c.astype(np.int16) - 8, report)
    return _join(d[..., None], _nibbles(c))


def encode_q8_0(codes: Tensor, scales: Tensor, report: Fp16Report) -> np.ndarray:
    """Q8_0 rows from per-channel int8 codes (``int8 [N, K]``, scales ``[N, 1]``); ``uint8 [N, K/32 * 34]``."""
    c = _blocks(codes)
    d = _fp16(block_scales(scales, -1, codes.shape[1]), c.astype(np.int16), report)
    return _join(d[..., None], c.astype(np.int8))


def encode_q4_1(
    codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, report: Fp16Report
) -> tuple[np.ndarray, float, float]:
    """Q4_1 rows from asymmetric int4 codes, and how far they are from qtrain's weights.

    Args:
        codes: unpacked ``uint8 [N, K]`` codes 0..15.
        scales: ``[N, G]`` scales.
        zeros: ``uint8 [N, G]`` zero points.
        group_size: a multiple of 32, or -1.
        report: where non-fp16 ``d`` values are counted (the ``m`` rounding is the Q4_1 error).

    Returns:
        ``(rows, max_abs_diff, max_rel_diff)``: ``uint8 [N, K/32 * 20]``; the largest
        ``|ggml weight - qtrain weight|`` over the tensor, and the largest such difference
        divided by its block's scale (at most :data:`Q4_1_REL_BOUND` while ``d`` is exact).
    """
    k = codes.shape[1]
    c = _blocks(codes)
    s = block_scales(scales, group_size, k)
    z = np.repeat(zeros.cpu().numpy().astype(np.float32), (k if group_size == -1 else group_size) // QK, axis=1)
    d = _fp16(s, c.astype(np.int16) - z[..., None].astype(np.int16), report)
    m = (-z * s).astype(np.float16)  # -zero * scale: exact in float32 (12 significant bits)
    ggml = d.astype(np.float32)[..., None] * c.astype(np.float32) + m.astype(np.float32)[..., None]
    ref = (c.astype(np.float32) - z[..., None]) * s[..., None]  # qtrain's dequantize, float32
    diff = np.abs(ggml - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(s[..., None] > 0, diff / s[..., None], 0.0)
    max_rel = float(rel.max()) if rel.size else 0.0
    return _join(d[..., None], m[..., None], _nibbles(c)), max_abs, max_rel


def float_rows(weight: Tensor, float_type: str) -> tuple[np.ndarray, str]:
    """A full-precision tensor as ``f32`` / ``f16`` numpy or ``bf16`` raw bytes.

    Args:
        weight: any float tensor.
        float_type: ``f32``, ``f16`` or ``bf16``.

    Returns:
        ``(array, ggml type name)``; bf16 comes as ``uint8 [..., 2 * last]`` bytes.
    """
    w = weight.detach().cpu()
    if float_type == "f16":
        return w.float().numpy().astype(np.float16), "F16"
    if float_type == "bf16":
        raw = w.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
        return raw, "BF16"
    return w.float().numpy(), "F32"
