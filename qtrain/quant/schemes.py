"""The quantization schemes (``quant=``): one row each, owning its rules, packed module and label.

:data:`SCHEMES` maps each ``quant.scheme`` to a :class:`Scheme`: its weight bit width (whose
layout rules come from :data:`qtrain.quant.spec.WIDTHS`), the packed module that stores it and
the activation mode it forces. :func:`spec_from_config` turns a
:class:`~qtrain.config.QuantConfig` into the :class:`~qtrain.quant.spec.LayerSpec` every
quantized layer carries; the text functions below are the one place a scheme becomes words.
Adding a scheme: a row here (plus a :data:`~qtrain.quant.spec.WIDTHS` row if its bit width is
new, a packed module, and its name in ``qtrain.config.SCHEMES``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qtrain.config import QuantConfig
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear
from qtrain.quant.spec import ACTIVATION_MODES, BitWidth, LayerSpec, table_row, width

HEAD = "lm_head"
"""Name of the output head module."""
EMBEDDING = "tok_emb"
"""Name of the token embedding module."""


@dataclass(frozen=True)
class Scheme:
    """One row of :data:`SCHEMES`.

    Attributes:
        name: scheme name (``quant=`` option).
        bits: weight bits (a :data:`~qtrain.quant.spec.WIDTHS` row: int8 is per output channel
            and symmetric only, int4 grouped and optionally asymmetric).
        packed: packed module class (inference, checkpoints).
        activations: the activation mode the scheme forces (``"int8"``), or ``"none"`` to take
            the config's ``quant.activations``.
    """

    name: str
    bits: int
    packed: type[PackedLinear]
    activations: str = "none"

    @property
    def width(self) -> BitWidth:
        """The bit width's row (layout rules, code range)."""
        return width(self.bits)

    def spec(self, qcfg: QuantConfig) -> LayerSpec:
        """The linear layers' spec for a config of this scheme.

        Raises:
            ValueError: a layout the bit width does not allow, or an unknown activation mode.
        """
        w = self.width
        if not w.asymmetric and not qcfg.symmetric:
            raise ValueError(f"quant.symmetric=false: int{self.bits} weights are symmetric per channel")
        if qcfg.activations not in ACTIVATION_MODES:
            raise ValueError(f"quant.activations={qcfg.activations!r} is not one of {list(ACTIVATION_MODES)}")
        group = qcfg.group_size if w.grouped else -1
        acts = self.activations if self.activations != "none" else qcfg.activations
        return LayerSpec(self.name, self.bits, group, qcfg.symmetric if w.asymmetric else True, acts)


SCHEMES: dict[str, Scheme] = {
    "int8": Scheme("int8", 8, Int8Linear),
    "int4": Scheme("int4", 4, Int4Linear),
    "int8da_int4w": Scheme("int8da_int4w", 4, Int4Linear, activations="int8"),
}
"""The one table of schemes."""


def get_scheme(name: str) -> Scheme:
    """Look up a scheme.

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    return table_row(SCHEMES, name, "quant.scheme")


def packed_class(spec: LayerSpec) -> type[PackedLinear]:
    """Packed module class for a spec (by its scheme)."""
    return get_scheme(spec.scheme).packed


def spec_from_config(qcfg: QuantConfig) -> LayerSpec | None:
    """The linear layers' spec for a config (None for ``scheme=none``); see :meth:`Scheme.spec`.

    Raises:
        ValueError: unknown scheme, or a config the scheme's rules refuse.
    """
    return None if qcfg.scheme == "none" else get_scheme(qcfg.scheme).spec(qcfg)


def embedding_spec(spec: LayerSpec) -> LayerSpec:
    """Spec of an untied embedding table: same bits, per row, weight-only."""
    return dataclasses.replace(spec, group_size=-1, activations="none")


# -- labels and keys: the one place a scheme becomes text -----------------------------------------
def _grouped(scheme: str) -> bool:
    """Whether a scheme's weights come in groups along K (int8: per output channel only)."""
    row = SCHEMES.get(scheme)
    return row is None or row.width.grouped


def _forced_acts(scheme: str) -> bool:
    """Whether the scheme's name already says its activation mode (``int8da_int4w``)."""
    row = SCHEMES.get(scheme)
    return row is not None and row.activations != "none"


def long_text(spec: Mapping[str, Any]) -> str:
    """``int4 group 32``, ``int4 per channel asymmetric``, ``int8 + int8 activations + lm_head``.

    Args:
        spec: a config (``quant.config``, with ``embeddings``/``lm_head``) or one layer spec
            (``quant.layers.<name>``) as a mapping.
    """
    scheme = str(spec.get("scheme"))
    text = scheme
    if _grouped(scheme):
        gs = spec.get("group_size")
        text += f" group {gs}" if isinstance(gs, int) and gs > 0 else " per channel"
    text += "" if spec.get("symmetric", True) else " asymmetric"
    if spec.get("activations") not in (None, "none") and not _forced_acts(scheme):
        text += f" + {spec['activations']} activations"
    return text + "".join(f" + {k}" for k in ("embeddings", "lm_head") if spec.get(k))


def layers_text(layers: Mapping[str, Mapping[str, Any]]) -> str:
    """``full precision``, or the distinct schemes of a manifest's ``quant.layers`` joined by `` + ``."""
    kinds: list[str] = []
    for spec in layers.values():
        if (t := long_text(spec)) not in kinds:
            kinds.append(t)
    return " + ".join(kinds) or "full precision"


def config_text(cfg: Mapping[str, Any] | None) -> str:
    """:func:`long_text` of a config, ``full precision`` for none."""
    return "full precision" if not cfg or cfg.get("scheme", "none") == "none" else long_text(cfg)


def banner_text(cfg: Mapping[str, Any] | None) -> str:
    """``int4 (group 32, symmetric)``, ``int8``, ``full precision`` (a run's first line)."""
    if not cfg or cfg.get("scheme", "none") == "none":
        return "full precision"
    scheme = str(cfg["scheme"])
    if not _grouped(scheme):
        return scheme
    group = cfg.get("group_size", -1)
    grouping = "per channel" if group == -1 else f"group {group}"
    return f"{scheme} ({grouping}, {'symmetric' if cfg.get('symmetric', True) else 'asymmetric'})"


def short_text(cfg: Mapping[str, Any] | None) -> str:
    """``fp32``, ``int8``, ``int8 +act8``, ``int4 g32``, ``int4 g128 asym +head +emb`` (tables)."""
    if not cfg or cfg.get("scheme", "none") == "none":
        return "fp32"
    scheme = str(cfg["scheme"])
    text = scheme
    if _grouped(scheme):
        g = cfg.get("group_size", 32)
        text += " per-channel" if g == -1 else f" g{g}"
        text += "" if cfg.get("symmetric", True) else " asym"
    if cfg.get("activations") == "int8" and not _forced_acts(scheme):
        text += " +act8"
    return text + "".join(f" {tag}" for key, tag in (("lm_head", "+head"), ("embeddings", "+emb")) if cfg.get(key))


def config_key(cfg: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What makes two configs store the same weights (values a scheme fixes normalised; no kernel).

    ``(scheme, group_size, symmetric, activations, lm_head, embeddings)``; ``("none",)`` for full precision.
    """
    if not cfg or cfg.get("scheme", "none") == "none":
        return ("none",)
    scheme = str(cfg["scheme"])
    grouped = _grouped(scheme)
    return (
        scheme,
        cfg.get("group_size", 32) if grouped else -1,
        bool(cfg.get("symmetric", True)) if grouped else True,
        "int8" if _forced_acts(scheme) else cfg.get("activations", "none"),
        bool(cfg.get("lm_head", False)),
        bool(cfg.get("embeddings", False)),
    )


LAYER_KEY = ("scheme", "bits", "group_size", "symmetric", "activations")
"""What makes two layers' quantization the same (shapes are checked by strict loading)."""


def layers_key(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """Per layer, the values of :data:`LAYER_KEY`."""
    return {n: tuple(s.get(k) for k in LAYER_KEY) for n, s in layers.items()}
