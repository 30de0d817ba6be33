"""Write a quantized qtrain model as a compressed-tensors directory (transformers and vLLM load it quantized).

The directory is the Hugging Face one :mod:`qtrain.export.hf` writes (``config.json``, unfused
q/k/v and gate/up, rotary rows in Hugging Face's rotate-half order, tokenizer files) with a
``quantization_config`` in ``config.json`` (format ``pack-quantized``, the one vLLM's weight-only
4- and 8-bit path reads) and, for each quantized linear, these tensors instead of ``weight``:

=================  ============================  ===============================================
tensor             dtype, shape                  from qtrain
=================  ============================  ===============================================
``weight_packed``  int32 ``[N, K * bits / 32]``  the stored codes: 4-bit codes 0..15 (implicit
                                                 zero 8) are compressed-tensors' ``q + 8``, 8-bit
                                                 codes -128..127 are stored as ``q + 128``; value
                                                 ``i`` of a row sits at bits ``i * bits`` of the
                                                 row's int32 words
``weight_scale``   bf16 ``[N, G]``               qtrain's scales, unchanged (G = 1 per channel)
``weight_shape``   int64 ``[2]``                 ``[N, K]``
=================  ============================  ===============================================

compressed-tensors computes ``q * scale`` with ``q = code - 8`` (int4) or ``q = code`` (int8):
qtrain's ``(code - zero) * scale`` exactly. Nothing is re-quantized; the rotary un-permutation
and the q/k/v and gate/up splits only move whole rows of codes and scales, so every weight
transformers dequantizes equals qtrain's bit for bit.

Schemes: int4 symmetric, group 32/64/128 (``strategy: group``; other group sizes load in
transformers but not in vLLM's kernels, and are reported) or per channel (``strategy: channel``),
and int8 per channel, weight-only. Refused (exit 2, naming what can hold them): int4 with zero
points (transformers 5 with compressed-tensors 0.20 cannot load packed zero points) and int8
dynamic activations (``int8da_int4w``). A quantized token embedding is written dequantized
(compressed-tensors quantizes linears only) and a quantized head unties it from the embedding.
Full-precision tensors are written in ``export.float_type``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtrain import __version__
from qtrain.checkpoint.write import tensor_bytes, write_dir_atomically, write_safetensors
from qtrain.config import ModelConfig
from qtrain.console import warn
from qtrain.errors import ConfigError
from qtrain.export.hf import FLOAT_TYPES, TORCH_NAMES, tokenizer_files
from qtrain.export.hf import _float_tensor as float_tensor
from qtrain.hf.config import hf_config_from_model
from qtrain.hf.weights import Slot, slots, to_halves
from qtrain.model import GPT
from qtrain.quant.embedding import TableEmbedding
from qtrain.quant.fake import FakeQuantLinear
from qtrain.quant.packed import PackedLinear
from qtrain.quant.recipe import QuantRecipe
from qtrain.quant.spec import LayerSpec, QuantizedWeight
from qtrain.tokenizer import Tokenizer

FORMAT = "pack-quantized"
"""The compressed-tensors format written (vLLM's weight-only WNA16 path reads it for 4 and 8 bits)."""
VLLM_GROUPS = (-1, 32, 64, 128)
"""Group sizes vLLM's weight-only kernels take (transformers takes any)."""

Quantized = tuple[QuantizedWeight, LayerSpec]


def pack_int32(values: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-bit values (4 or 8) along rows into int32 words as compressed-tensors does.

    Value ``i`` of a row sits at bits ``4i`` (``8i``) of the row's little-endian word stream; a
    short last word is zero-padded.

    Args:
        values: ``[rows, cols]`` integers in ``0 .. 2^bits - 1``.
        bits: 4 or 8.

    Returns:
        int32 ``[rows, ceil(cols * bits / 32)]``.
    """
    per = 32 // bits
    v = values.to(torch.int64)
    v = F.pad(v, (0, -v.shape[1] % per)).reshape(v.shape[0], -1, per)
    words = (v << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def quantized_of(mod: nn.Module, name: str) -> Quantized | None:
    """Codes, scales, zeros and spec of a quantized linear (packed or fake-quant); None if full precision.

    Raises:
        ConfigError: a scheme this format cannot hold (names the closest that can).
    """
    if not isinstance(mod, (PackedLinear, FakeQuantLinear)):
        return None
    spec = mod.spec
    if spec.activations != "none":
        raise ConfigError(
            f"{name}: quant.activations={spec.activations} (scheme {spec.scheme}): the compressed-tensors export "
            "holds weight-only schemes (int4, int8); export.format=gguf writes these int4 weights as Q4_0 "
            "(llama.cpp quantizes activations itself)"
        )
    if spec.bits not in (4, 8):
        raise ConfigError(f"{name}: {spec.bits}-bit weights have no compressed-tensors export here")
    if not spec.symmetric:
        raise ConfigError(
            f"{name}: quant.symmetric=false (int4 with zero points): compressed-tensors' loaders do not read "
            "packed zero points back reliably (transformers 5 with compressed-tensors 0.20 rejects their shape), "
            "so this export holds symmetric schemes only; quantize with quant.symmetric=true, or use "
            "export.format=gguf (Q4_1)"
        )
    qw = mod.quantized()
    return QuantizedWeight(qw.codes.detach().cpu(), qw.scales.detach().cpu(), None), spec


def weight_args(spec: LayerSpec) -> dict[str, Any]:
    """The compressed-tensors ``weights`` quantization arguments of a layer spec."""
    group = spec.group_size != -1
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": "group" if group else "channel",
        "group_size": spec.group_size if group else None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }


def scheme_label(spec: LayerSpec) -> str:
    """``int4 group 32``, ``int4 group 32 asymmetric``, ``int8 per channel``."""
    layout = "per channel" if spec.group_size == -1 else f"group {spec.group_size}"
    return f"int{spec.bits} {layout}" + ("" if spec.symmetric else " asymmetric")


def compressed_rows(q: Quantized, slot: Slot) -> dict[str, Tensor]:
    """The pack-quantized tensors of rows ``slot.start:slot.stop`` (rotary rows un-permuted when ``slot.heads``)."""
    (codes, scales, _), spec = q
    c, s = codes[slot.start : slot.stop], scales[slot.start : slot.stop]
    if slot.heads:  # whole rows move: codes and their scales together
        c, s = to_halves(c, slot.heads), to_halves(s, slot.heads)
    stored = c.to(torch.int16) + 128 if spec.bits == 8 else c  # 8-bit: compressed-tensors' q + 128
    return {
        "weight_packed": pack_int32(stored, spec.bits),
        "weight_scale": s.contiguous(),
        "weight_shape": torch.tensor(list(c.shape), dtype=torch.int64),
    }


def _head_tied(model: GPT, head: Quantized | None) -> bool:
    """Whether the export keeps the head tied to the embedding (not when only one is quantized)."""
    if not model.cfg.tie_embeddings or head is not None:
        return False
    with torch.no_grad():
        return torch.equal(float_tensor(model, "tok_emb.weight"), float_tensor(model, "lm_head.weight"))


def export_tensors(model: GPT, float_type: str) -> tuple[dict[str, Tensor], ModelConfig, dict[str, LayerSpec]]:
    """Hugging Face tensors (compressed for quantized linears), the config to export with, and the quantized modules.

    Returns:
        ``(tensors, cfg, {hf module name: spec})``.
    """
    cache: dict[str, Quantized | None] = {"lm_head": quantized_of(model.lm_head, "lm_head")}
    cfg = replace(model.cfg, tie_embeddings=_head_tied(model, cache["lm_head"]))
    tensors: dict[str, Tensor] = {}
    specs: dict[str, LayerSpec] = {}
    for hf_name, slot in slots(cfg).items():
        path, _, attr = slot.name.rpartition(".")
        q = None
        if attr == "weight" and path != "tok_emb":
            if path not in cache:
                cache[path] = quantized_of(model.get_submodule(path), path)
            q = cache[path]
        if q is None:
            with torch.no_grad():
                rows = float_tensor(model, slot.name)[slot.start : slot.stop].cpu()
            rows = to_halves(rows, slot.heads) if slot.heads else rows
            tensors[hf_name] = rows.to(FLOAT_TYPES[float_type]).contiguous()
            continue
        module = hf_name.removesuffix(".weight")
        specs[module] = q[1]
        tensors.update({f"{module}.{k}": v for k, v in compressed_rows(q, slot).items()})
    return tensors, cfg, specs


def linear_modules(cfg: ModelConfig) -> list[str]:
    """The Hugging Face names of every ``nn.Linear`` of a model of this shape (``lm_head`` included)."""
    names = [n.removesuffix(".weight") for n in slots(cfg) if n.endswith("_proj.weight")]
    return [*names, "lm_head"]


def quantization_config(specs: dict[str, LayerSpec], cfg: ModelConfig) -> dict[str, Any]:
    """``quantization_config`` for ``config.json``: one config group per distinct weight scheme.

    One scheme: ``targets: ["Linear"]`` with every full-precision linear in ``ignore`` (as
    llm-compressor writes it); several: each group lists its modules by name.
    """
    groups: dict[str, list[str]] = {}
    for module, spec in specs.items():
        groups.setdefault(json.dumps(weight_args(spec), sort_keys=True), []).append(module)
    ignore = [m for m in linear_modules(cfg) if m not in specs]
    config_groups = {
        f"group_{i}": {
            "targets": ["Linear"] if len(groups) == 1 else sorted(modules),
            "weights": json.loads(args),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
        for i, (args, modules) in enumerate(sorted(groups.items()))
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _check(path: Path, float_type: str) -> None:
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"export.float_type: '{float_type}' is not one of {list(FLOAT_TYPES)}")
    if path.exists() or path.is_symlink():
        raise ConfigError(f"out: {path} already exists; export writes a new directory and never overwrites one")


def _notes(model: GPT, specs: dict[str, LayerSpec], float_type: str) -> list[str]:
    """Warnings for a runnable but not fully compressed or not vLLM-ready export."""
    notes = []
    if isinstance(model.tok_emb, TableEmbedding):
        notes.append(
            "the token embedding is quantized; compressed-tensors quantizes linears only, so "
            f"model.embed_tokens.weight holds its dequantized values ({TORCH_NAMES[float_type]})"
        )
    groups = sorted({s.group_size for s in specs.values() if s.bits == 4 and s.group_size not in VLLM_GROUPS})
    if groups:
        notes.append(f"int4 group size {groups} loads in transformers; vLLM's kernels take group 32, 64, 128 or -1")
    return notes


def write_compressed(
    model: GPT, manifest: dict[str, Any], tokenizer: Tokenizer, path: Path, float_type: str
) -> dict[str, Any]:
    """Write a quantized ``model`` as a compressed-tensors directory at ``path`` (new; atomic).

    Args:
        model: a quantized model (packed or fake-quant linears).
        manifest: its checkpoint's (or import's) manifest: ``quant``, ``imported_from`` special tokens.
        tokenizer: the model's tokenizer.
        path: the directory to create.
        float_type: ``f32`` | ``f16`` | ``bf16``, for the full-precision tensors.

    Returns:
        A report: format, out, model_type, quantized layers, schemes, tensors, bytes, float_type, notes.

    Raises:
        ConfigError: ``path`` exists, an unknown float type, a full-precision model, or a scheme
            this format cannot hold.
    """
    _check(path, float_type)
    tensors, cfg, specs = export_tensors(model, float_type)
    if not specs:
        raise ConfigError(
            "export.format=compressed-tensors: the model has no quantized linear layers; "
            "export.format=hf writes a full-precision model"
        )
    imported = manifest.get("imported_from") or {}
    special = dict(imported.get("special_tokens") or {})
    config = hf_config_from_model(cfg, special, TORCH_NAMES[float_type], imported.get("model_type"))
    config["quantization_config"] = quantization_config(specs, cfg)
    recipe = QuantRecipe.from_manifest(manifest.get("quant"))
    config["qtrain"] = {"version": __version__, "quantized": None if recipe.full_precision else recipe.label}
    gen = {"_from_model_config": True, **{k: v for k, v in special.items() if v is not None}}
    files = {"config.json": _json(config), "generation_config.json": _json(gen)}
    files.update(tokenizer_files(tokenizer, cfg.block_size))

    def write(tmp: Path) -> None:
        write_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for name, data in files.items():
            with (tmp / name).open("xb") as f:
                f.write(data)

    write_dir_atomically(path, write, tensor_bytes(tensors))
    notes = _notes(model, specs, float_type)
    for note in notes:
        warn(f"export: {note}")
    return {
        "format": "compressed-tensors",
        "out": str(path),
        "model_type": config["model_type"],
        "quantized_layers": len(specs),
        "schemes": sorted({scheme_label(s) for s in specs.values()}),
        "tensors": len(tensors),
        "bytes": sum(p.stat().st_size for p in path.iterdir()),
        "float_type": float_type,
        "tied": cfg.tie_embeddings,
        "notes": notes,
    }


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
