"""The values of a manifest: types, ranges and consistency, each refusal naming its field.

Checked before anything is built from them. The model's shape and the quantization config
go through the same rules as a run's config (`qtrain.config_rules.validate`), after their types
are checked here; per-layer specs through `QuantRecipe.check_layer`. Whether the tensors fit what
the manifest describes is checked afterwards, against the safetensors headers
(`qtrain.checkpoint.consistency`). What a scheme means is asked of `qtrain.quant.recipe.QuantRecipe`.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from qtrain.config import ModeConfig, ModelConfig, QuantConfig, RunConfig
from qtrain.config_rules import validate
from qtrain.errors import CheckpointError
from qtrain.quant.recipe import QuantRecipe

MAX_DIM = 2**31 - 1
"""Largest size accepted for any model dimension (torch shapes are int64; products must not overflow)."""
LAYER_KEYS = {
    "scheme": str,
    "bits": int,
    "group_size": int,
    "symmetric": bool,
    "activations": str,
    "kind": str,
    "in_features": int,
    "out_features": int,
    "tied_to": (str, type(None)),
}
"""The entries of one `quant.layers` spec (what `qtrain.quant.layer_specs` writes) and their types."""
QUANT_KEYS = {"config", "layers", "state", "method", "learn_scales"}
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _fail(mpath: Path, field: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{mpath}: {field} {msg}")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'…' if len(text) > 80 else ''}"


def _typed(mpath: Path, field: str, value: Any, kind: Any) -> None:
    """`value` is of `kind` (bool is not an int, an int is a float)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(
        (type(value) is bool)
        if k is bool
        else (type(value) in (int, float))
        if k is float
        else (type(value) is int)
        if k is int
        else isinstance(value, k)
        for k in kinds
    )
    if not ok:
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise _fail(mpath, field, f"must be {names} (got {_show(value)})")
    if type(value) is float and not math.isfinite(value):
        raise _fail(mpath, field, f"must be finite (got {value})")


def _entries(mpath: Path, field: str, value: Any, schema: dict[str, Any], required: set[str]) -> None:
    _typed(mpath, field, value, dict)
    unknown = sorted(set(value) - set(schema))
    if unknown:
        raise _fail(mpath, field, f"has unknown entries {unknown}; valid: {sorted(schema)}")
    missing = sorted(required - set(value))
    if missing:
        raise _fail(mpath, field, f"lacks {missing}")
    for key in value:
        _typed(mpath, f"{field}.{key}", value[key], schema[key])


def validate_values(mpath: Path, m: dict[str, Any]) -> None:
    """Every manifest value qtrain uses: types, ranges, and consistency between them.

    Raises:
        CheckpointError: the first problem, naming the field (e.g. `model.n_head`).
    """
    for key, kind in (("created_unix", float), ("qtrain_version", (str, type(None))),
                      ("torch_version", (str, type(None))), ("mode", str), ("config", dict),
                      ("upgraded_from", dict), ("imported_from", dict)):  # fmt: skip
        if key in m:
            _typed(mpath, key, m[key], kind)
    quant = m.get("quant")
    if m.get("model") is None:
        if quant is not None:
            raise _fail(mpath, "model", "is missing, but 'quant' describes quantized layers of a model")
        return
    mcfg = model_config(mpath, m["model"])
    if quant is not None:
        _quant(mpath, quant, mcfg)


def model_config(mpath: Path, model: Any) -> ModelConfig:
    """The manifest's `model` as a ModelConfig, after checking every field.

    Raises:
        CheckpointError: a missing, unknown, mistyped, out-of-range or inconsistent field.
    """
    kinds = {"float": float, "int": int, "bool": bool, "str": str, "int | None": (int, type(None))}
    schema = {f.name: kinds[str(f.type)] for f in fields(ModelConfig)}
    _entries(mpath, "model", model, schema, set(schema))
    for key, kind in schema.items():
        if kind in (int, float, (int, type(None))) and model[key] is not None and not 0 < model[key] <= MAX_DIM:
            raise _fail(mpath, f"model.{key}", f"must be in (0, {MAX_DIM}] (got {model[key]})")
    cfg = ModelConfig(**model)
    run = RunConfig(model=cfg, mode=ModeConfig("eval"), init_from="-")
    problems = [p for p in validate(run) if p.startswith("model.")]
    if problems:
        raise CheckpointError(f"{mpath}: {'; '.join(problems)}")
    return cfg


def _quant(mpath: Path, quant: Any, mcfg: ModelConfig) -> None:
    if not isinstance(quant, dict):
        raise _fail(mpath, "quant", f"must be an object (scheme config, state, layers) or null (got {_show(quant)})")
    schema = {"config": dict, "layers": dict, "state": str, "method": (str, type(None)), "learn_scales": bool}
    _entries(mpath, "quant", quant, schema, {"config", "layers", "state"})
    if quant["state"] not in ("fake", "packed"):
        raise _fail(mpath, "quant.state", f"must be 'fake' or 'packed' (got {quant['state']!r})")
    quant_config(mpath, quant["config"], mcfg)
    for name, spec in quant["layers"].items():
        _layer(mpath, name, spec, quant["layers"])


def quant_config(mpath: Path, config: Any, mcfg: ModelConfig) -> QuantConfig:
    """The manifest's `quant.config` as a QuantConfig, checked like a run's `quant=` settings.

    Raises:
        CheckpointError: naming the field.
    """
    schema = {f.name: (int if f.type == "int" else bool if f.type == "bool" else str) for f in fields(QuantConfig)}
    _entries(mpath, "quant.config", config, schema, set(schema))
    schemes = QuantRecipe.scheme_bits()
    if config["scheme"] not in schemes:
        raise _fail(mpath, "quant.config.scheme", f"must be one of {list(schemes)} (got {config['scheme']!r})")
    qcfg = QuantConfig(**config)
    run = RunConfig(model=mcfg, quant=qcfg, mode=ModeConfig("eval"), init_from="-")
    problems = [p for p in validate(run) if p.startswith("quant.")]
    if problems:
        raise CheckpointError(f"{mpath}: in quant.config: {'; '.join(problems)}")
    return qcfg


def _layer(mpath: Path, name: Any, spec: Any, layers: dict[str, Any]) -> None:
    field = f"quant.layers.{str(name)[:120]}"
    if not _MODULE_NAME.match(name):
        raise _fail(mpath, field, "is not a module name")
    _entries(mpath, field, spec, LAYER_KEYS, set(LAYER_KEYS))
    schemes = QuantRecipe.scheme_bits()
    if spec["scheme"] not in schemes:
        raise _fail(mpath, f"{field}.scheme", f"must be one of {list(schemes)} (got {spec['scheme']!r})")
    if spec["bits"] != schemes[spec["scheme"]]:
        bits = schemes[spec["scheme"]]
        raise _fail(mpath, f"{field}.bits", f"is {spec['bits']}, but scheme {spec['scheme']} has {bits}")
    if spec["kind"] not in ("linear", "embedding"):
        raise _fail(mpath, f"{field}.kind", f"must be 'linear' or 'embedding' (got {spec['kind']!r})")
    for key in ("in_features", "out_features"):
        if not 0 < spec[key] <= MAX_DIM:
            raise _fail(mpath, f"{field}.{key}", f"must be in (0, {MAX_DIM}] (got {spec[key]})")
    tied = spec["tied_to"]
    target = layers.get(tied) if tied is not None else None  # not checked yet: any JSON value
    shares = isinstance(target, dict) and target.get("kind") == "linear"
    if tied is not None and (spec["kind"] != "embedding" or not shares):
        raise _fail(mpath, f"{field}.tied_to", f"{tied!r} is not a quantized linear layer an embedding can share")
    try:
        QuantRecipe.check_layer(field, spec)
    except ValueError as err:
        raise CheckpointError(f"{mpath}: {err}") from None
