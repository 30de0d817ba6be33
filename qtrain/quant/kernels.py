"""Which kernel a packed layer runs: ONE table, (device, rows, bits, activations) -> callable.

:data:`TABLE` lists every fast kernel, in order of preference. For a call with M rows (tokens)
on a device, a layer runs the first row whose device, bit width and activation mode match,
whose row range holds M, that takes the layer's shape (``fits``), that the layer's
``quant.kernel`` selects (``use``) and whose callable returns a result (``None`` passes to the
next row, e.g. a compiled kernel that failed). When none does, the layer runs its reference
path (dequantize + float32 matmul), which is also what ``kernel="reference"`` forces:

=======  ====  ======  =========  ============================================================
device   bits  acts    rows       kernel
=======  ====  ======  =========  ============================================================
cpu      8     any     1..8       qtrain's AVX2 int8 (:mod:`qtrain.quant.native`) [native]
cpu      8     any     1..64      ``aten._weight_int8pack_mm``, bf16 activations (K % 8 == 0)
cpu      4     any     1..8       qtrain's AVX2 int4 [native]
cpu      4     any     1..64      ``aten._weight_int4pack_mm_for_cpu`` (repacked copy, bf16)
cuda     8     int8    17..       ``torch._int_mm`` int8 x int8 -> int32, then both scales
cuda     8     any     1..8       [measured] Triton GEMV | compiled GEMV
cuda     8     any     1..16      ``torch.compile``-fused dequantize-GEMV (:func:`int8_gemv`)
cuda     8     any     1..        [measured] Triton dequantize-in-GEMM | Triton dequantize + cuBLAS
cuda     8     any     1..        dequantize to bf16 + matmul
cuda     4     any     1..8       [measured] Triton GEMV | tinygemm
cuda     4     any     1..64      tinygemm ``aten._weight_int4pack_mm`` (bf16)
cuda     4     any     1..        [measured] Triton dequantize-in-GEMM | Triton dequantize + cuBLAS
cuda     4     any     1..        dequantize to bf16 + matmul
=======  ====  ======  =========  ============================================================

[measured]: rows ``decode`` and ``prefill`` (where Triton is installed, :mod:`qtrain.quant.cuda`)
time their candidates on a layer's first call and keep the fastest, remembered per layer shape
(``prefill``: per power-of-two row bucket too); see :mod:`qtrain.quant.cuda.select`. Triton
GEMV: one kernel reading the packed weight once (decode); dequantize-in-GEMM: the weight
dequantized tile by tile in registers, never written; dequantize + cuBLAS: the whole bf16
weight written by one kernel, then ``F.linear``.

[native]: used with ``quant.kernel=native`` where the library builds, and with ``auto`` where
:mod:`qtrain.quant.autotune` measured it faster on this machine; ``torch`` never uses it.
int4 kernels need a group in :data:`INT4_KERNEL_GROUPS` (per channel: the largest one
dividing K, scales repeated). Above 64 rows the reference path is faster on CPU than these
kernels (prefill, evaluation). With int8 dynamic activations each kernel quantizes its input
per token first (the fake-quant primitive). A new kernel is a row here and its callable
(below; a C kernel's binding lives in :mod:`qtrain.quant.native`).

Kernel conventions found by testing (torch 2.13): tinygemm computes ``(q - 8) * scale + zero``
from ``scale_and_zero [K/g, N, 2]`` (bf16), 8 being its int4 offset, the implicit zero of 4-bit
codes; so symmetric codes get ``zero = 0`` and asymmetric ones ``(8 - z) * scale`` (rounded to
bf16, hence not bit exact). The int4 CPU kernel needs N % 16 == 0 (N is padded with zero
rows); the int8 CPU kernel needs K % 8 == 0 and **crashes the process** otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qtrain.quant import native
from qtrain.quant import primitives as P
from qtrain.quant.cuda.gemv import GEMV_MAX_ROWS as DECODE_MAX_ROWS
from qtrain.quant.cuda.table import any_fits, measured, triton_gemm_cuda, triton_gemv_cuda
from qtrain.quant.kernel_ops import INT4_ZERO, PackedWeights, activations, int8_gemv, tinygemm_tiles
from qtrain.quant.spec import LayerSpec

log = logging.getLogger(__name__)

FastPath = Callable[[Tensor], Tensor | None]
"""``(M, K) activations -> (M, N)`` in the input's dtype, or None (the next kernel / reference)."""
KERNELS = ("auto", "native", "torch", "reference")
"""``quant.kernel`` values."""
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
CPU_KERNEL_MAX_ROWS = 64
"""Rows (tokens) up to which the CPU packed kernels beat dequantize + fp32 matmul.

Measured here (1 thread, K x N from 384 x 1152 to 4096 x 4096): the kernels win up to 64 rows
everywhere, the reference wins for model-sized layers from about 128 to 256 rows on.
"""
NATIVE_MAX_ROWS = 8
"""Rows up to which the CPU layers may use qtrain's own kernels: with ``kernel=native``, or
``auto`` where :mod:`qtrain.quant.autotune` measured them faster.

Measured on an AMD EPYC (AVX2, 2 threads, 4096 x 1024): int4 2.1x and int8 2.0x faster than
PyTorch's kernels at 1 row, about 1.1x at 4 rows, even at 8; PyTorch's kernels from 16 rows on.
On an AVX-512/AMX Xeon PyTorch's int4 kernel is the faster one.
"""
CUDA_TINYGEMM_MAX_ROWS = 64
"""Rows up to which tinygemm is used on CUDA; dequantize + bf16 matmul above."""
GEMV_MAX_ROWS = 16
"""Rows up to which CUDA int8 weight-only layers use the compiled fused GEMV (:func:`int8_gemv_cuda`)."""
ANY_ROWS = 1 << 62


def check_kernel(kernel: str) -> str:
    """Return ``kernel`` if it is one of :data:`KERNELS`.

    Raises:
        ValueError: any other value (names ``quant.kernel``).
    """
    if kernel not in KERNELS:
        raise ValueError(f"quant.kernel={kernel!r} is not one of {list(KERNELS)}")
    return kernel


def kernel_group(spec: LayerSpec, in_features: int) -> int | None:
    """Group size the int4 kernels can run this layer with (per channel: the largest dividing K), or None."""
    if spec.group_size in INT4_KERNEL_GROUPS:
        return spec.group_size
    if spec.group_size == -1:
        return next((g for g in INT4_KERNEL_GROUPS if in_features % g == 0), None)
    return None


def _use_native(kernel: str, bits: int) -> bool:
    """Whether a layer with ``quant.kernel=kernel`` runs qtrain's own CPU kernel (decided once per layer)."""
    if kernel == "native":
        return native.library() is not None
    if kernel != "auto" or native.library() is None:
        return False
    from qtrain.quant import autotune  # imports the kernel builders: resolved lazily

    return autotune.choose(bits) == "native"


def _always(kernel: str, bits: int) -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    """One row of :data:`TABLE`.

    Attributes:
        name: short name (logs, tests).
        device: ``torch.device.type`` it runs on.
        bits: weight bits.
        rows: inclusive range of rows per call it serves.
        act_int8: None for any activation mode, True for int8 dynamic activations only.
        fits: ``fits(weights)`` -> None when it takes the layer, else why not.
        build: ``build(weights)`` -> the callable (built on first use, once per layer).
        use: ``use(kernel, bits)`` -> whether the layer's ``quant.kernel`` selects it (once per layer).
    """

    name: str
    device: str
    bits: int
    rows: tuple[int, int]
    act_int8: bool | None
    fits: Callable[[PackedWeights], str | None]
    build: Callable[[PackedWeights], FastPath]
    use: Callable[[str, int], bool] = _always


# -- the kernels: closures over one layer's buffers (built on first use) ---------------------------
# -- CPU
def native_int8(w: PackedWeights) -> Callable[[Tensor], Tensor]:
    """qtrain's AVX2 int8 kernel (float32 activations)."""
    s1 = w.scales.reshape(-1).contiguous()  # (N,) bf16
    lib = native.library()
    assert lib is not None

    def run(x2: Tensor) -> Tensor:
        return native.int8_linear(lib, activations(x2, w).float().contiguous(), w.data, s1).to(x2.dtype)

    return run


def aten_int8_cpu(w: PackedWeights) -> Callable[[Tensor], Tensor]:
    """``aten._weight_int8pack_mm`` with bf16 activations (K % 8 == 0: it crashes the process otherwise)."""
    s1 = w.scales.reshape(-1).contiguous()  # (N,) bf16
    op = torch.ops.aten._weight_int8pack_mm

    def run(x2: Tensor) -> Tensor:
        return op(activations(x2, w).to(torch.bfloat16).contiguous(), w.data, s1).to(x2.dtype)

    return run


def native_int4(w: PackedWeights) -> Callable[[Tensor], Tensor]:
    """qtrain's AVX2 int4 kernel on the canonical buffers (no copy)."""
    scales = w.scales.contiguous()
    lib = native.library()
    assert lib is not None

    def run(x2: Tensor) -> Tensor:
        xq = activations(x2, w).float().contiguous()
        return native.int4_linear(lib, xq, w.data, scales, w.zeros, w.own_group).to(x2.dtype)

    return run


def aten_int4_cpu(w: PackedWeights) -> Callable[[Tensor], Tensor]:
    """``aten._weight_int4pack_mm_for_cpu`` on a repacked copy (bf16 activations; N padded to 16)."""
    assert w.group is not None
    group, n = w.group, w.out_features
    n_pad = -n % 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
    codes = F.pad(w.codes().to(torch.int32), (0, 0, 0, n_pad), value=int(INT4_ZERO))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = w.scale_and_zero(group, n_pad)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu

    def run(x2: Tensor) -> Tensor:
        xq = activations(x2, w)
        y = op(xq.to(torch.bfloat16).contiguous(), packed, group, sz)
        return (y[:, :n] if n_pad else y).to(xq.dtype)

    return run


# -- CUDA ---------------------------------------------------------------------------------------
def int_mm_cuda(w: PackedWeights) -> Callable[[Tensor], Tensor]:
    """int8 x int8 ``torch._int_mm`` (activations quantized per token), then both scales."""
    w_t = w.data.t()  # (K, N) column-major view, the layout cuBLAS int8 GEMM wants
    s_row = w.scales.float().reshape(1, -1)  # (1, N)

    def run(x2: Tensor) -> Tensor:
        codes, sx = P.quantize_per_token(x2)  # int8 (M, K), bf16 (M, 1)
        acc = torch._int_mm(codes.contiguous(), w_t)  # int32 (M, N)
        return (acc.float() * sx.float() * s_row).to(x2.dtype)

    return run


def int8_gemv_cuda(w: PackedWeights) -> Callable[[Tensor], Tensor | None]:
    """A compiled fused dequantize-GEMV reading the int8 weight directly (decode)."""
    s_row = w.scales.float().reshape(1, -1)  # (1, N)

    def run(x2: Tensor) -> Tensor | None:
        y = int8_gemv(activations(x2, w).to(torch.bfloat16), w.data, s_row)
        return None if y is None else y.to(x2.dtype)

    return run


def dequant_bf16(w: PackedWeights) -> Callable[[Tensor], Tensor]:
    """Dequantize to bf16 (transient, per call) + bf16 matmul."""

    def run(x2: Tensor) -> Tensor:
        xb = activations(x2, w).to(torch.bfloat16)
        return F.linear(xb.contiguous() if w.bits == 4 else xb, w.dequantize_bf16()).to(x2.dtype)

    return run


def triton_dequant_cuda(w: PackedWeights) -> Callable[[Tensor], Tensor | None]:
    """One Triton kernel writes the bf16 weight (transient, per call), then cuBLAS ``F.linear``."""
    from qtrain.quant import cuda as qcuda  # imports only torch (Triton lazily, at the first launch)

    failed: list[str] = []

    def run(x2: Tensor) -> Tensor | None:
        if failed:
            return None
        try:
            if w.bits == 8:
                wb = qcuda.dequant_int8(w.data, w.scales)
            else:
                wb = qcuda.dequant_int4(w.data, w.scales, w.zeros, w.group_size)
        except Exception as err:  # noqa: BLE001 - e.g. Triton cannot compile here: the next row from now on
            failed.append(str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
            log.warning("Triton dequantize failed (%s); using dequantize + matmul", failed[0])
            return None
        return F.linear(activations(x2, w).to(torch.bfloat16), wb).to(x2.dtype)

    return run


def tinygemm_cuda(w: PackedWeights) -> Callable[[Tensor], Tensor]:
    """tinygemm ``aten._weight_int4pack_mm`` (bf16), N % 8 == 0 and K a multiple of 32."""
    tiles, group = tinygemm_tiles(w.in_features), w.group
    assert tiles is not None and group is not None
    p = w.data
    swapped = ((p & 0x0F) << 4) | (p >> 4)  # tinygemm wants the even column in the high nibble
    tiled = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), tiles)
    sz = w.scale_and_zero(group, 0)

    def run(x2: Tensor) -> Tensor:
        xb = activations(x2, w).to(torch.bfloat16).contiguous()
        return torch.ops.aten._weight_int4pack_mm(xb, tiled, group, sz).to(x2.dtype)

    return run


# -- fits: None when the kernel takes the layer, else why not ---------------------------------
def _int4_group(w: PackedWeights) -> str | None:
    if w.group is None:
        return f"int4 kernels need a group in {list(INT4_KERNEL_GROUPS)} dividing K={w.in_features}"
    return None


def _triton_fits(w: PackedWeights) -> str | None:
    from qtrain.quant import cuda as qcuda

    return qcuda.why_unavailable(torch.device("cuda"))


def _triton_int4_fits(w: PackedWeights) -> str | None:
    return _int4_group(w) or _triton_fits(w)


def _int8_cpu_fits(w: PackedWeights) -> str | None:
    return None if w.in_features % 8 == 0 else f"_weight_int8pack_mm needs K % 8 == 0, K={w.in_features}"


def _native_int8_fits(w: PackedWeights) -> str | None:
    return _int8_cpu_fits(w) or (None if native.int8_supported(w.in_features) else "native int8 needs K % 32 == 0")


def _native_int4_fits(w: PackedWeights) -> str | None:
    ok = native.int4_supported(w.in_features, w.own_group)
    return _int4_group(w) or (None if ok else "native int4 needs a group that is a multiple of 32")


def _int_mm_fits(w: PackedWeights) -> str | None:
    return None if w.in_features % 8 == 0 and w.out_features % 8 == 0 else "torch._int_mm needs K, N % 8 == 0"


def _tinygemm_fits(w: PackedWeights) -> str | None:
    if _int4_group(w):
        return _int4_group(w)
    if tinygemm_tiles(w.in_features) is None or w.out_features % 8 != 0:
        n, k = w.out_features, w.in_features
        return f"tinygemm needs N % 8 == 0 and K % 32 == 0 (N={n}, K={k}); dequantize + matmul only"
    return None


# CUDA rows with several candidates, measured on a layer's first call (qtrain.quant.cuda.select)
_INT8_DECODE = (("triton_gemv", triton_gemv_cuda, _triton_fits), ("compiled_gemv", int8_gemv_cuda, lambda w: None))
_INT4_DECODE = (("triton_gemv", triton_gemv_cuda, _triton_int4_fits), ("tinygemm", tinygemm_cuda, _tinygemm_fits))
_INT8_PREFILL = (("triton_gemm", triton_gemm_cuda, _triton_fits), ("triton_dequant", triton_dequant_cuda, _triton_fits))
_INT4_PREFILL = (
    ("triton_gemm", triton_gemm_cuda, _triton_int4_fits),
    ("triton_dequant", triton_dequant_cuda, _triton_int4_fits),
)

TABLE: tuple[Kernel, ...] = (
    Kernel("native", "cpu", 8, (1, NATIVE_MAX_ROWS), None, _native_int8_fits, native_int8, _use_native),
    Kernel("torch", "cpu", 8, (1, CPU_KERNEL_MAX_ROWS), None, _int8_cpu_fits, aten_int8_cpu),
    Kernel("native", "cpu", 4, (1, NATIVE_MAX_ROWS), None, _native_int4_fits, native_int4, _use_native),
    Kernel("torch", "cpu", 4, (1, CPU_KERNEL_MAX_ROWS), None, _int4_group, aten_int4_cpu),
    Kernel("int_mm", "cuda", 8, (GEMV_MAX_ROWS + 1, ANY_ROWS), True, _int_mm_fits, int_mm_cuda),
    Kernel("decode", "cuda", 8, (1, DECODE_MAX_ROWS), None, any_fits(_INT8_DECODE), measured("decode", _INT8_DECODE)),
    Kernel("gemv", "cuda", 8, (1, GEMV_MAX_ROWS), None, lambda w: None, int8_gemv_cuda),
    Kernel("prefill", "cuda", 8, (1, ANY_ROWS), None, _triton_fits, measured("prefill", _INT8_PREFILL, True)),
    Kernel("dequant_bf16", "cuda", 8, (1, ANY_ROWS), None, lambda w: None, dequant_bf16),
    Kernel("decode", "cuda", 4, (1, DECODE_MAX_ROWS), None, any_fits(_INT4_DECODE), measured("decode", _INT4_DECODE)),
    Kernel("tinygemm", "cuda", 4, (1, CUDA_TINYGEMM_MAX_ROWS), None, _tinygemm_fits, tinygemm_cuda),
    Kernel("prefill", "cuda", 4, (1, ANY_ROWS), None, _triton_int4_fits, measured("prefill", _INT4_PREFILL, True)),
    Kernel("dequant_bf16", "cuda", 4, (1, ANY_ROWS), None, _int4_group, dequant_bf16),
)
"""Every fast kernel, in order of preference (see the module docstring)."""


class Plan:
    """The kernels one layer may run on one device, built lazily; call it like a :data:`FastPath`."""

    def __init__(self, weights: PackedWeights, rows: list[Kernel], kernel: str) -> None:
        self.weights, self.rows, self.kernel = weights, rows, kernel
        self._fns: dict[int, FastPath] = {}
        self._use: dict[int, bool] = {}

    def __call__(self, x2: Tensor) -> Tensor | None:
        m = x2.shape[0]
        for i, row in enumerate(self.rows):
            if not row.rows[0] <= m <= row.rows[1]:
                continue
            if i not in self._use:
                self._use[i] = row.use(self.kernel, row.bits)
            if not self._use[i]:
                continue
            if i not in self._fns:
                self._fns[i] = row.build(self.weights)
            y = self._fns[i](x2)
            if y is not None:
                return y
        return None


def plan(weights: PackedWeights, device: torch.device, kernel: str, note: Callable[[str], None]) -> Plan | None:
    """The :class:`Plan` of a layer on ``device``, or None when no kernel takes it (``note`` says why).

    Args:
        weights: the layer's canonical buffers.
        device: where the call runs.
        kernel: the layer's ``quant.kernel``.
        note: receives why no kernel takes the layer (debug logging).
    """
    rows, why = [], []
    for row in TABLE:
        if row.device != device.type or row.bits != weights.bits:
            continue
        if row.act_int8 is not None and row.act_int8 != weights.act_int8:
            continue
        reason = row.fits(weights)
        if reason is None:
            rows.append(row)
        elif reason not in why:
            why.append(reason)
    if not rows:
        note("; ".join(why) or f"no fast path on {device.type}")
        return None
    return Plan(weights, rows, kernel)
