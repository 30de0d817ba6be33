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
- ``int4_dequant`` / ``int8_dequant`` (rows above a threshold, :class:`PrefillLinear`): the
  Triton dequantize kernel writes the bf16 weight, then cuBLAS (what the packed layers' kernel
  table runs for many rows); ``int8_intmm`` (int8 activations): ``torch._int_mm``.
- ``int4_gemm`` / ``int8_gemm``: the Triton dequantize-in-GEMM kernels (measured 2x slower than
  the dequantize + cuBLAS path at 512 rows on an H200; kept for comparison).

int8 dynamic activations (``act_int8``) are fake-quantized per token first, as the packed
layers do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtrain.quant import primitives as P
from qtrain.quant.cuda import kernels
from qtrain.quant.cuda.kernels import INT4_ZERO
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear, QuantEmbedding

PREFILL_MIN_ROWS = 65
"""Rows from which :class:`PrefillLinear` uses the dequantize-in-GEMM kernels (tinygemm and the
int8 GEMV serve fewer; the packed layers' own row limit is 64)."""


@dataclass(frozen=True)
class LinearPlan:
    """How one linear runs: the path, and the static facts the math needs."""

    kind: str
    """``dense``, ``int8``, ``int4``, ``int4_tinygemm``, ``int4_dequant``, ``int8_dequant``,
    ``int4_gemm``, ``int8_gemm`` or ``int8_intmm``."""
    act_int8: bool = False
    """Fake-quantize the input per token (int8 dynamic activations)."""
    group: int = 0
    """int4: group size (tinygemm: its kernel group; others: the layer's, -1 per channel)."""
    out_features: int = 0


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


def plan_linear(
    mod: nn.Module, device: torch.device, many_rows: bool = False, int4: str = "tinygemm"
) -> tuple[LinearPlan, tuple[Tensor, ...]]:
    """The plan and tensors of one linear layer for ``device``.

    Args:
        mod: ``nn.Linear`` (no bias), :class:`Int8Linear` or :class:`Int4Linear`.
        device: where it runs (tinygemm and Triton only on CUDA, or under the interpreter).
        many_rows: plan for prefill (Triton dequantize + cuBLAS / ``_int_mm``) instead of decode.
        int4: decode int4 with ``"tinygemm"`` (CUDA, where it fits) or ``"inductor"`` (the
            in-graph dequantize, which a compiled one-row product turns into a fused GEMV).

    Returns:
        ``(plan, tensors)``.

    Raises:
        TypeError: any other module (or a linear with a bias).
    """
    if isinstance(mod, nn.Linear) and mod.bias is None:
        return LinearPlan("dense", out_features=mod.out_features), (mod.weight,)
    if not isinstance(mod, PackedLinear):
        raise TypeError(f"plan_linear: cannot plan {type(mod).__name__} (nn.Linear without bias or packed)")
    act, n = mod.spec.activations == "int8", mod.out_features
    triton_ok = kernels.available(device)
    if isinstance(mod, Int8Linear):
        s_row = mod.scales.reshape(1, -1)
        if many_rows and act and device.type == "cuda" and mod.in_features % 8 == 0 and n % 8 == 0:
            return LinearPlan("int8_intmm", True, out_features=n), (mod.weight_int8.t(), s_row.float())
        kind = "int8_dequant" if many_rows and triton_ok else "int8"
        return LinearPlan(kind, act, out_features=n), (mod.weight_int8, s_row)
    assert isinstance(mod, Int4Linear)
    zeros = mod.zeros if mod.zeros is not None else torch.empty(0, dtype=torch.uint8, device=mod.scales.device)
    if many_rows and triton_ok:
        return LinearPlan("int4_dequant", act, mod.spec.group_size, n), (mod.weight_packed, mod.scales, zeros)
    group = tinygemm_group(mod)
    if device.type == "cuda" and group is not None and not many_rows and int4 == "tinygemm":  # slow for many rows
        return LinearPlan("int4_tinygemm", act, group, n), tinygemm_tensors(mod, group)
    return LinearPlan("int4", act, mod.spec.group_size, n), (mod.weight_packed, mod.scales, zeros)


def _dequant_int4(packed: Tensor, scales: Tensor, zeros: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(n, k)
    g = k if group == -1 else group
    z = zeros.float().unsqueeze(-1) if zeros.numel() else float(INT4_ZERO)
    w = (codes.reshape(n, k // g, g).float() - z) * scales.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def apply_linear(plan: LinearPlan, x: Tensor, tensors: tuple[Tensor, ...]) -> Tensor:
    """``(..., K) -> (..., N)`` in ``x``'s dtype through ``plan`` (traceable, no graph break).

    Args:
        plan: from :func:`plan_linear`.
        x: activations.
        tensors: the tensors :func:`plan_linear` returned with ``plan``.

    Returns:
        The output.
    """
    kind = plan.kind
    if kind == "dense":
        return F.linear(x, tensors[0])
    if kind == "int8_intmm":  # int8 x int8 -> int32, then both scales
        x2 = x.reshape(-1, x.shape[-1])
        codes, sx = P.quantize_per_token(x2)
        acc = torch._int_mm(codes, tensors[0])
        return (acc.float() * sx.float() * tensors[1]).to(x.dtype).reshape(*x.shape[:-1], plan.out_features)
    xq = P.fake_quantize_per_token(x) if plan.act_int8 else x
    if kind == "int8":
        return F.linear(xq, tensors[0].to(x.dtype)) * tensors[1].to(x.dtype)
    if kind == "int8_dequant":
        return F.linear(xq.to(torch.bfloat16), kernels.dequant_int8(tensors[0], tensors[1])).to(x.dtype)
    if kind == "int4_dequant":
        zeros = tensors[2] if tensors[2].numel() else None
        w = kernels.dequant_int4(tensors[0], tensors[1], zeros, plan.group)
        return F.linear(xq.to(torch.bfloat16), w).to(x.dtype)
    if kind == "int8_gemm":
        return kernels.int8_gemm(xq, tensors[0], tensors[1]).to(x.dtype)
    if kind == "int4_gemm":
        zeros = tensors[2] if tensors[2].numel() else None
        return kernels.int4_gemm(xq, tensors[0], tensors[1], zeros, plan.group).to(x.dtype)
    if kind == "int4_tinygemm":
        x2 = xq.reshape(-1, xq.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm(x2, tensors[0], plan.group, tensors[1])
        return y.to(x.dtype).reshape(*x.shape[:-1], plan.out_features)
    if kind == "int4":
        return F.linear(xq, _dequant_int4(tensors[0], tensors[1], tensors[2], plan.group, x.dtype))
    raise ValueError(f"apply_linear: unknown plan kind {kind!r}")


class PrefillLinear(nn.Module):
    """A packed layer that runs many-row inputs through the Triton dequantize + cuBLAS path.

    At most :data:`PREFILL_MIN_ROWS` - 1 rows go to the wrapped layer (tinygemm, the int8
    GEMV); more go to :func:`apply_linear` with the ``many_rows`` plan.

    Args:
        layer: the packed layer (kept as the ``layer`` child; buffers unchanged).
    """

    def __init__(self, layer: PackedLinear) -> None:
        super().__init__()
        self.layer = layer
        self._plan: tuple[LinearPlan, tuple[Tensor, ...]] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``(..., K) -> (..., N)``."""
        rows = x.numel() // x.shape[-1]
        if rows < PREFILL_MIN_ROWS:
            return self.layer(x)
        if self._plan is None:
            self._plan = plan_linear(self.layer, x.device, many_rows=True)
        return apply_linear(self._plan[0], x, self._plan[1])


def swap_for_prefill(model: nn.Module) -> int:
    """Wrap every packed layer of ``model`` in a :class:`PrefillLinear` (in place).

    An embedding's own packed table stays as it is (lookups, not products).

    Args:
        model: a model holding packed layers.

    Returns:
        How many layers were wrapped.
    """
    targets = []
    for name, mod in model.named_modules():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, PackedLinear) and not isinstance(parent, QuantEmbedding):
            targets.append((parent, child, mod))
    for parent, child, mod in targets:
        setattr(parent, child, PrefillLinear(mod))
    return len(targets)
