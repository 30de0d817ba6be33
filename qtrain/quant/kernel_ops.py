"""What the kernels of :mod:`qtrain.quant.kernels` share: a layer's buffers and common ops.

:class:`PackedWeights` is a packed layer's canonical buffers as the kernels take them (this
module knows nothing of the layer classes); :func:`activations` the per-token quantization of
int8 dynamic activations; :func:`int8_gemv` the compiled CUDA GEMV.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qtrain.quant import primitives as P

log = logging.getLogger(__name__)

INT4_ZERO = float(P.implicit_zero(4))
"""The implicit zero of 4-bit codes, also tinygemm's int4 offset."""


@dataclass(frozen=True)
class PackedWeights:
    """The canonical buffers of one packed layer (see :mod:`qtrain.quant.packed`).

    Attributes:
        bits: 8 or 4.
        data: int8 ``[N, K]`` codes (8 bits) or packed uint8 ``[N, K/2]`` (4 bits).
        scales: bf16 ``[N, G]``.
        zeros: uint8 ``[N, G]`` or None (symmetric).
        in_features: K.
        group_size: the spec's group (-1: per channel).
        act_int8: int8 dynamic activations.
        group: the group the int4 kernels run it with (:func:`qtrain.quant.kernels.kernel_group`), or None.
    """

    bits: int
    data: Tensor
    scales: Tensor
    zeros: Tensor | None
    in_features: int
    group_size: int
    act_int8: bool = False
    group: int | None = None

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def own_group(self) -> int:
        """Columns per stored scale."""
        return self.in_features // self.scales.shape[1]

    def codes(self) -> Tensor:
        """Unpacked codes ``[N, K]``."""
        return P.unpack_int4(self.data) if self.bits == 4 else self.data

    def scale_and_zero(self, group: int, n_pad: int) -> Tensor:
        """tinygemm ``[K/group, N + n_pad, 2]`` bf16: scale and ``(8 - zero) * scale`` (int4).

        Per-channel weights run with a kernel ``group`` repeat their one scale per row.
        """
        s = self.scales.float()  # (N, G)
        z = None if self.zeros is None else self.zeros.float()
        g_kernel = self.in_features // group
        if s.shape[1] != g_kernel:
            s = s.expand(-1, g_kernel)
            z = None if z is None else z.expand(-1, g_kernel)
        offset = torch.zeros_like(s) if z is None else (INT4_ZERO - z) * s
        sz = F.pad(torch.stack((s, offset), dim=-1), (0, 0, 0, 0, 0, n_pad))  # (N + pad, G', 2)
        return sz.transpose(0, 1).contiguous().to(torch.bfloat16)

    def dequantize_bf16(self) -> Tensor:
        """bf16 ``[N, K]`` weight, computed without a float32 copy."""
        if self.bits == 8:
            return self.data.to(torch.bfloat16) * self.scales
        zero = INT4_ZERO if self.zeros is None else self.zeros.to(torch.bfloat16).unsqueeze(-1)
        cg = P.group_view(self.codes(), self.group_size).to(torch.bfloat16)  # (N, G, g)
        return ((cg - zero) * self.scales.unsqueeze(-1)).reshape(self.out_features, self.in_features)


def activations(x2: Tensor, w: PackedWeights) -> Tensor:
    """The activations the weight path sees: quantized per token (and back) for int8 ones."""
    return P.fake_quantize_per_token(x2) if w.act_int8 else x2


def tinygemm_tiles(k: int) -> int | None:
    """Inner tiles tinygemm takes for K (None: K is not a multiple of 32)."""
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)


def _int8_gemv_math(x: Tensor, w: Tensor, s_row: Tensor) -> Tensor:
    """``(x @ w.T) * s_row`` as a broadcast multiply and a K reduction (fp32 accumulation).

    Eagerly this would materialise ``M x N x K`` products; compiled, Inductor fuses it into
    one reduction kernel that reads each int8 weight once (half the bytes of a bf16 weight),
    which cuBLAS cannot do for a mixed int8/bf16 product.
    """
    prod = x.unsqueeze(1).float() * w.unsqueeze(0).float()  # (M, N, K)
    return prod.sum(-1) * s_row


_GEMV: dict[str, Callable[..., Tensor] | None] = {}


def int8_gemv(x: Tensor, w: Tensor, s_row: Tensor) -> Tensor | None:
    """Fused int8-weight GEMV through ``torch.compile`` (CUDA decode), or None when unavailable.

    The compiled function is built once per process (dynamic shapes: one kernel serves every
    layer); if compiling fails the failure is logged once and callers use their fallback.

    Args:
        x: ``(M, K)`` bf16 activations, M small.
        w: ``(N, K)`` int8 codes.
        s_row: ``(1, N)`` fp32 per-channel scales.

    Returns:
        ``(M, N)`` fp32, or None.
    """
    if "fn" not in _GEMV:
        try:
            opts: dict[str, str | int | bool | Callable[..., Any]] = {"coordinate_descent_tuning": True}
            _GEMV["fn"] = torch.compile(_int8_gemv_math, dynamic=True, fullgraph=True, options=opts)
        except Exception as err:  # noqa: BLE001 - no compiler here: use the fallback
            log.info("int8 GEMV: torch.compile unavailable (%s); using dequantize + matmul", err)
            _GEMV["fn"] = None
    fn = _GEMV["fn"]
    if fn is None:
        return None
    try:
        return fn(x, w, s_row)
    except Exception as err:  # noqa: BLE001 - e.g. no Triton / C compiler: fall back from now on
        log.info("int8 GEMV: compiled kernel failed (%s); using dequantize + matmul", str(err).splitlines()[0][:200])
        _GEMV["fn"] = None
        return None
