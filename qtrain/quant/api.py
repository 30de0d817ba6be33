"""Quantization entry points: the SCHEMES table, prepare / convert, specs, skeletons.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from qtrain.config import QuantConfig
from qtrain.quant import primitives as P
from qtrain.quant.fake import FakeQuantEmbedding, FakeQuantLinear, WeightHook
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear, QuantEmbedding, check_kernel
from qtrain.quant.primitives import LayerSpec, QuantizedWeight

HEAD = "lm_head"
"""Name of the output head module."""
EMBEDDING = "tok_emb"
"""Name of the token embedding module."""


@dataclass(frozen=True)
class Scheme:
    """One row of :data:`SCHEMES`.

    Attributes:
        name: scheme name (``quant=`` option).
        bits: weight bits.
        fake: fake-quant module class (QAT).
        packed: packed module class (inference, checkpoints).
        group_size: default group size (-1: per output channel).
        symmetric: default symmetry.
        activations: activation quantization forced by the scheme (``"int8"``) or ``"none"``.
        description: one line for humans.
    """

    name: str
    bits: int
    fake: type[FakeQuantLinear]
    packed: type[PackedLinear]
    group_size: int
    symmetric: bool
    activations: str
    description: str


SCHEMES: dict[str, Scheme] = {
    "int8": Scheme(
        "int8", 8, FakeQuantLinear, Int8Linear, -1, True, "none", "int8 weights, symmetric per output channel"
    ),
    "int4": Scheme(
        "int4", 4, FakeQuantLinear, Int4Linear, 32, True, "none", "int4 weights per group along the input dimension"
    ),
    "int8da_int4w": Scheme(
        "int8da_int4w",
        4,
        FakeQuantLinear,
        Int4Linear,
        32,
        True,
        "int8",
        "int8 dynamic per-token activations + int4 per-group weights",
    ),
}
"""The one table of schemes: name -> classes and defaults."""


def get_scheme(name: str) -> Scheme:
    """Look up a scheme.

    Args:
        name: scheme name.

    Returns:
        Its :class:`Scheme`.

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    if name not in SCHEMES:
        raise ValueError(f"quant.scheme={name!r} is not one of {list(SCHEMES)}")
    return SCHEMES[name]


def packed_class(spec: LayerSpec) -> type[PackedLinear]:
    """Packed module class for a spec (by its scheme)."""
    return get_scheme(spec.scheme).packed


def spec_from_config(qcfg: QuantConfig) -> LayerSpec | None:
    """The linear layers' spec for a config (None for ``scheme=none``).

    int8 is always per channel and symmetric; ``int8da_int4w`` forces int8 activations.

    Args:
        qcfg: the quant config.

    Returns:
        A :class:`LayerSpec` or None.

    Raises:
        ValueError: unknown scheme, asymmetric int8, or unknown activation mode.
    """
    if qcfg.scheme == "none":
        return None
    sch = get_scheme(qcfg.scheme)
    if sch.bits == 8 and not qcfg.symmetric:
        raise ValueError("quant.symmetric=false: int8 weights are symmetric per channel")
    if qcfg.activations not in P.ACTIVATION_MODES:
        raise ValueError(f"quant.activations={qcfg.activations!r} is not one of {list(P.ACTIVATION_MODES)}")
    group = -1 if sch.bits == 8 else qcfg.group_size
    acts = "int8" if sch.activations == "int8" else qcfg.activations
    return LayerSpec(sch.name, sch.bits, group, qcfg.symmetric if sch.bits == 4 else True, acts)


def embedding_spec(spec: LayerSpec) -> LayerSpec:
    """Spec of an untied embedding table: same bits, per row, weight-only."""
    return dataclasses.replace(spec, group_size=-1, activations="none")


# -- model inspection -------------------------------------------------------------------------
KEEP_FULL_PRECISION = "qtrain_keep_full_precision"
"""Attribute set by :func:`keep_full_precision`; marked modules are never targets."""


def keep_full_precision(module: nn.Module) -> nn.Module:
    """Mark a module so :func:`target_layers` (hence prepare, convert, PTQ) skips it.

    The mark is a plain attribute: it survives ``deepcopy`` but not a rebuild from a
    checkpoint, so re-mark the same names (those absent from :func:`layer_specs`) there.

    Args:
        module: typically an ``nn.Linear`` inside a block.

    Returns:
        The same module.
    """
    setattr(module, KEEP_FULL_PRECISION, True)
    return module


def _kept(m: nn.Module) -> bool:
    return bool(getattr(m, KEEP_FULL_PRECISION, False))


def _linear_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, FakeQuantLinear, PackedLinear)) and not _kept(m)


def is_tied(model: nn.Module) -> bool:
    """Whether the embedding and the head share one matrix (before or after quantization)."""
    emb, head = getattr(model, EMBEDDING, None), getattr(model, HEAD, None)
    if isinstance(emb, (FakeQuantEmbedding, QuantEmbedding)):
        return emb.tied_to is not None
    w_emb, w_head = getattr(emb, "weight", None), getattr(head, "weight", None)
    return w_emb is not None and w_emb is w_head


def _embedding_children(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (FakeQuantEmbedding, QuantEmbedding))}


def target_layers(model: nn.Module, qcfg: QuantConfig) -> list[str]:
    """Names of the modules to quantize, in processing order (blocks, head, embedding).

    Args:
        model: the model (full precision, prepared or converted).
        qcfg: the quant config (``lm_head``, ``embeddings``).

    Returns:
        Module names; ``tok_emb`` comes after ``lm_head`` (a tied embedding reads the head).
        Modules marked with :func:`keep_full_precision` are left out.
    """
    skip = _embedding_children(model)
    names = [
        n
        for n, m in model.named_modules()
        if n and n != HEAD and _linear_like(m) and not any(n.startswith(s + ".") for s in skip)
    ]
    tied = is_tied(model)
    head, emb = getattr(model, HEAD, None), getattr(model, EMBEDDING, None)
    if head is not None and not _kept(head) and (qcfg.lm_head or (tied and qcfg.embeddings)):
        names.append(HEAD)
    if emb is not None and not _kept(emb) and (qcfg.embeddings or (tied and qcfg.lm_head)):
        names.append(EMBEDDING)
    return names


def layer_shape(mod: nn.Module) -> tuple[int, int]:
    """``(K, N)`` of a linear-like module, or ``(d, V)`` of an embedding.

    Raises:
        ValueError: the module is neither.
    """
    if isinstance(mod, nn.Embedding):
        return mod.embedding_dim, mod.num_embeddings
    if isinstance(mod, (FakeQuantEmbedding, QuantEmbedding)):
        t = mod.get_table()
        return t.in_features, t.out_features
    if isinstance(mod, (nn.Linear, FakeQuantLinear, PackedLinear)):
        return mod.in_features, mod.out_features
    raise ValueError(f"{type(mod).__name__} is not a linear or embedding layer")


def _layer_spec(name: str, spec: LayerSpec, tied: bool) -> LayerSpec:
    """Spec for one target: the embedding is per row unless it shares the head's codes."""
    return spec if name != EMBEDDING or tied else embedding_spec(spec)


def check_layers(model: nn.Module, qcfg: QuantConfig) -> list[str]:
    """Validate the config against every target layer before anything is swapped.

    Args:
        model: the model.
        qcfg: the quant config.

    Returns:
        The target layer names.

    Raises:
        ValueError: scheme ``none``, or a layer the spec does not fit (names layer and value).
    """
    spec = spec_from_config(qcfg)
    if spec is None:
        raise ValueError("quant.scheme=none: choose int8, int4 or int8da_int4w to quantize")
    names = target_layers(model, qcfg)
    tied = is_tied(model)
    if tied and EMBEDDING in names and HEAD not in names:
        raise ValueError(f"{EMBEDDING}: tied to {HEAD}, which is kept in full precision; keep both or neither")
    for name in names:
        mod = model.get_submodule(name)
        _layer_spec(name, spec, tied).check(name, layer_shape(mod)[0])
        if isinstance(mod, (nn.Linear,)) and mod.bias is not None:
            raise ValueError(f"{name}: quantized linears must have no bias")
    return names


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
    skip = _embedding_children(model)
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
    return packed_class(spec).empty(k, n, spec, kernel, name, device=device)


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
