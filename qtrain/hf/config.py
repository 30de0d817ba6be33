"""Hugging Face ``config.json`` <-> :class:`~qtrain.config.ModelConfig`, refusing what qtrain cannot run exactly.

Import maps Llama, Mistral, Qwen2 and Qwen3 configs (the old ``rope_theta`` / ``rope_scaling``
keys and transformers 5's ``rope_parameters`` alike). Whatever the model cannot represent exactly
(another architecture, rope scaling other than llama3, a sliding window in use, experts, a
partial rotary, another activation, biases qtrain does not have) is refused with a
:class:`~qtrain.errors.ConfigError` (exit 2) naming the config key and its value. A sliding
window is no obstacle when the imported context (``model.block_size``, else
``max_position_embeddings``) fits inside it: then every token sees its whole context, exactly
full attention.

Export writes the config of a qtrain model as the architecture that runs it: ``qwen2`` with
attention biases, ``qwen3`` with q/k norms, ``llama`` otherwise (a byte-level qtrain model too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtrain.config import ModelConfig
from qtrain.errors import ConfigError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""model_type -> the architecture qtrain imports for it."""
MOE_KEYS = ("num_local_experts", "num_experts", "num_experts_per_tok", "n_routed_experts", "moe_intermediate_size")
"""Keys whose presence (non-empty) means a mixture-of-experts model."""
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face model directory, as a dict.

    Raises:
        ConfigError: missing, too large, or not a JSON object.
    """
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"init_from: {path} holds no config.json; a Hugging Face model directory is expected")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{file}: {file.stat().st_size} bytes is too large for a model config")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: not a JSON object")
    return data


def _refuse(where: str, key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: {key}={json.dumps(value)} is not supported: {why}")


def _int(hf: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = hf.get(key, default)
    if type(value) is not int or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer (got {json.dumps(value)})")
    return value


def check_architecture(hf: dict[str, Any], where: str) -> str:
    """The model_type, after checking it and ``architectures`` are ones qtrain imports.

    Raises:
        ConfigError: naming the key and value.
    """
    mtype = hf.get("model_type")
    if mtype not in ARCHITECTURES:
        raise _refuse(where, "model_type", mtype, f"qtrain imports {', '.join(sorted(ARCHITECTURES))}")
    archs = hf.get("architectures") or [ARCHITECTURES[mtype]]
    if archs != [ARCHITECTURES[mtype]]:
        raise _refuse(where, "architectures", archs, f"a {mtype} model imports as [{ARCHITECTURES[mtype]!r}]")
    for key in MOE_KEYS:
        if hf.get(key):
            raise _refuse(where, key, hf[key], "mixture-of-experts models are not supported")
    quantized = hf.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else quantized
        why = "the checkpoint is already quantized by another tool; import its full-precision original"
        raise _refuse(where, "quantization_config.quant_method", method, why)
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", hf["hidden_act"], "qtrain's MLP is SwiGLU (silu)")
    return mtype


def _check_window(hf: dict[str, Any], mtype: str, where: str, block_size: int | None) -> None:
    """Refuse sliding-window attention that takes effect within the context.

    A window of ``W`` lets token ``i`` see tokens ``i - W + 1 .. i``: with a context of at most
    ``W`` tokens (``block_size``, else ``max_position_embeddings``) that is every earlier token,
    so the model is exactly full attention and is imported.
    """
    context = hf.get("max_position_embeddings")
    if block_size is not None and (type(context) is not int or block_size < context):
        context = block_size  # a shorter context asked for at import (a longer one is refused later)
    window = hf.get("sliding_window")
    in_use = mtype == "mistral" or hf.get("use_sliding_window", False)
    if not in_use or window is None:
        other = sorted({t for t in hf.get("layer_types") or [] if t != "full_attention"})
        if other and in_use:
            raise _refuse(where, "layer_types", other, "only full_attention layers are supported")
        return
    if type(window) is not int or window <= 0:
        raise ConfigError(f"{where}: sliding_window must be a positive integer or null (got {json.dumps(window)})")
    if type(context) is not int or window < context:
        raise _refuse(
            where,
            "sliding_window",
            window,
            f"sliding-window attention is not implemented (full attention only); it never takes effect "
            f"within a context of at most {window} tokens: import with model.block_size={window} or less",
        )


def _check_biases(hf: dict[str, Any], mtype: str, where: str) -> tuple[bool, bool]:
    """(attn_bias, qk_norm) of the architecture; refuse biases qtrain has no place for."""
    if hf.get("mlp_bias"):
        raise _refuse(where, "mlp_bias", hf["mlp_bias"], "qtrain's MLP projections have no biases")
    if mtype != "qwen2" and hf.get("attention_bias"):
        why = "it adds biases to the output projection too; qtrain has q/k/v biases only (Qwen2)"
        raise _refuse(where, "attention_bias", hf["attention_bias"], why)
    return mtype == "qwen2", mtype == "qwen3"


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig's rope fields from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if not isinstance(params, dict):
        params, key = dict(hf.get("rope_scaling") or {}), "rope_scaling"
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if params and all(isinstance(v, dict) for v in params.values()):
        raise _refuse(where, key, sorted(params), "per-layer-type rotary settings are not supported")
    rtype = params.get("rope_type", params.get("type")) or "default"
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _refuse(where, "partial_rotary_factor", partial, "qtrain rotates every dimension of a head")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta < 1:
        raise _refuse(where, f"{key}.rope_theta", theta, "it must be a number >= 1")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rtype == "default":
        return out
    if rtype != "llama3":
        raise _refuse(where, f"{key}.rope_type", rtype, "qtrain implements the rope types default and llama3")
    try:
        out.update(
            rope_scaling="llama3",
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_context=int(params["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {key} of rope_type llama3 lacks or misstates {err}") from None
    return out


def model_config_from_hf(hf: dict[str, Any], where: str, block_size: int | None = None) -> ModelConfig:
    """The qtrain model of a Hugging Face config (``where``: the file, for messages).

    ``block_size`` is ``max_position_embeddings`` (a smaller ``model.block_size`` may be asked
    for at import: pass it as ``block_size`` so that a sliding window it fits in is accepted;
    the returned config keeps ``max_position_embeddings``, :func:`qtrain.hf.load.import_config`
    shortens it); ``head_dim`` and ``n_kv_head`` are left None when they equal the defaults.

    Raises:
        ConfigError: anything qtrain cannot run exactly, naming the key and value.
    """
    mtype = check_architecture(hf, where)
    for key in REQUIRED:
        _int(hf, key, where)
    _check_window(hf, mtype, where, block_size)
    attn_bias, qk_norm = _check_biases(hf, mtype, where)
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    n_kv = _int(hf, "num_key_value_heads", where, n_head) if hf.get("num_key_value_heads") is not None else n_head
    if n_head % n_kv:
        raise _refuse(where, "num_key_value_heads", n_kv, f"it must divide num_attention_heads={n_head}")
    default_hd = n_embd // n_head if n_embd % n_head == 0 else None
    hd = _int(hf, "head_dim", where) if hf.get("head_dim") is not None else default_hd
    if hd is None or hd % 2:
        raise _refuse(where, "head_dim", hd, "rotary needs an even head width")
    eps = hf.get("rms_norm_eps", 1e-6)
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise _refuse(where, "tie_word_embeddings", tie, "it must be true or false")
    return ModelConfig(
        name=f"hf-{mtype}",
        n_layer=hf["num_hidden_layers"],
        n_embd=n_embd,
        n_head=n_head,
        block_size=_int(hf, "max_position_embeddings", where, 2048),
        mlp_hidden=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        tie_embeddings=tie,
        norm_eps=float(eps),
        n_kv_head=None if n_kv == n_head else n_kv,
        head_dim=None if hd == default_hd else hd,
        attn_bias=attn_bias,
        qk_norm=qk_norm,
        **_rope(hf, where),
    )


def export_model_type(cfg: ModelConfig, imported: str | None = None) -> str:
    """The Hugging Face architecture that runs a qtrain model exactly (``imported``: the one it came as).

    An imported Mistral goes back as ``mistral`` (its layers are Llama's without a sliding window).

    Raises:
        ConfigError: q/k/v biases together with q/k norms (no Hugging Face architecture has both alone).
    """
    if cfg.attn_bias and cfg.qk_norm:
        raise ConfigError(
            "export.format=hf: a model with both attn_bias and qk_norm has no Hugging Face architecture "
            "(Qwen2 has the biases, Qwen3 the norms)"
        )
    mtype = "qwen2" if cfg.attn_bias else "qwen3" if cfg.qk_norm else "llama"
    return "mistral" if mtype == "llama" and imported == "mistral" else mtype


def hf_config_from_model(
    cfg: ModelConfig, special: dict[str, Any], dtype: str, imported: str | None = None
) -> dict[str, Any]:
    """``config.json`` content for a qtrain model.

    Args:
        cfg: the model.
        special: bos/eos/pad token ids (None when unknown).
        dtype: the torch name of the weights' type.
        imported: the model_type the model was imported as, if any.
    """
    mtype = export_model_type(cfg, imported)
    rope: dict[str, Any] | None = None
    if cfg.rope_scaling == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_context,
        }
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[mtype]],
        "model_type": mtype,
        "hidden_act": "silu",
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads(),
        "head_dim": cfg.head_size(),
        "max_position_embeddings": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
        "use_cache": True,
        **{k: special.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    }
    if mtype == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif mtype == "qwen3":
        out["attention_bias"] = False
    if mtype == "mistral":
        out["sliding_window"] = None
    elif mtype != "llama":
        out.update(use_sliding_window=False, sliding_window=None)
    return out
