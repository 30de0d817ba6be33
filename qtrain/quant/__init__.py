"""Quantization: int8 / int4 weights (optionally int8 dynamic activations) for qtrain models.

Modules: :mod:`~qtrain.quant.primitives` (pure tensor math), :mod:`~qtrain.quant.fake`
(QAT modules), :mod:`~qtrain.quant.packed` (packed modules and kernels),
:mod:`~qtrain.quant.ptq` (rtn / mse / gptq) and :mod:`~qtrain.quant.api` (entry points).

Example:
    >>> from qtrain.quant import Quantizer
    >>> q = Quantizer(QuantConfig(scheme="int4", group_size=32))
    >>> model = q.convert(q.prepare(model))
"""

from qtrain.quant.api import (
    SCHEMES,
    Quantizer,
    Scheme,
    build_packed_skeleton,
    convert,
    fake_quant_modules,
    freeze_scales,
    get_scheme,
    is_tied,
    keep_full_precision,
    layer_specs,
    prepare,
    register_weight_hook,
    scale_parameters,
    set_fake_quant,
    set_kernel,
    spec_from_config,
    target_layers,
    to_fake,
)
from qtrain.quant.fake import FakeQuantEmbedding, FakeQuantLinear
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear, QuantEmbedding
from qtrain.quant.primitives import LayerSpec, QuantizedWeight
from qtrain.quant.ptq import init_scales, quantize_ptq

__all__ = [
    "SCHEMES",
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "Int4Linear",
    "Int8Linear",
    "LayerSpec",
    "PackedLinear",
    "QuantEmbedding",
    "QuantizedWeight",
    "Quantizer",
    "Scheme",
    "build_packed_skeleton",
    "convert",
    "fake_quant_modules",
    "freeze_scales",
    "get_scheme",
    "init_scales",
    "is_tied",
    "keep_full_precision",
    "layer_specs",
    "prepare",
    "quantize_ptq",
    "register_weight_hook",
    "scale_parameters",
    "set_fake_quant",
    "set_kernel",
    "spec_from_config",
    "target_layers",
    "to_fake",
]
