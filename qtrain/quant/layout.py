"""Quantization metadata of a model, and empty packed models built from it (checkpoint loading).

:func:`layer_specs` is what the checkpoint manifest stores per layer;
:func:`build_packed_skeleton` turns a freshly built full-precision model back into the
packed model those specs describe, ready for ``load_state_dict``.

Biases are not part of the per-layer specs: a quantized linear has one exactly when the
full-precision module it replaces has one (decided by the model config, e.g. ``attn_bias``
for Qwen2's ``qkv``), and the skeleton copies that. The bias is stored, full precision, as
``<layer>.bias`` in the state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from qtrain.quant.fake import FakeQuantEmbedding, FakeQuantLinear
from qtrain.quant.kernels import check_kernel
from qtrain.quant.packed import PackedLinear, QuantEmbedding
from qtrain.quant.schemes import packed_class
from qtrain.quant.spec import LayerSpec
from qtrain.quant.targets import embedding_modules, layer_shape, linear_bias, set_module


# -- metadata, skeletons, kernels -------------------------------------------------------------
def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-layer quantization metadata for the checkpoint manifest.

    Args:
        model: a prepared or converted model.

    Returns:
        ``{name: {scheme, bits, group_size, symmetric, activations, kind, in_features,
        out_features, tied_to}}`` with ``kind`` ``"linear"`` or ``"embedding"``; JSON-able.
    """
    out: dict[str, dict[str, Any]] = {}
    skip = embedding_modules(model)
    for name, m in model.named_modules():
        if isinstance(m, (FakeQuantEmbedding, QuantEmbedding)):
            t = m.get_table()
            out[name] = {
                **t.spec.to_dict(),
                "kind": "embedding",
                "in_features": t.in_features,
                "out_features": t.out_features,
                "tied_to": m.tied_to,
            }
        elif isinstance(m, (FakeQuantLinear, PackedLinear)) and not any(name.startswith(s + ".") for s in skip):
            out[name] = {
                **m.spec.to_dict(),
                "kind": "linear",
                "in_features": m.in_features,
                "out_features": m.out_features,
                "tied_to": None,
            }
    return out


def build_packed_skeleton(model: nn.Module, specs: Mapping[str, Mapping[str, Any]], kernel: str = "auto") -> nn.Module:
    """Swap in empty packed modules described by :func:`layer_specs` output (in place).

    Afterwards ``model.load_state_dict(state, strict=True)`` loads a converted checkpoint
    (use ``assign=True`` when the model was built on the meta device).

    Args:
        model: a freshly built full-precision model of the checkpoint's shape.
        specs: per-layer metadata from the manifest.
        kernel: ``"auto"`` or ``"reference"``.

    Returns:
        The same model object.

    Raises:
        ValueError: unknown layer name, shape mismatch, bad spec, or a tie to a non-packed module.
    """
    check_kernel(kernel)
    order = sorted(specs, key=lambda n: specs[n].get("kind", "linear") == "embedding")
    for name in order:
        meta = specs[name]
        spec = LayerSpec.from_dict(dict(meta))
        try:
            mod = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{name}: layer in the checkpoint's quantization specs is not in the model") from e
        new = _skeleton_module(model, name, mod, spec, meta, kernel)
        set_module(model, name, new)
    return model


def _skeleton_module(
    model: nn.Module, name: str, mod: nn.Module, spec: LayerSpec, meta: Mapping[str, Any], kernel: str
) -> nn.Module:
    weight = getattr(mod, "weight", None)
    device = weight.device if isinstance(weight, Tensor) else None
    if meta.get("kind", "linear") == "embedding":
        if meta.get("tied_to"):
            table = model.get_submodule(str(meta["tied_to"]))
            if not isinstance(table, PackedLinear):
                raise ValueError(f"{name}: tied to {meta['tied_to']!r}, which is not a packed layer")
            return QuantEmbedding(table, tied_to=str(meta["tied_to"]), name=name)
        k, n = _shape(mod, meta, name)
        return QuantEmbedding(packed_class(spec).empty(k, n, spec, kernel, name, device=device), None, name)
    k, n = _shape(mod, meta, name)
    packed = packed_class(spec).empty(k, n, spec, kernel, name, device=device)
    packed.set_bias(linear_bias(mod))  # the model's own (e.g. Qwen2's qkv): same shape, dtype and device
    return packed


def _shape(mod: nn.Module, meta: Mapping[str, Any], name: str) -> tuple[int, int]:
    """(K, N) of a layer, checked against the manifest when both are known."""
    k, n = layer_shape(mod)
    mk, mn = meta.get("in_features", k), meta.get("out_features", n)
    if (mk, mn) != (k, n):
        raise ValueError(f"{name}: checkpoint layer is {mk}->{mn} but the model's is {k}->{n}")
    return k, n


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Select ``"auto"`` or ``"reference"`` kernels on every packed module (in place).

    Raises:
        ValueError: unknown kernel name.
    """
    check_kernel(kernel)
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.kernel = kernel
    return model
