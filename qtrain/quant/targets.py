"""Which layers of a model are quantized (targets), their shapes and specs, and module swapping.

Used by :mod:`qtrain.quant.transforms` (prepare / convert), :mod:`qtrain.quant.layout` and PTQ.
"""

from __future__ import annotations

from torch import Tensor, nn

from qtrain.config import QuantConfig
from qtrain.quant.fake import FakeQuantEmbedding, FakeQuantLinear
from qtrain.quant.packed import PackedLinear, QuantEmbedding
from qtrain.quant.schemes import EMBEDDING, HEAD, embedding_spec, spec_from_config
from qtrain.quant.spec import LayerSpec

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


def is_kept(m: nn.Module) -> bool:
    """Whether :func:`keep_full_precision` marked ``m``."""
    return bool(getattr(m, KEEP_FULL_PRECISION, False))


def is_linear_like(m: nn.Module) -> bool:
    """A linear, fake-quant or packed linear module that is not kept in full precision."""
    return isinstance(m, (nn.Linear, FakeQuantLinear, PackedLinear)) and not is_kept(m)


def is_tied(model: nn.Module) -> bool:
    """Whether the embedding and the head share one matrix (before or after quantization)."""
    emb, head = getattr(model, EMBEDDING, None), getattr(model, HEAD, None)
    if isinstance(emb, (FakeQuantEmbedding, QuantEmbedding)):
        return emb.tied_to is not None
    w_emb, w_head = getattr(emb, "weight", None), getattr(head, "weight", None)
    return w_emb is not None and w_emb is w_head


def embedding_modules(model: nn.Module) -> set[str]:
    """Names of the quantized embedding modules (their tables are not targets of their own)."""
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
    skip = embedding_modules(model)
    names = [
        n
        for n, m in model.named_modules()
        if n and n != HEAD and is_linear_like(m) and not any(n.startswith(s + ".") for s in skip)
    ]
    tied = is_tied(model)
    head, emb = getattr(model, HEAD, None), getattr(model, EMBEDDING, None)
    if head is not None and not is_kept(head) and (qcfg.lm_head or (tied and qcfg.embeddings)):
        names.append(HEAD)
    if emb is not None and not is_kept(emb) and (qcfg.embeddings or (tied and qcfg.lm_head)):
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


def linear_bias(mod: nn.Module) -> Tensor | None:
    """The bias of a linear-like module (detached; full precision), None when it has none (embeddings too)."""
    bias = getattr(mod, "bias", None)
    return bias.detach() if isinstance(bias, Tensor) else None


def target_spec(name: str, spec: LayerSpec, tied: bool) -> LayerSpec:
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
        target_spec(name, spec, tied).check(name, layer_shape(mod)[0])
    return names


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
