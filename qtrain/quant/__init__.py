"""Quantization: int8 / int4 weights (optionally int8 dynamic activations) for qtrain models.

:class:`QuantRecipe` (:mod:`~qtrain.quant.recipe`) is the entry point: everything one quant
config or one checkpoint's ``quant`` section means (validation, prepare / convert / to-fake,
PTQ, the manifest section, labels, comparison). Below it, each module owns one thing:

- :mod:`~qtrain.quant.spec`: bit widths (code ranges, implicit zero points) and ``LayerSpec``;
- :mod:`~qtrain.quant.primitives`: the tensor math, with the one rounding rule ``round_clamp``;
- :mod:`~qtrain.quant.schemes`: the scheme table (``quant=``), its rules and labels;
- :mod:`~qtrain.quant.autograd`, :mod:`~qtrain.quant.fake`: fake-quant (QAT) modules;
- :mod:`~qtrain.quant.packed`: packed modules; :mod:`~qtrain.quant.kernels`: the one kernel
  table (:mod:`~qtrain.quant.kernel_ops` its callables, :mod:`~qtrain.quant.native` qtrain's
  C kernels, :mod:`~qtrain.quant.autotune` the per-machine choice);
- :mod:`~qtrain.quant.targets`: which layers are quantized; :mod:`~qtrain.quant.transforms`:
  prepare / convert / to_fake; :mod:`~qtrain.quant.qat`: QAT schedule helpers;
  :mod:`~qtrain.quant.layout`: manifest layer specs and packed skeletons;
- :mod:`~qtrain.quant.ptq` (registry, rtn, mse) and :mod:`~qtrain.quant.gptq`;
- :mod:`~qtrain.quant.hooks`: user experiment hooks.

Example:
    >>> from qtrain.quant import QuantRecipe
    >>> recipe = QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=32))
    >>> model = recipe.convert(recipe.prepare(model))
"""

from qtrain.quant.fake import FakeQuantEmbedding, FakeQuantLinear
from qtrain.quant.layout import build_packed_skeleton, layer_specs, set_kernel
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear, QuantEmbedding
from qtrain.quant.ptq import init_scales, quantize_ptq
from qtrain.quant.qat import fake_quant_modules, freeze_scales, register_weight_hook, scale_parameters, set_fake_quant
from qtrain.quant.recipe import QuantRecipe
from qtrain.quant.schemes import SCHEMES, Scheme, get_scheme, spec_from_config
from qtrain.quant.spec import LayerSpec, QuantizedWeight
from qtrain.quant.targets import is_tied, keep_full_precision, target_layers
from qtrain.quant.transforms import convert, prepare, to_fake

__all__ = [
    "SCHEMES",
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "Int4Linear",
    "Int8Linear",
    "LayerSpec",
    "PackedLinear",
    "QuantEmbedding",
    "QuantRecipe",
    "QuantizedWeight",
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
