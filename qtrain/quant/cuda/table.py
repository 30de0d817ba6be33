"""Builders of the Triton rows of :data:`qtrain.quant.kernels.TABLE` (CUDA).

Each builder takes a layer's :class:`~qtrain.quant.kernel_ops.PackedWeights` and returns its
fast path ``(M, K) -> (M, N)`` (or None: the next row). :func:`measured` combines several
builders into one row that measures them on the first call (:mod:`qtrain.quant.cuda.select`).
Triton is imported at the first launch only; this module imports without it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from torch import Tensor

from qtrain.quant.cuda import gemv as G
from qtrain.quant.cuda import kernels as K
from qtrain.quant.cuda.select import Measured, PerBucket
from qtrain.quant.kernel_ops import PackedWeights, activations

log = logging.getLogger(__name__)

FastPath = Callable[[Tensor], Tensor | None]
Builder = Callable[[PackedWeights], FastPath]
Fits = Callable[[PackedWeights], str | None]


def _guarded(name: str, fn: Callable[[Tensor], Tensor]) -> FastPath:
    """``fn``, returning None from the first failure on (e.g. Triton cannot compile here)."""
    failed: list[str] = []

    def run(x2: Tensor) -> Tensor | None:
        if failed:
            return None
        try:
            return fn(x2)
        except Exception as err:  # noqa: BLE001 - the next row from now on
            failed.append(str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
            log.warning("Triton %s failed (%s); using the next kernel", name, failed[0])
            return None

    return run


def triton_gemv_cuda(w: PackedWeights) -> FastPath:
    """Triton decode GEMV (:mod:`qtrain.quant.cuda.gemv`) on the canonical buffers, 1..8 rows."""

    def run(x2: Tensor) -> Tensor:
        xq = activations(x2, w)
        if w.bits == 8:
            return G.int8_gemv(xq, w.data, w.scales).to(x2.dtype)
        return G.int4_gemv(xq, w.data, w.scales, w.zeros, w.group_size).to(x2.dtype)

    return _guarded("GEMV", run)


def triton_gemm_cuda(w: PackedWeights) -> FastPath:
    """Triton dequantize-in-GEMM (prefill) on the canonical buffers."""

    def run(x2: Tensor) -> Tensor:
        xq = activations(x2, w)
        if w.bits == 8:
            return K.int8_gemm(xq, w.data, w.scales).to(x2.dtype)
        return K.int4_gemm(xq, w.data, w.scales, w.zeros, w.group_size).to(x2.dtype)

    return _guarded("GEMM", run)


def shape_key(kind: str, w: PackedWeights) -> tuple[object, ...]:
    """What a measurement depends on: the row kind and the layer's shape and format."""
    return ("cuda", kind, w.bits, w.out_features, w.in_features, w.group_size, w.zeros is not None, w.act_int8)


def any_fits(candidates: tuple[tuple[str, Builder, Fits], ...]) -> Fits:
    """``fits`` of a :func:`measured` row: None when at least one candidate takes the layer."""

    def fits(w: PackedWeights) -> str | None:
        why = [r for _, _, f in candidates if (r := f(w)) is not None]
        return None if len(why) < len(candidates) else "; ".join(why)

    return fits


def measured(kind: str, candidates: tuple[tuple[str, Builder, Fits], ...], per_bucket: bool = False) -> Builder:
    """One table row running the fastest of ``candidates`` (``(name, build, fits)``, in order of
    preference), measured on the layer's first call; ``per_bucket``: measured again per row
    bucket (cheap builders only: no weight copies). The returned path has ``chosen``."""

    def build(w: PackedWeights) -> FastPath:
        builders: dict[str, Callable[[], FastPath]] = {
            name: functools.partial(b, w) for name, b, fits in candidates if fits(w) is None
        }
        key = shape_key(kind, w)
        return PerBucket(key, builders) if per_bucket else Measured(key, builders)

    return build
