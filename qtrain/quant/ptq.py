"""Post-training quantization: the method registry and the entry points.

:data:`METHODS` holds every method (``ptq.method``): whether it needs calibration batches,
how it quantizes the linear targets and, optionally, an untied embedding table (otherwise
``convert`` rounds what is left to nearest). All produce the same packed modules as
:func:`qtrain.quant.transforms.convert`, storing exactly the scales the codes were computed with.

- ``rtn`` and ``mse``: one weight at a time (:mod:`qtrain.quant.weight_methods`).
- ``gptq``: :mod:`qtrain.quant.gptq`, with calibration batches.

A new method is a row here and its function (in its own module when it is long).

Example:
    >>> calib = [torch.randint(0, 256, (8, 128)) for _ in range(4)]
    >>> model = quantize_ptq(model, QuantConfig(scheme="int4"), "gptq", calib)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qtrain.config import QuantConfig
from qtrain.progress import phase
from qtrain.quant import gptq
from qtrain.quant.gptq import GPTQ_BLOCK, HessianHook, gptq_quantize
from qtrain.quant.packed import PackedLinear, QuantEmbedding
from qtrain.quant.schemes import EMBEDDING, embedding_spec, packed_class, spec_from_config
from qtrain.quant.spec import LayerSpec, QuantizedWeight, table_row
from qtrain.quant.targets import check_layers, is_tied, set_module, target_layers
from qtrain.quant.transforms import convert, float_weight, swap_packed
from qtrain.quant.weight_methods import MSE_MAX_SHRINK, mse_qparams, mse_quantize, rtn_quantize

__all__ = [  # the per-weight and GPTQ functions are re-exported: ptq is where callers look for methods
    "GPTQ_BLOCK",
    "METHODS",
    "MSE_MAX_SHRINK",
    "HessianHook",
    "PTQMethod",
    "gptq_quantize",
    "init_scales",
    "mse_qparams",
    "mse_quantize",
    "quantize_ptq",
    "rtn_quantize",
]


@dataclass(frozen=True)
class LayerJob:
    """What a method's ``layers`` function quantizes, and with which settings.

    Attributes:
        model: the model, quantized in place.
        names: its linear targets (may include the embedding, which ``layers`` leaves to ``table``).
        spec: the layer spec of the scheme.
        calib: token-id calibration batches (empty for methods that need none).
        damp: GPTQ dampening.
        grid: MSE search candidates (also GPTQ's group ranges).
        kernel: ``quant.kernel`` of the packed modules.
        act_order: GPTQ's column order (ignored by the other methods).
    """

    model: nn.Module
    names: list[str]
    spec: LayerSpec
    calib: Sequence[Tensor]
    damp: float
    grid: int
    kernel: str
    act_order: bool = True

    @property
    def linears(self) -> list[str]:
        """The targets other than the embedding table."""
        return [n for n in self.names if n != EMBEDDING]


LayersFn = Callable[[LayerJob], None]
"""Quantize a job's linear targets in place."""


@dataclass(frozen=True)
class PTQMethod:
    """One entry of :data:`METHODS`.

    Attributes:
        name: the ``ptq.method`` value.
        needs_calibration: whether it needs calibration batches (``ptq.calib_batches``).
        description: one line for people.
        layers: quantizes the linear targets it handles (the rest: round to nearest by convert).
        table: codes of an untied embedding table ``(weight, spec, grid)``, or None (round to nearest).
    """

    name: str
    needs_calibration: bool
    description: str
    layers: LayersFn
    table: Callable[[Tensor, LayerSpec, int], QuantizedWeight] | None = None


def _rtn_layers(job: LayerJob) -> None:
    """Round to nearest: convert does it."""


def _mse_layers(job: LayerJob) -> None:
    with phase("MSE scale search", total=len(job.linears), unit="layers") as bar:
        for name in job.linears:
            weight = mse_quantize(float_weight(job.model, name), job.spec, job.grid)
            swap_packed(job.model, name, weight, job.spec, job.kernel)
            bar.advance()


def _gptq_layers(job: LayerJob) -> None:
    gptq.quantize_layers(job.model, job.linears, job.spec, job.calib, job.damp, job.kernel, job.grid, job.act_order)


METHODS: dict[str, PTQMethod] = {
    "rtn": PTQMethod("rtn", False, "round to nearest with max-abs (or min/max) scales", _rtn_layers),
    "mse": PTQMethod(
        "mse", False, "per-group clipping search minimising the weights' squared error", _mse_layers, mse_quantize
    ),
    "gptq": PTQMethod("gptq", True, "GPTQ: column-wise rounding with Hessian error compensation", _gptq_layers),
}
"""The PTQ methods by name; mode code asks ``METHODS[name].needs_calibration``."""


def get_method(method: str) -> PTQMethod:
    """The :data:`METHODS` entry of ``method``.

    Raises:
        ValueError: unknown method (lists the valid ones).
    """
    return table_row(METHODS, method, "ptq.method")


def quantize_ptq(
    model: nn.Module,
    qcfg: QuantConfig,
    method: str = "rtn",
    calib: Sequence[Tensor] | None = None,
    damp: float = 0.01,
    grid: int = 100,
    act_order: bool = True,
) -> nn.Module:
    """Post-training quantize a full-precision model into packed modules (in place).

    Args:
        model: full-precision model (eval mode recommended).
        qcfg: the quant config (scheme, targets, kernel).
        method: ``rtn``, ``mse`` or ``gptq``.
        calib: token-id batches ``(B, T)`` on the model's device (required for ``gptq``).
        damp: GPTQ dampening (fraction of the mean Hessian diagonal).
        grid: MSE search candidates.
        act_order: GPTQ in order of decreasing Hessian diagonal with static groups.

    Returns:
        The same model object, converted.

    Raises:
        ValueError: unknown method, missing calibration data for gptq, or an invalid config.

    Example:
        >>> model = quantize_ptq(model, QuantConfig(scheme="int8"), "mse")
    """
    entry = get_method(method)
    spec = spec_from_config(qcfg)
    names = check_layers(model, qcfg)
    assert spec is not None
    if entry.needs_calibration and not calib:
        raise ValueError(f"ptq.method={method} needs calibration batches (ptq.calib_batches > 0)")
    with torch.no_grad():
        entry.layers(LayerJob(model, names, spec, calib or [], damp, grid, qcfg.kernel, act_order))
    return _finish_embedding(model, qcfg, entry, grid)


def _finish_embedding(model: nn.Module, qcfg: QuantConfig, entry: PTQMethod, grid: int) -> nn.Module:
    """Convert what is left (an untied embedding table with the method's own codes, the rest to nearest)."""
    if entry.table is not None and EMBEDDING in target_layers(model, qcfg) and not is_tied(model):
        spec = spec_from_config(qcfg)
        assert spec is not None
        espec = embedding_spec(spec)
        table = entry.table(float_weight(model, EMBEDDING), espec, grid)
        cls = packed_class(espec)
        mod = cls.from_codes(table.codes, table.scales, table.zeros, espec, qcfg.kernel, EMBEDDING)
        set_module(model, EMBEDDING, QuantEmbedding(mod, None, EMBEDDING))
    return convert(model, qcfg)


def init_scales(
    model: nn.Module, qcfg: QuantConfig, method: str = "rtn", calib: Sequence[Tensor] | None = None, **opts: Any
) -> dict[str, QuantizedWeight]:
    """PTQ-initialised ``(codes, scales, zeros)`` per target layer, model left untouched.

    Feed the result to ``prepare(model, qcfg, learn_scales=..., init=...)`` so QAT starts from
    ``mse``/``gptq`` scales. The fake-quant forward then rounds the *current* weights with
    those scales; to start from GPTQ's exact codes instead, use
    ``to_fake(quantize_ptq(model, qcfg, "gptq", calib))``.

    Arguments as :func:`quantize_ptq` (``opts``: ``damp``, ``grid``); the model itself is left untouched.

    Returns:
        ``{layer name: QuantizedWeight}`` (an untied embedding under ``tok_emb``).

    Raises:
        ValueError: as :func:`quantize_ptq`.
    """
    get_method(method)
    work = copy.deepcopy(model)
    quantize_ptq(work, qcfg, method, calib, **opts)
    out: dict[str, QuantizedWeight] = {}
    for name, m in work.named_modules():
        if isinstance(m, QuantEmbedding):
            if m.tied_to is None:
                out[name] = m.get_table().quantized()
        elif isinstance(m, PackedLinear) and not name.startswith(EMBEDDING + "."):
            out[name] = m.quantized()
    return out
