"""The GPT: one Llama-style decoder built from a ModelConfig.

RMSNorm, rotary positions, SwiGLU MLP, causal ``scaled_dot_product_attention``, no biases,
tied or untied embeddings. Every projection is a plain ``nn.Linear`` (fused ``qkv`` and
``gate_up``); the model knows nothing about quantization, which swaps those modules.

Example:
    >>> from qtrain.config import ModelConfig
    >>> model = GPT(ModelConfig())
    >>> logits = model(torch.zeros(1, 8, dtype=torch.long))  # (1, 8, 256)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qtrain.config import ModelConfig


def rope_tables(head_dim: int, n_pos: int, theta: float) -> torch.Tensor:
    """Rotations e^{i * pos * freq} as a complex64 table of shape (n_pos, head_dim // 2)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(ang), ang)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of (B, T, ..., D) by `rot` (T, D/2), in float32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())  # (B, T, ..., D/2)
    shape = (1, rot.shape[0]) + (1,) * (pairs.dim() - 3) + (rot.shape[1],)
    return torch.view_as_real(pairs * rot.view(shape)).flatten(-2).type_as(x)


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, H, T_max, D) each."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """Allocate a cache for `batch` sequences of up to cfg.block_size tokens."""
        shape = (cfg.n_layer, batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary positions and an optional KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.out = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rot: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim)
        q, k = apply_rope(qkv[:, :, :2], rot).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each, rotated together
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            ck, cv = cache
            ck[:, :, start : start + t] = k
            cv[:, :, start : start + t] = v
            k, v = ck[:, :, : start + t], cv[:, :, : start + t]
            if t == 1:
                y = F.scaled_dot_product_attention(q, k, v)
            elif start == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # chunk after a prefix: query i sees keys 0..start+i
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


def _rms(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` without the module call (the decode path runs 2 per layer per token)."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rot: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rot, cache, start)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x: torch.Tensor, rot: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, pos: int) -> torch.Tensor:
        """One new token per sequence: ``x`` (B, C) at position ``pos``; updates the layer's cache.

        The same math as :meth:`forward` with a cache and ``T = 1`` (rotary in float32, keys and
        values written at ``pos``, attention over ``0..pos``), in about half the tensor ops: at
        decode every op is a fixed cost paid per layer per token.
        """
        attn, mlp = self.attn, self.mlp
        b, c = x.shape
        h, d = attn.n_head, attn.head_dim
        qkv = attn.qkv(_rms(self.attn_norm, x))  # (B, 3C)
        pairs = torch.view_as_complex(qkv[:, : 2 * c].float().reshape(b, 2, h, d // 2, 2))
        qk = torch.view_as_real(pairs * rot).reshape(b, 2, h, 1, d).to(ck.dtype)
        ck[:, :, pos] = qk[:, 1, :, 0]
        cv[:, :, pos] = qkv[:, 2 * c :].reshape(b, h, d)
        y = F.scaled_dot_product_attention(qk[:, 0], ck[:, :, : pos + 1], cv[:, :, : pos + 1])  # (B, H, 1, D)
        x = x + attn.out(y.reshape(b, c))
        gate, up = mlp.gate_up(_rms(self.mlp_norm, x)).chunk(2, dim=-1)
        return x + mlp.down(F.silu(gate) * up)


class GPT(nn.Module):
    """Decoder-only language model over byte tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False
        """Recompute each block's activations in the backward pass instead of keeping them
        (``train.activation_checkpointing``; the trainer sets it). Training forwards only: the
        result is the same, the memory for activations drops to one block's plus each block's
        input, at the cost of a second forward per block."""
        self.register_buffer(
            "rope", rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta), persistent=False
        )

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Move/cast like nn.Module, but the complex rope table only changes device.

        ``model.to(torch.bfloat16)`` would otherwise cast the complex64 table to a real dtype
        and silently drop the sine half of every rotation.
        """
        rope = self._buffers.pop("rope")
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=rope.device)).device
            if rope.is_meta and device.type != "meta":  # built on the meta device: compute it now
                c = self.cfg
                rope = rope_tables(c.n_embd // c.n_head, c.block_size, c.rope_theta)
            self._buffers["rope"] = rope.to(device)
        return self

    def init_weights(self, seed: int) -> None:
        """Deterministic init: N(0, 0.02), residual outputs scaled by 1/sqrt(2 * n_layer)."""
        gen = torch.Generator().manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = resid_std if name.endswith(("attn.out.weight", "mlp.down.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for mod in self.modules():
            if isinstance(mod, nn.RMSNorm):
                nn.init.ones_(mod.weight)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens `idx` (B, T) at positions start..start+T-1."""
        t = idx.shape[1]
        if start + t > self.cfg.block_size:
            raise ValueError(f"sequence of {start + t} tokens exceeds model.block_size={self.cfg.block_size}")
        rot = self.get_buffer("rope")[start : start + t]
        x = self.tok_emb(idx)
        recompute = self.activation_checkpointing and cache is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, rot, use_reentrant=False)
                continue
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x = block(x, rot, layer_cache, start)
        return self.lm_head(self.norm(x))

    def decode_step(self, idx: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Logits (B, vocab) of one new token per sequence, ``idx`` (B, 1) at position ``pos``.

        Equal (to float rounding) to ``self(idx, cache, pos)[:, -1]``, through
        :meth:`Block.decode`; the loop that decoding tokens/s measures.
        """
        if pos + 1 > self.cfg.block_size:
            raise ValueError(f"sequence of {pos + 1} tokens exceeds model.block_size={self.cfg.block_size}")
        rot = self.get_buffer("rope")[pos]  # (D/2,) complex
        x = self.tok_emb(idx[:, -1])  # (B, C)
        for i, block in enumerate(self.blocks):
            x = block.decode(x, rot, cache.k[i], cache.v[i], pos)  # type: ignore[operator]
        return self.lm_head(_rms(self.norm, x))

    def n_params(self) -> int:
        """Parameter count with tied weights counted once (packed buffers included by numel)."""
        seen: set[int] = set()
        total = 0
        for t in list(self.parameters()) + [b for n, b in self.named_buffers() if n != "rope"]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        return total
