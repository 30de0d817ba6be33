"""Quantization schemes recorded in manifests, and comparing them with a run's settings."""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------- quantization schemes in manifests

SCHEME_KEYS = ("scheme", "bits", "group_size", "symmetric", "activations")
"""What makes two layers' quantization the same (shapes are checked by strict loading)."""


def quant_layers(quant: Any) -> dict[str, dict[str, Any]]:
    """Per-layer specs of a manifest's `quant` (`{}` for full precision)."""
    layers = quant.get("layers") if isinstance(quant, dict) else None
    return layers if isinstance(layers, dict) else {}


def _one_scheme(spec: dict[str, Any]) -> str:
    text = str(spec.get("scheme"))
    if spec.get("scheme") != "int8":
        gs = spec.get("group_size")
        text += f" group {gs}" if isinstance(gs, int) and gs > 0 else " per channel"
    text += "" if spec.get("symmetric", True) else " asymmetric"
    if spec.get("activations") not in (None, "none") and "da" not in text:
        text += f" + {spec['activations']} activations"
    text += "".join(f" + {k}" for k in ("embeddings", "lm_head") if spec.get(k))
    return text


def describe_scheme(layers: dict[str, dict[str, Any]]) -> str:
    """`full precision`, or the distinct schemes of `layers` (e.g. `int4 group 128`)."""
    kinds: list[str] = []
    for spec in layers.values():
        if (t := _one_scheme(spec)) not in kinds:
            kinds.append(t)
    return " + ".join(kinds) or "full precision"


def scheme_mismatch(stored_quant: Any, current_layers: dict[str, dict[str, Any]]) -> str | None:
    """Why a checkpoint's per-layer scheme differs from a model's (`None` when identical)."""

    def key(layers: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
        return {n: tuple(s.get(k) for k in SCHEME_KEYS) for n, s in layers.items()}

    stored = quant_layers(stored_quant)
    if key(stored) == key(current_layers):
        return None
    return f"holds {describe_scheme(stored)} weights, but this run asks for {describe_scheme(current_layers)}"


def config_scheme_mismatch(stored_quant: Any, requested: dict[str, Any]) -> str | None:
    """Why a checkpoint's quantization config differs from a requested `quant` config (`None` when equal)."""
    stored = stored_quant.get("config") if isinstance(stored_quant, dict) else None
    if not isinstance(stored, dict):
        return (
            None
            if requested.get("scheme", "none") == "none"
            else f"holds full precision weights, but this run asks for {_one_scheme(requested)}"
        )
    keys = ["scheme", "symmetric", "activations", "embeddings", "lm_head"]
    keys += ["group_size"] if stored.get("scheme") != "int8" else []
    if all(stored.get(k) == requested.get(k) for k in keys):
        return None
    return f"holds {_one_scheme(stored)} weights, but this run asks for {_one_scheme(requested)}"
