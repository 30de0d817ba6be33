"""Pick between kernels that compute the same thing by measuring them on the first call.

The CUDA rows of :mod:`qtrain.quant.kernels` have more than one candidate where no single
kernel wins everywhere (decode: Triton GEMV or tinygemm; prefill: Triton dequantize-in-GEMM
or Triton dequantize + cuBLAS); which one is faster depends on the GPU, the layer shape and
the host's launch overhead. :class:`Measured` times every candidate on the layer's first call
(back to back, device-synchronised: host and device time together, what an eager forward
pays), keeps the fastest and frees the others; the choice is remembered per shape key
(:data:`CHOICES`), so each distinct layer shape is measured once per process and later
layers of that shape build only the winner.

No measurement while a CUDA graph is being captured or ``torch.compile`` traces (the first
candidate that runs is used then, without remembering it).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

FastPath = Callable[[Tensor], Tensor | None]
CHOICES: dict[Hashable, str] = {}
"""Shape key -> the candidate measured fastest (this process)."""
TIMINGS: dict[Hashable, dict[str, float]] = {}
"""Shape key -> microseconds per call of each candidate (what :data:`CHOICES` is based on)."""
REPS = 10


def _quiet(device: torch.device) -> bool:
    """Whether timing calls is allowed now (no capture, no tracing)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def time_call(fn: Callable[[], object], device: torch.device, reps: int = REPS) -> float:
    """Microseconds per call of ``fn``, ``reps`` calls back to back after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    fn()
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps * 1e6


class Measured:
    """A :data:`FastPath` that runs the fastest of its candidates (see the module docstring).

    Args:
        key: the shape key (layer shape, bits, group, row bucket...).
        builders: ``name -> build()`` of each candidate, in order of preference (the first
            that runs is used when nothing can be measured). A candidate returning None or
            raising is out.

    Attributes:
        chosen: the name of the candidate in use (None before the first call).
    """

    def __init__(self, key: Hashable, builders: dict[str, Callable[[], FastPath]]) -> None:
        self.key = key
        self.chosen: str | None = None
        self._measured = False
        self._builders = builders
        self._fns: dict[str, FastPath] = {}
        known = CHOICES.get(key)
        if known in builders:
            self._builders = {known: builders[known]}

    def _fn(self, name: str) -> FastPath | None:
        if name not in self._fns:
            try:
                self._fns[name] = self._builders[name]()
            except Exception as err:  # noqa: BLE001 - a candidate that cannot be built is out
                log.info("kernel %s unavailable for %s: %s", name, self.key, str(err).splitlines()[0][:200])
                self._builders = {k: v for k, v in self._builders.items() if k != name}
                return None
        return self._fns[name]

    def _run(self, name: str, x2: Tensor) -> Tensor | None:
        fn = self._fn(name)
        if fn is None:
            return None
        try:
            return fn(x2)
        except Exception as err:  # noqa: BLE001 - e.g. a kernel that does not compile here: the next one
            log.warning("kernel %s failed for %s (%s)", name, self.key, str(err).splitlines()[0][:200])
            self._builders = {k: v for k, v in self._builders.items() if k != name}
            self._fns.pop(name, None)
            return None

    def _measure(self, x2: Tensor) -> None:
        """Time every candidate on ``x2``; keep the fastest (remembered under ``key``)."""
        self._measured = True
        times: dict[str, float] = {}
        for name in list(self._builders):
            if self._run(name, x2) is None:  # also the first warm-up (compiles, autotunes)
                continue
            times[name] = time_call(functools.partial(self._run, name, x2), x2.device)
        if times:
            best = min(times, key=times.__getitem__)
            CHOICES[self.key], TIMINGS[self.key] = best, times
            self._builders = {best: self._builders[best]}
            self._fns = {best: self._fns[best]}
            log.info("kernel for %s: %s (%s us)", self.key, best, {k: round(v, 1) for k, v in times.items()})

    def __call__(self, x2: Tensor) -> Tensor | None:
        if not self._measured and len(self._builders) > 1 and _quiet(x2.device):
            self._measure(x2)
        for name in list(self._builders):
            y = self._run(name, x2)
            if y is not None:
                self.chosen = name
                return y
        return None


def row_bucket(m: int) -> int:
    """Power of two >= m: calls whose row counts share a bucket share a measurement."""
    return 1 << max(m - 1, 0).bit_length()


class PerBucket:
    """One :class:`Measured` per row bucket (:func:`row_bucket`), for candidates whose order
    changes with the row count (prefill: a fused GEMM wins at tens of rows, dequantize +
    cuBLAS may win at thousands). Building a candidate must be cheap (no weight copy).

    Args:
        key: the shape key (the bucket is appended).
        builders: as for :class:`Measured`.
    """

    def __init__(self, key: tuple[Hashable, ...], builders: dict[str, Callable[[], FastPath]]) -> None:
        self.key, self._builders = key, builders
        self.by_bucket: dict[int, Measured] = {}

    @property
    def chosen(self) -> str | None:
        """The candidates in use, ``+``-joined (None before the first call)."""
        names = sorted({m.chosen for m in self.by_bucket.values() if m.chosen})
        return "+".join(names) or None

    def __call__(self, x2: Tensor) -> Tensor | None:
        b = row_bucket(x2.shape[0])
        if b not in self.by_bucket:
            self.by_bucket[b] = Measured((*self.key, b), self._builders)
        return self.by_bucket[b](x2)
