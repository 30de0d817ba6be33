"""Do the tensors fit the model the manifest describes? Decided before any tensor is read.

Order (RELIABILITY.md case 30): the validated manifest, then the safetensors headers (shapes
and dtypes, no data), then cheap comparisons of sizes (the number of blocks, the one size a
model's construction is linear in; the width; the context-sized tables no tensor backs),
then the model built on the meta device (no memory), whose state names, shapes and dtypes
must equal the stored ones exactly. Only then are tensors read; the few that
hold quantization parameters (scales, zero points) are range-checked here, read one by one.

The same model construction (`build_skeleton`) makes the real model afterwards
(`build_model`), so what is checked is what is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qtrain.checkpoint.format import DTYPES, MANIFEST, MODEL_FILE
from qtrain.config import ModelConfig, TrainConfig
from qtrain.errors import CheckpointError
from qtrain.model import GPT
from qtrain.quant import scale_parameters
from qtrain.quant.recipe import QuantRecipe
from qtrain.train import default_param_groups

_BLOCK = re.compile(r"^blocks\.([0-9]+)\.")
CONTEXT_BYTES_FLOOR = 1 << 30
"""Context-sized allocations (rotary table, KV cache) always allowed, whatever the weights' size."""
Shapes = dict[str, tuple[tuple[int, ...], str]]
"""Tensor name -> (shape, safetensors dtype name)."""


def build_skeleton(manifest: dict[str, Any], kernel: str = "auto") -> GPT:
    """The model a (validated) manifest describes, with empty weights, on the current default device.

    Under ``with torch.device("meta")`` nothing is allocated. Full precision, packed and
    fake-quant (QAT in progress) models all rebuild from the manifest alone.

    Raises:
        CheckpointError: the description cannot be built (names the manifest and why).
    """
    try:
        model = GPT(ModelConfig(**manifest["model"]))
        QuantRecipe.from_manifest(manifest.get("quant")).rebuild(model, kernel)  # unlisted targets: kept by a hook
    except (ValueError, RuntimeError, TypeError, KeyError, AttributeError, OverflowError) as err:
        raise CheckpointError(f"{MANIFEST}: the model it describes cannot be built: {str(err)[:500]}") from None
    return model


def _config_layers(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-layer specs that `quant.config` implies for this model (layers absent stay full precision)."""
    with torch.device("meta"):
        return QuantRecipe.from_manifest(manifest["quant"]).expected_layers(GPT(ModelConfig(**manifest["model"])))


def check_layer_specs(path: Path, manifest: dict[str, Any], model: GPT) -> None:
    """`quant.layers` must be what the built model reports, and what `quant.config` implies.

    Raises:
        CheckpointError: naming the first layer that differs and both specs.
    """
    quant = manifest.get("quant")
    if not quant:
        return
    stored = quant["layers"]
    try:
        implied = _config_layers(manifest)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path / MANIFEST}: quant.config does not fit the model: {str(err)[:300]}") from None
    for source, want in (("the model built from it", QuantRecipe.layers_of(model)), ("quant.config", implied)):
        if want != stored:
            name = next((n for n in sorted(set(want) | set(stored)) if want.get(n) != stored.get(n)), "?")
            raise CheckpointError(
                f"{path / MANIFEST}: quant.layers.{name} is {stored.get(name)} but {source} says {want.get(name)}"
            )


def stored_shapes(path: Path, manifest: dict[str, Any], header: dict[str, Any]) -> Shapes:
    """Name -> (shape, dtype) of the model state as stored, tied aliases included.

    Raises:
        CheckpointError: a tied alias that is also stored, or whose source is not.
    """
    shapes: Shapes = {n: (tuple(i["shape"]), i["dtype"]) for n, i in header.items() if n != "__metadata__"}
    for alias, source in manifest.get("tied", []):
        if alias in shapes or source not in shapes:
            why = "is also stored" if alias in shapes else f"refers to '{source}', which is not stored"
            raise CheckpointError(f"{path / MANIFEST}: tied weight '{alias}' {why}")
        shapes[alias] = shapes[source]
    return shapes


def check_sizes(path: Path, model: dict[str, Any], stored: Shapes, weight_bytes: int) -> None:
    """The manifest's sizes against the header, before building anything, even on the meta device.

    `model.n_layer` must be the number of blocks stored (a model's construction is linear in
    it) and `model.n_embd` the final norm's width; the allocations that grow with
    `model.block_size` but hold no stored tensor (the rotary table, one sequence's key/value
    cache) may not exceed 16 times the weights (or 1 GiB).

    Raises:
        CheckpointError: naming the field, the manifest's value and what the header holds.
    """
    blocks = {int(m.group(1)) for n in stored if (m := _BLOCK.match(n))}
    if blocks != set(range(model["n_layer"])):
        held = f"blocks 0..{max(blocks)}" if blocks else "no blocks"
        missing = next((i for i in range(model["n_layer"]) if i not in blocks), None)
        extra = f" (no blocks.{missing})" if missing is not None else ""
        raise CheckpointError(
            f"{path / MANIFEST}: model.n_layer={model['n_layer']}, but {MODEL_FILE} holds {held}{extra}; "
            f"refused before building the model"
        )
    norm = stored.get("norm.weight", ((), ""))[0]
    if norm != (model["n_embd"],):
        raise CheckpointError(
            f"{path / MANIFEST}: model.n_embd={model['n_embd']}, but {MODEL_FILE} holds norm.weight of shape "
            f"{list(norm)}; refused before building the model"
        )
    shape = ModelConfig(**model)
    head, kv_width = shape.head_size(), shape.kv_heads() * shape.head_size()
    need = model["block_size"] * (head // 2 * 8 + model["n_layer"] * kv_width * 2 * 4)
    limit = max(CONTEXT_BYTES_FLOOR, 16 * weight_bytes)
    if need > limit:
        raise CheckpointError(
            f"{path / MANIFEST}: model.block_size={model['block_size']} needs {need:,} bytes of context tables "
            f"(rotary table, one sequence's key/value cache), over the {limit:,} allowed for {weight_bytes:,} "
            f"bytes of weights; refused before allocating"
        )


def compare_state(path: Path, expected: Shapes, stored: Shapes) -> None:
    """Stored names, shapes and dtypes must equal the ones the manifest's model has.

    Raises:
        CheckpointError: missing and unexpected names, or the first shape/dtype that differs.
    """
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path / MODEL_FILE}: the tensors do not fit the model the manifest describes: "
            f"missing {_few(missing)}; unexpected {_few(unexpected)}"
        )
    for name in sorted(expected):
        (want, wdt), (got, gdt) = expected[name], stored[name]
        if want != got or wdt != gdt:
            raise CheckpointError(
                f"{path / MODEL_FILE}: tensor '{name}' is {gdt} {list(got)}, but the model the manifest describes "
                f"needs {wdt} {list(want)}"
            )


def _few(names: list[str]) -> str:
    return (", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")) or "none"


def meta_shapes(model: nn.Module) -> Shapes:
    """Name -> (shape, safetensors dtype name) of a model's state dict."""
    names = {v: k for k, v in DTYPES.items()}
    return {n: (tuple(t.shape), names.get(t.dtype, str(t.dtype))) for n, t in model.state_dict().items()}


def check_qparams(path: Path, model: nn.Module, manifest: dict[str, Any]) -> None:
    """Scales finite (and positive unless learned), zero points inside the code range.

    Reads only these small tensors from the file, one at a time (learned QAT scales may
    cross zero: they are clamped when used, so only finiteness is required of them).

    Raises:
        CheckpointError: naming the tensor and the bad values.
    """
    quant = manifest.get("quant") or {}
    learned = bool(quant.get("learn_scales")) and quant.get("state") == "fake"
    ranges = QuantRecipe.qparam_ranges(model)
    if not ranges:
        return
    f = path / MODEL_FILE
    try:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            keys = set(st.keys())
            for name, code_range in ranges.items():
                if name not in keys:
                    continue
                if code_range is None:
                    _check_scales(f, name, st.get_tensor(name), learned)
                else:
                    _check_zeros(f, name, st.get_tensor(name), code_range)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{f}: unreadable safetensors file ({err})") from None


def _check_scales(f: Path, name: str, t: torch.Tensor, learned: bool) -> None:
    bad = ~torch.isfinite(t.float())
    if bad.any():
        raise CheckpointError(f"{f}: '{name}' holds {int(bad.sum())} non-finite scale(s) (NaN or inf)")
    if not learned and bool((t <= 0).any()):
        raise CheckpointError(f"{f}: '{name}' holds {int((t <= 0).sum())} scale(s) <= 0 (minimum {float(t.min())})")


def _check_zeros(f: Path, name: str, t: torch.Tensor, code_range: tuple[str, int, int]) -> None:
    width, lo, hi = code_range
    out = (t.long() < lo) | (t.long() > hi)
    if out.any():
        raise CheckpointError(
            f"{f}: '{name}' holds {int(out.sum())} zero point(s) outside the {width} code range "
            f"{lo}..{hi} (e.g. {int(t.long()[out][0])})"
        )


def param_group_shapes(model: nn.Module) -> list[list[tuple[int, ...]]]:
    """Shapes of the parameters per optimizer group, in the order a trainer of this model has them.

    Mirrors `train.default_param_groups` (matrices, then vectors) and, for learned QAT scales,
    `qtrain.modes.training.qat_param_groups` (scales last, in their own group).
    """
    scales = scale_parameters(model)
    ids = {id(p) for p in scales}
    groups = [[p for p in g["params"] if id(p) not in ids] for g in default_param_groups(model, TrainConfig())]
    if scales:
        groups.append(scales)
    return [[tuple(p.shape) for p in g] for g in groups]
