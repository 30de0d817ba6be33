"""Quantization entry points: prepare / convert, to_fake, QAT helpers, the Quantizer facade.

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
:mod:`qtrain.quant.layers`, manifest metadata and packed skeletons in
:mod:`qtrain.quant.skeleton`; their public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor, nn

from qtrain.config import QuantConfig
from qtrain.quant import primitives as P
from qtrain.quant.fake import FakeQuantEmbedding, FakeQuantLinear, WeightHook
from qtrain.quant.layers import (  # noqa: F401 - re-exported: api is the package's facade
    KEEP_FULL_PRECISION,
    _embedding_children,
    _kept,
    _layer_spec,
    _linear_like,
    check_layers,
    is_tied,
    keep_full_precision,
    layer_shape,
    set_module,
    target_layers,
)
from qtrain.quant.packed import PackedLinear, QuantEmbedding, check_kernel
from qtrain.quant.primitives import LayerSpec, QuantizedWeight
from qtrain.quant.schemes import (  # noqa: F401 - re-exported
    EMBEDDING,
    HEAD,
    SCHEMES,
    Scheme,
    embedding_spec,
    get_scheme,
    packed_class,
    spec_from_config,
)
from qtrain.quant.skeleton import build_packed_skeleton, layer_specs, set_kernel  # noqa: F401 - re-exported


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
        table = FakeQuantLinear.from_linear(_as_linear(mod), embedding_spec(spec), name, learn, **kwargs)
        return FakeQuantEmbedding(table, None, name)
    assert isinstance(mod, nn.Linear)
    return FakeQuantLinear.from_linear(mod, spec, name, learn, **kwargs)


def _as_linear(emb: nn.Embedding) -> nn.Linear:
    lin = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
    lin.weight = emb.weight
    return lin


def pack_layer(mod: nn.Module, spec: LayerSpec, name: str, kernel: str = "auto") -> PackedLinear:
    """Packed module for one linear-like module (round to nearest, or a fake module's codes).

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
        return cls.from_codes(qw.codes, qw.scales, qw.zeros, spec, kernel, name)
    weight = mod.weight
    assert isinstance(weight, Tensor)
    return cls.from_float(weight.detach(), spec, kernel, name)


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
    skip = _embedding_children(model)
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
        expected = _layer_spec(name, spec, tied) if name in names else None
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


# -- QAT helpers ------------------------------------------------------------------------------
def fake_quant_modules(model: nn.Module) -> Iterator[tuple[str, FakeQuantLinear]]:
    """``(name, module)`` of every :class:`FakeQuantLinear` (embedding tables included once)."""
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear) and id(m) not in seen:
            seen.add(id(m))
            yield name, m


def set_fake_quant(model: nn.Module, weight: bool | None = None, activations: bool | None = None) -> None:
    """Turn weight and/or activation fake quantization on or off in every fake-quant module."""
    for _, m in fake_quant_modules(model):
        m.enable(weight, activations if m.spec.activations == "int8" else None)


def freeze_scales(model: nn.Module) -> None:
    """:meth:`FakeQuantLinear.freeze` on every fake-quant module."""
    for _, m in fake_quant_modules(model):
        m.freeze()


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Learnable scale parameters (give them their own optimizer group, no weight decay).

    They are 2-D ``[N, G]`` tensors, so a "decay every matrix" rule would catch them:
    exclude them from the weight-decay group.
    """
    return [m.scales for _, m in fake_quant_modules(model) if isinstance(m.scales, nn.Parameter)]


def register_weight_hook(model: nn.Module, fn: WeightHook) -> Callable[[], None]:
    """Append ``fn(module_name, fake_weight) -> Tensor | None`` to every fake-quant module.

    Args:
        model: a prepared model.
        fn: the hook; a returned tensor replaces the fake weight in that forward (it does not
            change what ``convert`` stores).

    Returns:
        A function that removes the hook again.
    """
    mods = [m for _, m in fake_quant_modules(model)]
    for m in mods:
        m.weight_hooks.append(fn)

    def remove() -> None:
        for m in mods:
            if fn in m.weight_hooks:
                m.weight_hooks.remove(fn)

    return remove


# -- public facade -------------------------------------------------------------------------
class Quantizer:
    """Everything one :class:`~qtrain.config.QuantConfig` means, behind one object.

    Args:
        qcfg: the quant config (``scheme`` must not be ``none``).
        learn_scales: :meth:`prepare` makes LSQ-style learnable scales.

    Raises:
        ValueError: scheme ``none`` or an invalid config.

    Example:
        >>> q = Quantizer(QuantConfig(scheme="int4", group_size=32))
        >>> qw = q.quantize(torch.randn(64, 128))     # codes uint8 [64, 128], scales bf16 [64, 4]
        >>> w_hat = q.dequantize(qw)
        >>> model = q.convert(q.prepare(model))       # QAT then packed int4
        >>> print(q.describe())
    """

    def __init__(self, qcfg: QuantConfig, learn_scales: bool = False) -> None:
        spec = spec_from_config(qcfg)
        if spec is None:
            raise ValueError("quant.scheme=none: nothing to quantize")
        check_kernel(qcfg.kernel)
        self.qcfg, self.spec, self.learn_scales = qcfg, spec, learn_scales

    def quantize(self, tensor: Tensor) -> QuantizedWeight:
        """Round-to-nearest codes of a ``[N, K]`` weight with this spec.

        Raises:
            ValueError: the group size does not divide K.
        """
        self.spec.check("tensor", tensor.shape[-1])
        s = self.spec
        return P.quantize_weight(tensor, s.bits, s.group_size, s.symmetric)

    def dequantize(self, qw: QuantizedWeight) -> Tensor:
        """Float32 ``[N, K]`` from :meth:`quantize` output."""
        return P.dequantize(qw.codes, qw.scales, qw.zeros, self.spec.bits, self.spec.group_size)

    def target_layers(self, model: nn.Module) -> list[str]:
        """See :func:`target_layers`."""
        return target_layers(model, self.qcfg)

    def prepare(self, model: nn.Module, init: Mapping[str, QuantizedWeight] | None = None) -> nn.Module:
        """See :func:`prepare`."""
        return prepare(model, self.qcfg, self.learn_scales, init)

    def convert(self, model: nn.Module) -> nn.Module:
        """See :func:`convert`."""
        return convert(model, self.qcfg)

    def describe(self) -> str:
        """One line: scheme, bits, grouping, symmetry, activations, extra layers, kernel."""
        s, q = self.spec, self.qcfg
        group = "per channel" if s.group_size == -1 else f"group {s.group_size}"
        extra = [n for n, on in (("lm_head", q.lm_head), ("embeddings", q.embeddings)) if on]
        return (
            f"{s.scheme}: {s.bits}-bit weights, {group}, {'symmetric' if s.symmetric else 'asymmetric'}, "
            f"activations {s.activations}, layers blocks{''.join(' + ' + e for e in extra)}, kernel {q.kernel}"
        )


__all__ = [
    "EMBEDDING",
    "HEAD",
    "SCHEMES",
    "LayerSpec",
    "QuantizedWeight",
    "Quantizer",
    "Scheme",
    "build_packed_skeleton",
    "check_layers",
    "convert",
    "embedding_spec",
    "fake_quant_modules",
    "freeze_scales",
    "get_scheme",
    "is_tied",
    "keep_full_precision",
    "layer_shape",
    "layer_specs",
    "pack_layer",
    "packed_class",
    "prepare",
    "register_weight_hook",
    "scale_parameters",
    "set_fake_quant",
    "set_kernel",
    "set_module",
    "spec_from_config",
    "target_layers",
    "to_fake",
]
