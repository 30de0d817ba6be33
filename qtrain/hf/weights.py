"""Weight names and layouts between Hugging Face Llama-family checkpoints and qtrain's GPT.

Each Hugging Face tensor fills a block of rows of one qtrain parameter: ``q_proj``, ``k_proj``
and ``v_proj`` are stacked into ``attn.qkv`` (all q heads, then k, then v), ``gate_proj`` and
``up_proj`` into ``mlp.gate_up``. Rotary: Hugging Face rotates the halves of a head (dims j and
j + d/2), qtrain adjacent pairs (2j, 2j + 1), so q and k rows (their biases, and the q/k norm
weights) are permuted per head on import (:func:`to_adjacent`) and back on export
(:func:`to_halves`). Both permutations only move rows: no value changes, so the round trip
is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtrain.config import ModelConfig

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Tensors some older checkpoints carry that are recomputed, not weights (skipped on import)."""


@dataclass(frozen=True)
class Slot:
    """Where one Hugging Face tensor goes: rows ``start:stop`` of qtrain parameter ``name``.

    ``heads``: permute the rows per head from halves to adjacent pairs (q/k; 0: no permutation).
    """

    name: str
    start: int
    stop: int
    heads: int = 0


def to_adjacent(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half rows -> qtrain's pairs, per head: row 2j <- j, row 2j+1 <- j + d/2."""
    d = t.shape[0] // heads
    return t.reshape(heads, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def to_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`to_adjacent` (export): row j <- 2j, row j + d/2 <- 2j+1, per head."""
    d = t.shape[0] // heads
    return t.reshape(heads, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _layer_slots(cfg: ModelConfig, i: int) -> dict[str, Slot]:
    hd, nq, nk, h = cfg.head_size(), cfg.n_head, cfg.kv_heads(), cfg.mlp_hidden
    src, dst = f"model.layers.{i}.", f"blocks.{i}."
    q, k = nq * hd, (nq + nk) * hd
    v = (nq + 2 * nk) * hd
    slots = {
        src + "input_layernorm.weight": Slot(dst + "attn_norm.weight", 0, cfg.n_embd),
        src + "post_attention_layernorm.weight": Slot(dst + "mlp_norm.weight", 0, cfg.n_embd),
        src + "self_attn.o_proj.weight": Slot(dst + "attn.out.weight", 0, cfg.n_embd),
        src + "mlp.gate_proj.weight": Slot(dst + "mlp.gate_up.weight", 0, h),
        src + "mlp.up_proj.weight": Slot(dst + "mlp.gate_up.weight", h, 2 * h),
        src + "mlp.down_proj.weight": Slot(dst + "mlp.down.weight", 0, cfg.n_embd),
    }
    kinds = ("weight", "bias") if cfg.attn_bias else ("weight",)
    for kind in kinds:
        slots[f"{src}self_attn.q_proj.{kind}"] = Slot(f"{dst}attn.qkv.{kind}", 0, q, nq)
        slots[f"{src}self_attn.k_proj.{kind}"] = Slot(f"{dst}attn.qkv.{kind}", q, k, nk)
        slots[f"{src}self_attn.v_proj.{kind}"] = Slot(f"{dst}attn.qkv.{kind}", k, v)
    if cfg.qk_norm:
        slots[src + "self_attn.q_norm.weight"] = Slot(dst + "attn.q_norm.weight", 0, hd, 1)
        slots[src + "self_attn.k_norm.weight"] = Slot(dst + "attn.k_norm.weight", 0, hd, 1)
    return slots


def slots(cfg: ModelConfig) -> dict[str, Slot]:
    """Every Hugging Face tensor name of a model of this shape -> its :class:`Slot`.

    ``lm_head.weight`` is listed only for an untied model (a tied one may still carry it:
    the importer checks it equals the embedding).
    """
    out = {
        "model.embed_tokens.weight": Slot("tok_emb.weight", 0, cfg.vocab_size),
        "model.norm.weight": Slot("norm.weight", 0, cfg.n_embd),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = Slot("lm_head.weight", 0, cfg.vocab_size)
    for i in range(cfg.n_layer):
        out.update(_layer_slots(cfg, i))
    return out


def hf_shape(slot: Slot, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the Hugging Face tensor of ``slot`` must have (its rows of the qtrain parameter)."""
    return (slot.stop - slot.start, *param_shape[1:])


def to_qtrain(t: torch.Tensor, slot: Slot) -> torch.Tensor:
    """A Hugging Face tensor in qtrain's row order (rotary rows permuted when ``slot.heads``)."""
    return to_adjacent(t, slot.heads) if slot.heads else t


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """qtrain float weights (``name -> tensor``) as Hugging Face tensors: unfused, rotary rows un-permuted.

    A tied model gets no ``lm_head.weight`` (``tie_word_embeddings`` says to share the embedding).
    """
    out: dict[str, torch.Tensor] = {}
    for hf_name, slot in slots(cfg).items():
        rows = state[slot.name][slot.start : slot.stop]
        out[hf_name] = (to_halves(rows, slot.heads) if slot.heads else rows).contiguous()
    return out
