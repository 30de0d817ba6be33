"""Write a qtrain model as a Hugging Face model directory that ``transformers`` loads with ``from_pretrained``.

The directory holds ``config.json`` (``llama``, or ``qwen2`` with attention biases, ``qwen3``
with q/k norms), ``model.safetensors`` (unfused q/k/v and gate/up, rotary rows back in
Hugging Face's rotate-half order, in ``export.float_type``), ``generation_config.json`` and
the tokenizer's files. A quantized model is written dequantized (what its codes and scales
compute, in floating point): the console, ``config.json`` (``qtrain.dequantized_from``) and a
README line say so. The directory is filled as a temporary sibling and renamed into place;
an existing ``out`` is never touched.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtrain import __version__
from qtrain.checkpoint.write import tensor_bytes, write_dir_atomically, write_safetensors
from qtrain.config import ModelConfig
from qtrain.errors import ConfigError
from qtrain.hf.config import hf_config_from_model
from qtrain.hf.weights import slots, to_hf
from qtrain.model import GPT
from qtrain.quant.embedding import TableEmbedding
from qtrain.quant.fake import FakeQuantLinear
from qtrain.quant.packed import PackedLinear
from qtrain.quant.recipe import QuantRecipe
from qtrain.tokenizer import Tokenizer

FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TORCH_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _float_tensor(model: GPT, name: str) -> torch.Tensor:
    """The float value of parameter ``name`` as the model computes with it (dequantized if quantized)."""
    path, _, attr = name.rpartition(".")
    mod: nn.Module = model.get_submodule(path)
    if isinstance(mod, TableEmbedding):
        mod = mod.table_module()
    if attr == "bias":
        bias = getattr(mod, "bias", None)
        if bias is None:
            raise ValueError(f"{path} has no bias")
        return bias.detach().float()
    if isinstance(mod, PackedLinear):
        return mod.dequantize().float()
    if isinstance(mod, FakeQuantLinear):
        return mod.fake_weight().detach().float()
    return getattr(mod, attr).detach().float()


def float_state(model: GPT) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Every qtrain weight in float32 (dequantized), and the config to export it with.

    A model whose embedding and head are tied in shape but no longer equal (only one of them
    quantized) is exported untied.
    """
    cfg = model.cfg
    names = {s.name for s in slots(replace(cfg, tie_embeddings=False)).values()}
    with torch.no_grad():
        state = {n: _float_tensor(model, n).cpu() for n in sorted(names)}
    if cfg.tie_embeddings and not torch.equal(state["tok_emb.weight"], state["lm_head.weight"]):
        cfg = replace(cfg, tie_embeddings=False)
    return state, cfg


def tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, bytes]:
    """``tokenizer.json`` (any kind: bytes and bpe as a byte-level BPE) and a ``tokenizer_config.json``."""
    files = dict(tokenizer.files()) or {"tokenizer.json": tokenizer.hf_json()}
    if "tokenizer_config.json" not in files:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size}
        files["tokenizer_config.json"] = json.dumps(config, indent=2).encode()
    return files


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)


def write_hf(model: GPT, manifest: dict[str, Any], tokenizer: Tokenizer, path: Path, float_type: str) -> dict[str, Any]:
    """Write ``model`` as a Hugging Face directory at ``path`` (new; atomic).

    Args:
        model: the model (full precision, fake-quant or packed).
        manifest: its checkpoint's (or import's) manifest: ``quant``, ``imported_from`` special tokens.
        tokenizer: the model's tokenizer.
        path: the directory to create.
        float_type: ``f32`` | ``f16`` | ``bf16``.

    Returns:
        A report: format, out, model_type, tensors, bytes, float_type, dequantized_from.

    Raises:
        ConfigError: ``path`` exists, an unknown float type, or no Hugging Face architecture fits.
    """
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"export.float_type: '{float_type}' is not one of {list(FLOAT_TYPES)}")
    if path.exists() or path.is_symlink():
        raise ConfigError(f"out: {path} already exists; export writes a new directory and never overwrites one")
    state, cfg = float_state(model)
    imported = manifest.get("imported_from") or {}
    special = dict(imported.get("special_tokens") or {})
    config = hf_config_from_model(cfg, special, TORCH_NAMES[float_type], imported.get("model_type"))
    recipe = QuantRecipe.from_manifest(manifest.get("quant"))
    dequantized = None if recipe.full_precision else recipe.label
    if dequantized is None and QuantRecipe.layers_of(model):  # quantized, but the manifest does not say how
        dequantized = "quantized layers"
    config["qtrain"] = {"version": __version__, "dequantized_from": dequantized}
    tensors = {k: v.to(FLOAT_TYPES[float_type]) for k, v in to_hf(state, cfg).items()}
    del state
    gen = {"_from_model_config": True, **{k: v for k, v in special.items() if v is not None}}
    files = {"config.json": _json(config), "generation_config.json": _json(gen)}
    files.update(tokenizer_files(tokenizer, cfg.block_size))
    if dequantized:
        files["README.md"] = (
            f"Exported by qtrain {__version__} from a {dequantized} checkpoint: the weights are its codes and "
            f"scales dequantized to {TORCH_NAMES[float_type]} (full-precision tensors, quantized values).\n"
        ).encode()

    def write(tmp: Path) -> None:
        write_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for name, data in files.items():
            _write(tmp / name, data)

    write_dir_atomically(path, write, tensor_bytes(tensors))
    return {
        "format": "hf",
        "out": str(path),
        "model_type": config["model_type"],
        "tensors": len(tensors),
        "bytes": sum(p.stat().st_size for p in path.iterdir()),
        "float_type": float_type,
        "dequantized_from": dequantized,
        "tied": cfg.tie_embeddings,
    }
