"""The Triton GEMV/GEMM kernels as PyTorch custom ops (``torch.ops.qtrain.*``), for compiled graphs.

``torch.compile(fullgraph=True)`` and CUDA-graph capture treat a custom op as one opaque call
with a known output shape (no graph break, no tracing into the launcher): that is how
:mod:`qtrain.fastdecode`'s compiled decode step runs them. Eager callers (the kernel table)
call :mod:`qtrain.quant.cuda.gemv` / :mod:`qtrain.quant.cuda.kernels` directly (no dispatcher
overhead). Registered on import of this module (importing it does not import Triton).

Ops (all return bf16 ``[..., N]``; ``zeros`` / ``bias`` optional):

- ``qtrain::int4_gemv(x, packed, scales, zeros, group_size, bias)`` and ``qtrain::int4_gemm(...)``
- ``qtrain::int8_gemv(x, w, scales, bias)`` and ``qtrain::int8_gemm(...)``
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtrain.quant.cuda import gemv as _gemv
from qtrain.quant.cuda import kernels as _k

_INT4 = "(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int group_size, Tensor? bias) -> Tensor"
_INT8 = "(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor"


def _out(x: Tensor, n: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n), dtype=torch.bfloat16)


@torch.library.custom_op("qtrain::int4_gemv", mutates_args=(), schema=_INT4)
def int4_gemv(
    x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None
) -> Tensor:
    """:func:`qtrain.quant.cuda.gemv.int4_gemv` as an op."""
    return _gemv.int4_gemv(x, packed, scales, zeros, group_size, bias)


@torch.library.custom_op("qtrain::int4_gemm", mutates_args=(), schema=_INT4)
def int4_gemm(
    x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None
) -> Tensor:
    """:func:`qtrain.quant.cuda.kernels.int4_gemm` as an op."""
    return _k.int4_gemm(x, packed, scales, zeros, group_size, bias)


@torch.library.custom_op("qtrain::int8_gemv", mutates_args=(), schema=_INT8)
def int8_gemv(x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`qtrain.quant.cuda.gemv.int8_gemv` as an op."""
    return _gemv.int8_gemv(x, w, scales, bias)


@torch.library.custom_op("qtrain::int8_gemm", mutates_args=(), schema=_INT8)
def int8_gemm(x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`qtrain.quant.cuda.kernels.int8_gemm` as an op."""
    return _k.int8_gemm(x, w, scales, bias)


@int4_gemv.register_fake
def _int4_gemv_fake(
    x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None
) -> Tensor:
    return _out(x, packed.shape[0])


@int4_gemm.register_fake
def _int4_gemm_fake(
    x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None
) -> Tensor:
    return _out(x, packed.shape[0])


@int8_gemv.register_fake
def _int8_gemv_fake(x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    return _out(x, w.shape[0])


@int8_gemm.register_fake
def _int8_gemm_fake(x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    return _out(x, w.shape[0])
