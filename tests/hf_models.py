"""Tiny Hugging Face models made locally with `transformers` (random weights, `save_pretrained`).

No model can be downloaded in the tests, so each is built from a config: a Llama with GQA
(8 query heads, 2 key/value heads, untied, saved sharded), a Mistral with one key/value head
(no sliding window), a Qwen2 with attention biases (tied), a Qwen3 with q/k norms and an explicit
head_dim, and a tied Llama with Llama 3.1 rope scaling. Their tokenizer is a
byte-level BPE trained by qtrain on a slice of the test corpus; the model's vocabulary is
that tokenizer's size. Weights are drawn with a larger spread than transformers' default
(std 0.02 gives logits of about 1e-3, too flat to compare anything), and biases and norm
weights are made non-trivial so that a wrong mapping or permutation shows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.conftest import SHARED_DATA

BLOCK = 64
"""max_position_embeddings of the tiny models (qtrain's block_size after import)."""


def tokenizer_json(vocab: int = 320) -> bytes:
    """A byte-level BPE tokenizer.json trained on the first 200 kB of the test corpus."""
    from qtrain.tokenizer import train_bpe

    text = SHARED_DATA.read_bytes()[:200_000]
    return train_bpe(text, vocab, 0).files()["tokenizer.json"]


def _common(vocab: int) -> dict[str, Any]:
    return {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "vocab_size": vocab,
        "max_position_embeddings": BLOCK,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.1,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def _llama_gqa(vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_common(vocab), num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _llama3_rope(vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    cfg = LlamaConfig(**_common(vocab), num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                      rope_parameters=rope)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _mistral_mqa(vocab: int) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**_common(vocab), num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
                        tie_word_embeddings=False)  # fmt: skip
    return MistralForCausalLM(cfg)


def _qwen2_bias(vocab: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**_common(vocab), num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def _qwen3_norm(vocab: int) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**_common(vocab), num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                      tie_word_embeddings=False)  # fmt: skip
    return Qwen3ForCausalLM(cfg)


MODELS: dict[str, tuple[Callable[[int], Any], dict[str, Any]]] = {
    "llama_gqa": (_llama_gqa, {"max_shard_size": "40KB"}),
    "mistral_mqa": (_mistral_mqa, {}),
    "qwen2_bias": (_qwen2_bias, {}),
    "qwen3_norm": (_qwen3_norm, {}),
    "llama3_rope": (_llama3_rope, {}),
}
"""name -> (builder, save_pretrained options): llama_gqa is saved sharded."""


def make(name: str, out: Path, seed: int = 0) -> Any:
    """Build model `name` with random weights, save it (and the tokenizer) to `out`; return it (eval, float32)."""
    from qtrain.tokenizer import Tokenizer

    tok = tokenizer_json()
    vocab = Tokenizer("hf", tok).vocab_size
    torch.manual_seed(seed)
    build, save = MODELS[name]
    model = build(vocab).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if pname.endswith("norm.weight") else 0.5 * torch.randn_like(p))
    model.save_pretrained(out, **save)
    (out / "tokenizer.json").write_bytes(tok)
    return model
