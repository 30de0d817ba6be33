"""GPU kernels for packed layers (Triton), importable without Triton or CUDA.

Plain functions over the canonical packed buffers of :mod:`qtrain.quant.packed` (no
repacking), for the kernel table to register:

- :func:`int4_gemm` -- dequantize-in-GEMM for many rows (prefill, evaluation, large batches):
  ``x bf16 [M, K]``, ``packed uint8 [N, K/2]``, ``scales bf16 [N, G]``, ``zeros uint8 [N, G]``
  or None (implicit 8) -> ``bf16 [M, N]``.
- :func:`int8_gemm` -- int8 weight-only dequantize-in-GEMM for many rows:
  ``x bf16 [M, K]``, ``w int8 [N, K]``, ``scales [N, 1]`` -> ``bf16 [M, N]``.
- :func:`dequant_int4` / :func:`dequant_int8` -- the whole bf16 ``[N, K]`` weight in one
  memory-bound kernel, bit-exact to the reference dequantization; followed by cuBLAS this is
  the many-row path of the CUDA packed layers (the dequantize-in-GEMM kernels measured 2x
  slower than it on an H200 at 512 rows).

Both run where :func:`available` says so: CUDA tensors with Triton installed, or CPU tensors
under ``TRITON_INTERPRET=1`` (the unit tests' way of checking them without a GPU).
"""

from __future__ import annotations

from qtrain.quant.cuda.kernels import available, dequant_int4, dequant_int8, int4_gemm, int8_gemm, why_unavailable

__all__ = ["available", "dequant_int4", "dequant_int8", "int4_gemm", "int8_gemm", "why_unavailable"]
