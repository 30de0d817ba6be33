"""Traceable linear paths for compiled decode and for prefill, built from a layer's buffers.

:func:`plan_linear` turns an ``nn.Linear`` or a packed layer into a :class:`LinearPlan` (a
static description) and the tensors it reads; :func:`apply_linear` is the math, written so
``torch.compile(fullgraph=True)`` traces it without a break and Inductor fuses it:

- ``dense``: ``F.linear``.
- ``int8``: ``F.linear(x, codes.to(x.dtype)) * scales``. Compiled with
  ``coordinate_descent_tuning`` a one-row product is decomposed into a multiply + reduction
  that reads the int8 codes directly (gpt-fast's int8 weight-only path): half the bytes of bf16.
- ``int4_tinygemm`` (CUDA): ``aten._weight_int4pack_mm`` on a tinygemm-tiled copy.
- ``int4``: in-graph unpack + dequantize + ``F.linear`` (any device; the CPU check of the
  decode graph, and CUDA layers tinygemm does not fit).
- ``int4_triton`` / ``int8_triton`` (``kernel="triton"``, where Triton runs): qtrain's Triton
  GEMV (at most 8 rows; the dequantize-in-GEMM kernel above that) on the canonical buffers,
  as custom ops (:mod:`qtrain.quant.cuda.ops`): one kernel per linear, bias fused.

A layer's bias (``nn.Linear.bias``, a packed layer's ``bias`` buffer: Qwen2's qkv) is the last
of its tensors (``LinearPlan.bias``) and is added after the product.

Prefill (many rows) does not come through here: the packed layers' kernel table
(:mod:`qtrain.quant.kernels`) runs it (Triton dequantize + cuBLAS on CUDA).

int8 dynamic activations (``act_int8``) are fake-quantized per token first, as the packed
layers do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtrain.quant import primitives as P
from qtrain.quant.cuda import kernels as K
from qtrain.quant.cuda.gemv import GEMV_MAX_ROWS
from qtrain.quant.cuda.kernels import INT4_ZERO
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear


@dataclass(frozen=True)
class LinearPlan:
    """How one linear runs: the path, and the static facts the math needs."""

    kind: str
    """``dense``, ``int8``, ``int4``, ``int4_tinygemm``, ``int4_triton`` or ``int8_triton``."""
    act_int8: bool = False
    """Fake-quantize the input per token (int8 dynamic activations)."""
    group: int = 0
    """int4: group size (tinygemm: its kernel group; others: the layer's, -1 per channel)."""
    out_features: int = 0
    bias: bool = False
    """The last tensor is a ``[N]`` bias."""


def tinygemm_tensors(layer: Int4Linear, group: int) -> tuple[Tensor, Tensor]:
    """tinygemm's tiled weight and ``[K/group, N, 2]`` bf16 scale-and-zero for ``layer`` (CUDA).

    Same conversion as the packed layer's CUDA path: swapped nibbles, ``(8 - zero) * scale``.
    """
    k = layer.in_features
    tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    p = layer.weight_packed
    swapped = ((p & 0x0F) << 4) | (p >> 4)  # tinygemm wants the even column in the high nibble
    tiled = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), tiles)
    s = layer.scales.float()
    z = None if layer.zeros is None else layer.zeros.float()
    if s.shape[1] != k // group:  # per channel: repeat the one scale per kernel group
        s = s.expand(-1, k // group)
        z = None if z is None else z.expand(-1, k // group)
    offset = torch.zeros_like(s) if z is None else (float(INT4_ZERO) - z) * s
    sz = torch.stack((s, offset), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return tiled, sz


TINYGEMM_GROUPS = (256, 128, 64, 32)


def tinygemm_group(layer: Int4Linear) -> int | None:
    """The group tinygemm runs ``layer`` with (per channel: the largest of :data:`TINYGEMM_GROUPS`
    dividing K, scales repeated), or None when tinygemm does not fit (N % 8, K % 32, group)."""
    k, g = layer.in_features, layer.spec.group_size
    if layer.out_features % 8 or k % 32:
        return None
    if g == -1:
        return next((c for c in TINYGEMM_GROUPS if k % c == 0), None)
    return g if g in TINYGEMM_GROUPS else None


KERNELS = ("tinygemm", "inductor", "triton", "triton-int8", "triton-int4")
"""``plan_linear``'s decode kernels for packed layers."""
TRITON_BITS = {"triton": (4, 8), "triton-int8": (8,), "triton-int4": (4,)}
"""The bit widths each ``triton*`` kernel choice runs with qtrain's Triton GEMV."""


def plan_linear(mod: nn.Module, device: torch.device, int4: str = "tinygemm") -> tuple[LinearPlan, tuple[Tensor, ...]]:
    """The plan and tensors of one linear layer for ``device``.

    Args:
        mod: ``nn.Linear``, :class:`Int8Linear` or :class:`Int4Linear` (a bias is kept).
        device: where it runs (tinygemm only on CUDA).
        int4: the packed layers' decode kernel: ``"tinygemm"`` (int4, CUDA, where it fits;
            int8 through Inductor), ``"inductor"`` (the in-graph dequantize, which a compiled
            one-row product turns into a fused GEMV) or ``"triton"`` (qtrain's Triton GEMV
            for int4 and int8, where Triton runs on ``device``; else as ``"tinygemm"``;
            ``"triton-int8"`` / ``"triton-int4"``: for that bit width only, tinygemm for the other).

    Returns:
        ``(plan, tensors)``.

    Raises:
        TypeError: any other module.
        ValueError: an unknown ``int4`` kernel.
    """
    if int4 not in KERNELS:
        raise ValueError(f"plan_linear: int4={int4!r} is not one of {list(KERNELS)}")
    bias = getattr(mod, "bias", None)
    tail, has_bias = ((bias,), True) if isinstance(bias, Tensor) else ((), False)
    if isinstance(mod, nn.Linear):
        return LinearPlan("dense", out_features=mod.out_features, bias=has_bias), (mod.weight, *tail)
    if not isinstance(mod, PackedLinear):
        raise TypeError(f"plan_linear: cannot plan {type(mod).__name__} (nn.Linear or packed)")
    act, n = mod.spec.activations == "int8", mod.out_features
    triton = mod.bits in TRITON_BITS.get(int4, ()) and K.available(device)
    if isinstance(mod, Int8Linear):
        kind = "int8_triton" if triton else "int8"
        return LinearPlan(kind, act, out_features=n, bias=has_bias), (mod.weight_int8, mod.scales.reshape(1, -1), *tail)
    assert isinstance(mod, Int4Linear)
    zeros = mod.zeros if mod.zeros is not None else torch.empty(0, dtype=torch.uint8, device=mod.scales.device)
    if triton:
        return LinearPlan("int4_triton", act, mod.spec.group_size, n, has_bias), (
            mod.weight_packed,
            mod.scales,
            zeros,
            *tail,
        )
    group = tinygemm_group(mod)
    if device.type == "cuda" and group is not None and int4 != "inductor":  # "triton" without Triton: tinygemm
        return LinearPlan("int4_tinygemm", act, group, n, has_bias), (*tinygemm_tensors(mod, group), *tail)
    return LinearPlan("int4", act, mod.spec.group_size, n, has_bias), (mod.weight_packed, mod.scales, zeros, *tail)


def _dequant_int4(packed: Tensor, scales: Tensor, zeros: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(n, k)
    g = k if group == -1 else group
    z = zeros.float().unsqueeze(-1) if zeros.numel() else float(INT4_ZERO)
    w = (codes.reshape(n, k // g, g).float() - z) * scales.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def _triton(plan: LinearPlan, xq: Tensor, ts: tuple[Tensor, ...], bias: Tensor | None) -> Tensor:
    """The Triton custom ops (GEMV up to 8 rows, dequantize-in-GEMM above), bias fused; bf16 out."""
    from qtrain.quant.cuda import ops  # noqa: F401 - registers torch.ops.qtrain

    x2 = xq.reshape(-1, xq.shape[-1])
    few = x2.shape[0] <= GEMV_MAX_ROWS
    if plan.kind == "int8_triton":
        op = torch.ops.qtrain.int8_gemv if few else torch.ops.qtrain.int8_gemm
        return op(x2, ts[0], ts[1], bias)
    zeros = ts[2] if ts[2].numel() else None
    op = torch.ops.qtrain.int4_gemv if few else torch.ops.qtrain.int4_gemm
    return op(x2, ts[0], ts[1], zeros, plan.group, bias)


def apply_linear(plan: LinearPlan, x: Tensor, tensors: tuple[Tensor, ...]) -> Tensor:
    """``(..., K) -> (..., N)`` in ``x``'s dtype through ``plan`` (traceable, no graph break).

    Args:
        plan: from :func:`plan_linear`.
        x: activations.
        tensors: the tensors :func:`plan_linear` returned with ``plan``.

    Returns:
        The output.
    """
    bias = tensors[-1] if plan.bias else None
    ts = tensors[:-1] if plan.bias else tensors
    kind = plan.kind
    if kind == "dense":
        return F.linear(x, ts[0], bias)
    xq = P.fake_quantize_per_token(x) if plan.act_int8 else x
    if kind in ("int4_triton", "int8_triton"):
        return _triton(plan, xq, ts, bias).to(x.dtype).reshape(*x.shape[:-1], plan.out_features)
    if kind == "int8":
        y = F.linear(xq, ts[0].to(x.dtype)) * ts[1].to(x.dtype)
    elif kind == "int4_tinygemm":
        x2 = xq.reshape(-1, xq.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm(x2, ts[0], plan.group, ts[1])
        y = y.to(x.dtype).reshape(*x.shape[:-1], plan.out_features)
    elif kind == "int4":
        y = F.linear(xq, _dequant_int4(ts[0], ts[1], ts[2], plan.group, x.dtype))
    else:
        raise ValueError(f"apply_linear: unknown plan kind {kind!r}")
    return y if bias is None else y + bias.to(y.dtype)
