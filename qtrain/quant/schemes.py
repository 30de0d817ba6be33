"""The quantization schemes (`quant=`) and the layer specs they give.

:data:`SCHEMES` maps each ``quant.scheme`` to its weight bits and activation handling;
:func:`spec_from_config` turns a :class:`~qtrain.config.QuantConfig` into the
:class:`~qtrain.quant.primitives.LayerSpec` every quantized layer carries, and
:func:`packed_class` names the packed module that stores it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qtrain.config import QuantConfig
from qtrain.quant import primitives as P
from qtrain.quant.fake import FakeQuantLinear
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear
from qtrain.quant.primitives import LayerSpec

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
