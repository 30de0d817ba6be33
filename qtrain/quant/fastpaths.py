"""Device fast paths of the packed layers: closures over a layer's canonical buffers.

Each builder returns a :data:`FastPath`: ``(M, K) activations -> (M, N)`` in the input's
dtype, or ``None`` when the row count is past what the path serves (the layer then runs its
reference path). Which path runs where is documented in :mod:`qtrain.quant.packed`; this
module only builds them, from tensors, and knows nothing of the layer classes.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qtrain.quant import native
from qtrain.quant import primitives as P

log = logging.getLogger(__name__)

FastPath = Callable[[Tensor], Tensor | None]

CPU_KERNEL_MAX_ROWS = 64
"""Rows (tokens) up to which the CPU packed kernels beat dequantize + fp32 matmul.

Measured here (1 thread, K x N from 384 x 1152 to 4096 x 4096): the kernels win up to 64 rows
everywhere, the reference wins for model-sized layers from about 128 to 256 rows on.
"""
NATIVE_MAX_ROWS = 8
"""Rows up to which the CPU layers may use qtrain's own kernels (:mod:`qtrain.quant.native`):
with ``kernel=native``, or ``auto`` where :mod:`qtrain.quant.autotune` measured them faster.

Measured on an AMD EPYC (AVX2, 2 threads, 4096 x 1024): int4 2.1x and int8 2.0x faster than
PyTorch's kernels at 1 row, about 1.1x at 4 rows, even at 8; PyTorch's kernels from 16 rows on.
On an AVX-512/AMX Xeon PyTorch's int4 kernel is the faster one.
"""
CUDA_TINYGEMM_MAX_ROWS = 64
"""Rows up to which tinygemm is used on CUDA; dequantize + bf16 matmul above."""
GEMV_MAX_ROWS = 16
"""Rows up to which CUDA int8 weight-only layers use the compiled fused GEMV (:func:`int8_gemv`)."""


@dataclass(frozen=True)
class Int4Weight:
    """The canonical int4 buffers of one layer (see :mod:`qtrain.quant.packed`).

    ``group_size`` is the spec's (-1: per channel); ``in_features`` is K.
    """

    packed: Tensor
    scales: Tensor
    zeros: Tensor | None
    in_features: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def codes(self) -> Tensor:
        """Unpacked ``uint8 [N, K]`` codes."""
        return P.unpack_int4(self.packed)

    def scale_and_zero(self, group: int, n_pad: int) -> Tensor:
        """tinygemm ``[K/group, N + n_pad, 2]`` bf16: scale and ``(8 - zero) * scale``.

        Per-channel weights run with a kernel ``group`` repeat their one scale per row.
        """
        s = self.scales.float()  # (N, G)
        z = None if self.zeros is None else self.zeros.float()
        g_kernel = self.in_features // group
        if s.shape[1] != g_kernel:
            s = s.expand(-1, g_kernel)
            z = None if z is None else z.expand(-1, g_kernel)
        offset = torch.zeros_like(s) if z is None else (8.0 - z) * s
        sz = F.pad(torch.stack((s, offset), dim=-1), (0, 0, 0, 0, 0, n_pad))  # (N + pad, G', 2)
        return sz.transpose(0, 1).contiguous().to(torch.bfloat16)

    def dequantize_bf16(self) -> Tensor:
        """bf16 ``[N, K]`` weight, computed without a float32 copy."""
        zero = 8.0 if self.zeros is None else self.zeros.to(torch.bfloat16).unsqueeze(-1)
        cg = P.group_view(self.codes(), self.group_size).to(torch.bfloat16)  # (N, G, g)
        return ((cg - zero) * self.scales.unsqueeze(-1)).reshape(self.out_features, self.in_features)


def _act(x2: Tensor, act_int8: bool) -> Tensor:
    """The activations the weight path sees: quantized per token (and back) for int8 ones."""
    return P.fake_quantize_per_token(x2) if act_int8 else x2


# -- CPU ----------------------------------------------------------------------------------------
class NativePick:
    """qtrain's kernel library for one layer's decode calls, or None (PyTorch's kernels), decided
    on the first call that needs it: ``kernel="native"`` uses it when it builds, ``"torch"``
    never, ``"auto"`` when :func:`qtrain.quant.autotune.choose` picks it on this machine."""

    def __init__(self, kernel: str, bits: int, fits: bool) -> None:
        self.kernel, self.bits, self.fits = kernel, bits, fits
        self._lib: list[ctypes.CDLL | None] = []

    def __call__(self) -> ctypes.CDLL | None:
        if not self._lib:
            use = self.fits and self.kernel in ("auto", "native")
            if use and self.kernel == "auto":
                from qtrain.quant import autotune  # imports this module: resolved lazily

                use = native.library() is not None and autotune.choose(self.bits) == "native"
            self._lib.append(native.library() if use else None)
        return self._lib[0]


def int8_cpu(w: Tensor, scales: Tensor, act_int8: bool, kernel: str) -> FastPath:
    """qtrain's int8 kernel up to :data:`NATIVE_MAX_ROWS` rows (see :class:`NativePick`),
    ``aten._weight_int8pack_mm`` (bf16 activations) up to :data:`CPU_KERNEL_MAX_ROWS`.
    ``w`` int8 ``[N, K]`` with K % 8 == 0 (the aten kernel crashes the process otherwise)."""
    s1 = scales.reshape(-1).contiguous()  # (N,) bf16
    op = torch.ops.aten._weight_int8pack_mm
    pick = NativePick(kernel, 8, native.int8_supported(w.shape[1]))

    def run_cpu(x2: Tensor) -> Tensor | None:
        if x2.shape[0] > CPU_KERNEL_MAX_ROWS:
            return None
        xq = _act(x2, act_int8)
        if x2.shape[0] <= NATIVE_MAX_ROWS and (lib := pick()) is not None:
            return native.int8_linear(lib, xq.float().contiguous(), w, s1).to(x2.dtype)
        return op(xq.to(torch.bfloat16).contiguous(), w, s1).to(x2.dtype)

    return run_cpu


def int4_cpu(w: Int4Weight, group: int, act_int8: bool, kernel: str) -> FastPath:
    """qtrain's int4 kernel up to :data:`NATIVE_MAX_ROWS` rows (canonical buffers, no copy; see
    :class:`NativePick`), PyTorch's ``_weight_int4pack_mm_for_cpu`` up to
    :data:`CPU_KERNEL_MAX_ROWS` (its repacked copy is made on first use only). ``group``: the
    aten kernel's group for this layer."""
    own_group = w.in_features // w.scales.shape[1]
    pick = NativePick(kernel, 4, native.int4_supported(w.in_features, own_group))
    scales = w.scales.contiguous()
    aten: list[Callable[[Tensor], Tensor]] = []

    def run_cpu(x2: Tensor) -> Tensor | None:
        if x2.shape[0] > CPU_KERNEL_MAX_ROWS:
            return None
        xq = _act(x2, act_int8)
        if x2.shape[0] <= NATIVE_MAX_ROWS and (lib := pick()) is not None:
            return native.int4_linear(lib, xq.float().contiguous(), w.packed, scales, w.zeros, own_group).to(x2.dtype)
        if not aten:
            aten.append(tinygemm_cpu(w, group))
        return aten[0](xq)

    return run_cpu


def tinygemm_cpu(w: Int4Weight, group: int) -> Callable[[Tensor], Tensor]:
    """``aten._weight_int4pack_mm_for_cpu`` on a repacked copy (bf16 activations; N padded to 16)."""
    n = w.out_features
    n_pad = -n % 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
    codes = F.pad(w.codes().to(torch.int32), (0, 0, 0, n_pad), value=8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = w.scale_and_zero(group, n_pad)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu

    def run(xq: Tensor) -> Tensor:
        y = op(xq.to(torch.bfloat16).contiguous(), packed, group, sz)
        return (y[:, :n] if n_pad else y).to(xq.dtype)

    return run


# -- CUDA ---------------------------------------------------------------------------------------
def int8_cuda(w: Tensor, scales: Tensor, act_int8: bool) -> FastPath:
    """int8 x int8 ``torch._int_mm`` with int8 activations (M > 16); a compiled fused
    dequantize-GEMV reading the int8 weight directly for decode (M <= 16); else bf16
    dequantize + matmul."""
    n, k = w.shape
    int_mm_ok = act_int8 and k % 8 == 0 and n % 8 == 0
    w_t = w.t()  # (K, N) column-major view, the layout cuBLAS int8 GEMM wants
    s_row = scales.float().reshape(1, -1)  # (1, N)

    def run_cuda(x2: Tensor) -> Tensor:
        if int_mm_ok and x2.shape[0] > 16:
            codes, sx = P.quantize_per_token(x2)  # int8 (M, K), bf16 (M, 1)
            acc = torch._int_mm(codes.contiguous(), w_t)  # int32 (M, N)
            return (acc.float() * sx.float() * s_row).to(x2.dtype)
        xq = _act(x2, act_int8)
        if x2.shape[0] <= GEMV_MAX_ROWS:
            y = int8_gemv(xq.to(torch.bfloat16), w, s_row)
            if y is not None:
                return y.to(x2.dtype)
        wb = w.to(torch.bfloat16) * scales  # (N, K) bf16, transient
        return F.linear(xq.to(torch.bfloat16), wb).to(x2.dtype)

    return run_cuda


def int4_cuda(w: Int4Weight, group: int, act_int8: bool, note: Callable[[str], None]) -> FastPath:
    """tinygemm ``aten._weight_int4pack_mm`` up to :data:`CUDA_TINYGEMM_MAX_ROWS` rows when the
    shape allows it (N % 8 == 0, K a multiple of 32; else ``note`` says so), dequantize to bf16
    + matmul otherwise."""
    k, n = w.in_features, w.out_features
    tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
    use_tinygemm = tiles is not None and n % 8 == 0
    if not use_tinygemm:
        note(f"tinygemm needs N % 8 == 0 and K % 32 == 0 (N={n}, K={k}); dequantize + matmul only")
    else:
        p = w.packed
        swapped = ((p & 0x0F) << 4) | (p >> 4)  # tinygemm wants the even column in the high nibble
        tiled = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), tiles)
        sz = w.scale_and_zero(group, 0)

    def run_cuda(x2: Tensor) -> Tensor:
        xb = _act(x2, act_int8).to(torch.bfloat16).contiguous()
        if use_tinygemm and x2.shape[0] <= CUDA_TINYGEMM_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm(xb, tiled, group, sz)
        else:
            y = F.linear(xb, w.dequantize_bf16())
        return y.to(x2.dtype)

    return run_cuda


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
