"""Model transforms: prepare (full precision -> fake-quant), convert (-> packed), to_fake (packed -> fake).

Quantization is a module swap driven by one :class:`~qtrain.config.QuantConfig`:
``prepare`` swaps ``nn.Linear`` for :class:`FakeQuantLinear` (QAT), ``convert`` swaps
``nn.Linear`` or ``FakeQuantLinear`` for the packed :class:`Int8Linear`/:class:`Int4Linear`.

Which layers (:func:`target_layers`): every linear except the output head by default (in
the GPT: the four projections of each block); ``lm_head`` when ``quant.lm_head``;
``tok_emb`` when ``quant.embeddings``.

Tied embeddings policy: when ``tok_emb`` and ``lm_head`` share one matrix, asking for
either (``quant.lm_head`` or ``quant.embeddings``) quantizes the shared ``[V, d]`` matrix
*once*, with the head's spec (group along d), and both uses read the same codes: the head is
a packed linear and ``tok_emb`` becomes a :class:`QuantEmbedding` (or, during QAT, a
:class:`FakeQuantEmbedding`) that references the head's module and gathers/dequantizes
rows. The shared matrix is stored once, under ``lm_head``. An untied embedding is quantized
on its own, per row (``group_size=-1``), weight-only.

Example:
    >>> from qtrain.config import QuantConfig
    >>> qcfg = QuantConfig(scheme="int4", group_size=32)
    >>> model = prepare(model, qcfg)   # nn.Linear -> FakeQuantLinear
    >>> ...                            # train
    >>> model = convert(model, qcfg)   # FakeQuantLinear -> Int4Linear (same codes)
    >>> manifest_layers = layer_specs(model)

The scheme table lives in :mod:`qtrain.quant.schemes`, layer selection in
:mod:`qtrain.quant.targets`, manifest metadata and packed skeletons in
:mod:`qtrain.quant.layout`. Modes use these through :class:`qtrain.quant.recipe.QuantRecipe`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from qtrain.config import QuantConfig
from qtrain.quant.fake import FakeQuantEmbedding, FakeQuantLinear
from qtrain.quant.packed import PackedLinear, QuantEmbedding
from qtrain.quant.schemes import EMBEDDING, HEAD, embedding_spec, packed_class, spec_from_config
from qtrain.quant.spec import LayerSpec, QuantizedWeight
from qtrain.quant.targets import check_layers, embedding_modules, is_tied, linear_bias, set_module, target_spec


# -- prepare / convert ------------------------------------------------------------------------
def prepare(
    model: nn.Module,
    qcfg: QuantConfig,
    learn_scales: bool = False,
    init: Mapping[str, QuantizedWeight] | None = None,
) -> nn.Module:
    """Swap target ``nn.Linear`` modules for :class:`FakeQuantLinear` (in place).

    Args:
        model: a full-precision model.
        qcfg: the quant config.
        learn_scales: LSQ-style learnable scales (see :func:`scale_parameters`).
        init: optional per-layer initial qparams (e.g. :func:`qtrain.quant.ptq.init_scales`);
            only their ``scales``/``zeros`` are used. Without ``learn_scales`` they stay fixed.

    Returns:
        The same model object.

    Raises:
        ValueError: see :func:`check_layers`; a layer that is already packed.

    Example:
        >>> model = prepare(GPT(cfg.model), QuantConfig(scheme="int4", group_size=32))
        >>> type(model.blocks[0].attn.qkv).__name__
        'FakeQuantLinear'
    """
    spec = spec_from_config(qcfg)
    names = check_layers(model, qcfg)
    assert spec is not None
    packed = [n for n in names if isinstance(model.get_submodule(n), (PackedLinear, QuantEmbedding))]
    if packed:
        raise ValueError(f"{packed[0]}: already converted to packed integers; use to_fake() to fine-tune it")
    tied = is_tied(model)
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, (FakeQuantLinear, FakeQuantEmbedding)):
            set_module(model, name, _fake_module(model, name, mod, spec, tied, learn_scales, (init or {}).get(name)))
    return model


def _fake_module(
    model: nn.Module, name: str, mod: nn.Module, spec: LayerSpec, tied: bool, learn: bool, qw: QuantizedWeight | None
) -> nn.Module:
    """The fake-quant replacement of one target (the tied embedding reads the prepared head)."""
    kwargs: dict[str, Any] = {"scales": qw.scales, "zeros": qw.zeros} if qw is not None else {}
    if name == EMBEDDING and tied:
        head = model.get_submodule(HEAD)
        assert isinstance(head, FakeQuantLinear)
        return FakeQuantEmbedding(head, tied_to=HEAD, name=name)
    if name == EMBEDDING:
        assert isinstance(mod, nn.Embedding)
        return FakeQuantEmbedding.from_embedding(mod, embedding_spec(spec), name, learn, **kwargs)
    assert isinstance(mod, nn.Linear)
    return FakeQuantLinear.from_linear(mod, spec, name, learn, **kwargs)


def pack_layer(mod: nn.Module, spec: LayerSpec, name: str, kernel: str = "auto") -> PackedLinear:
    """Packed module for one linear-like module (round to nearest, or a fake module's codes).

    A bias is carried over unchanged (full precision).

    Args:
        mod: ``nn.Linear``, ``FakeQuantLinear`` (its current codes, learned scales included)
            or an ``nn.Embedding`` (quantized as a ``[V, d]`` table).
        spec: expected spec.
        name: module name.
        kernel: ``"auto"`` or ``"reference"``.

    Returns:
        The packed module.

    Raises:
        ValueError: a fake-quant module trained with another spec.
    """
    cls = packed_class(spec)
    if isinstance(mod, FakeQuantLinear):
        if mod.spec != spec:
            raise ValueError(
                f"{name}: fake-quant spec {mod.spec.to_dict()} differs from the requested {spec.to_dict()}"
            )
        qw = mod.quantized()
        return cls.from_codes(qw.codes, qw.scales, qw.zeros, spec, kernel, name, mod.bias)
    weight = mod.weight
    assert isinstance(weight, Tensor)
    return cls.from_float(weight.detach(), spec, kernel, name, linear_bias(mod))


def convert(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Swap target (and all fake-quant) layers for packed integer modules (in place).

    A :class:`FakeQuantLinear` is converted with :meth:`FakeQuantLinear.quantized`, the
    same function its forward uses, so the stored codes are bit-identical to the ones it
    trained with (learned or frozen scales included). Plain linears are rounded to nearest.
    Fake-quant modules outside the config's targets are converted with their own spec.

    Args:
        model: full-precision or prepared model.
        qcfg: the quant config (scheme, target layers, ``kernel``).

    Returns:
        The same model object.

    Raises:
        ValueError: see :func:`check_layers`; a fake-quant layer trained with another spec.

    Example:
        >>> model = convert(model, QuantConfig(scheme="int8"))
        >>> model.blocks[0].mlp.down.weight_int8.dtype
        torch.int8
    """
    spec = spec_from_config(qcfg)
    names = check_layers(model, qcfg)
    assert spec is not None
    tied = is_tied(model)
    skip = embedding_modules(model)
    fakes = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding))
        and n not in names
        and not any(n.startswith(s + ".") for s in skip)
    ]
    todo = fakes + names
    order = [n for n in todo if n != EMBEDDING] + [n for n in todo if n == EMBEDDING]
    for name in order:
        mod = model.get_submodule(name)
        if isinstance(mod, (PackedLinear, QuantEmbedding)):
            continue
        expected = target_spec(name, spec, tied) if name in names else None
        new: nn.Module
        if isinstance(mod, (nn.Embedding, FakeQuantEmbedding)):
            new = _convert_embedding(model, name, mod, expected, tied, qcfg.kernel)
        else:
            assert isinstance(mod, (nn.Linear, FakeQuantLinear))
            new = pack_layer(mod, expected or _module_spec(mod), name, qcfg.kernel)
        set_module(model, name, new)
    return model


def _module_spec(mod: nn.Module) -> LayerSpec:
    spec = getattr(mod, "spec", None)
    if not isinstance(spec, LayerSpec):
        raise ValueError(f"{type(mod).__name__} has no quantization spec")
    return spec


def _convert_embedding(
    model: nn.Module, name: str, mod: nn.Module, spec: LayerSpec | None, tied: bool, kernel: str
) -> QuantEmbedding:
    if tied:
        head = model.get_submodule(HEAD)
        if not isinstance(head, PackedLinear):
            raise ValueError(f"{name}: tied to {HEAD}, which must be quantized too")
        return QuantEmbedding(head, tied_to=HEAD, name=name)
    if isinstance(mod, FakeQuantEmbedding):
        table = mod.get_table()
        return QuantEmbedding(pack_layer(table, spec or table.spec, name, kernel), None, name)
    assert isinstance(mod, nn.Embedding) and spec is not None
    return QuantEmbedding(packed_class(spec).from_float(mod.weight.detach(), spec, kernel, name), None, name)


def to_fake(model: nn.Module, learn_scales: bool = False) -> nn.Module:
    """Packed modules -> :class:`FakeQuantLinear` reproducing their codes (for fine-tuning).

    Args:
        model: a converted model.
        learn_scales: continue learning the scales (initialised from the packed ones);
            otherwise they stay frozen and the codes depend only on the weights.

    Returns:
        The same model object; ``convert`` brings it back to the same scheme.
    """
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    embeds = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantEmbedding)]
    skip = {n for n, _ in embeds}
    for name, m in packed:
        if not any(name.startswith(s + ".") for s in skip):
            set_module(model, name, FakeQuantLinear.from_packed(m, name, learn_scales))
    for name, e in embeds:
        if e.tied_to is not None:
            head = model.get_submodule(e.tied_to)
            assert isinstance(head, FakeQuantLinear)
            set_module(model, name, FakeQuantEmbedding(head, e.tied_to, name))
        else:
            table = FakeQuantLinear.from_packed(e.get_table(), name, learn_scales)
            set_module(model, name, FakeQuantEmbedding(table, None, name))
    return model


# -- PTQ module swaps -----------------------------------------------------------------------
def swap_packed(model: nn.Module, name: str, qw: QuantizedWeight, spec: LayerSpec, kernel: str) -> None:
    """Replace layer ``name`` by the packed module holding ``qw`` (PTQ); its bias is kept as it is."""
    bias = linear_bias(model.get_submodule(name))
    mod = packed_class(spec).from_codes(qw.codes, qw.scales, qw.zeros, spec, kernel, name, bias)
    set_module(model, name, mod)


def float_weight(model: nn.Module, name: str) -> Tensor:
    """The full-precision weight of target ``name`` (detached), for PTQ.

    Raises:
        ValueError: the layer is fake-quantized or already packed.
    """
    mod = model.get_submodule(name)
    if isinstance(mod, FakeQuantLinear):
        raise ValueError(f"{name}: PTQ needs a full-precision model; this layer is fake-quantized (use convert)")
    if isinstance(mod, PackedLinear):
        raise ValueError(f"{name}: already quantized")
    w = mod.weight
    assert isinstance(w, Tensor)
    return w.detach()
