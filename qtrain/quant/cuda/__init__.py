"""GPU kernels for packed layers (Triton), importable without Triton or CUDA.

Plain functions over the canonical packed buffers of :mod:`qtrain.quant.packed` (no
repacking), each with an optional bias added after the product:

- :func:`int4_gemv` / :func:`int8_gemv` -- decode (1..8 rows): one kernel reading the packed
  weight once, many programs (:mod:`qtrain.quant.cuda.gemv`).
- :func:`int4_gemm` / :func:`int8_gemm` -- dequantize-in-GEMM for many rows (prefill): the
  weight dequantized to bf16 in registers tile by tile, tensor-core dots, float32 accumulation.
- :func:`dequant_int4` / :func:`dequant_int8` -- the whole bf16 ``[N, K]`` weight in one
  memory-bound kernel, bit-exact to the reference dequantization (then cuBLAS).

:mod:`qtrain.quant.cuda.table` builds the kernel table's CUDA rows from them;
:mod:`qtrain.quant.cuda.select` picks between candidates by measuring them on a layer's first
call; :mod:`qtrain.quant.cuda.ops` registers them as ``torch.ops.qtrain.*`` custom ops for
compiled graphs (:mod:`qtrain.quant.cuda.linear`, FastDecoder); :mod:`qtrain.quant.cuda.bench`
times every candidate side by side (``scripts/gpu_check.py``).

They run where :func:`available` says so: CUDA tensors with Triton installed, or CPU tensors
under ``TRITON_INTERPRET=1`` (the unit tests' way of checking them without a GPU).
"""

from __future__ import annotations

from qtrain.quant.cuda.gemv import int4_gemv, int8_gemv
from qtrain.quant.cuda.kernels import available, dequant_int4, dequant_int8, int4_gemm, int8_gemm, why_unavailable

__all__ = [
    "available",
    "dequant_int4",
    "dequant_int8",
    "int4_gemm",
    "int4_gemv",
    "int8_gemm",
    "int8_gemv",
    "why_unavailable",
]
