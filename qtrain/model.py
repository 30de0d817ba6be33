"""The GPT: one Llama-style decoder built from a ModelConfig.

RMSNorm, rotary positions (adjacent pairs; optional Llama 3.1 frequency scaling), SwiGLU MLP,
causal ``scaled_dot_product_attention`` with grouped-query heads (``n_kv_head``), optional
q/k/v biases (Qwen2) and q/k RMSNorm (Qwen3), tied or untied embeddings. Every projection
is a plain ``nn.Linear`` (fused ``qkv``: all q heads, then all k heads, then all v heads;
fused ``gate_up``: gate rows, then up rows); the model knows nothing about quantization,
which swaps those modules.

Example:
    >>> from qtrain.config import ModelConfig
    >>> model = GPT(ModelConfig())
    >>> logits = model(torch.zeros(1, 8, dtype=torch.long))  # (1, 8, 256)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qtrain.config import ModelConfig


def llama3_frequencies(inv: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1 rotary scaling of the inverse frequencies `inv` (float32), as transformers'
    ``_compute_llama3_parameters``: wavelengths over ``rope_original_context / rope_low_freq_factor``
    are divided by ``rope_factor``, those under ``.../rope_high_freq_factor`` kept, the ones
    between interpolated smoothly (the same float32 operations, so the same table)."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_context
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(head_dim: int, n_pos: int, theta: float, scaling: ModelConfig | None = None) -> torch.Tensor:
    """Rotations e^{i * pos * freq} as a complex64 table of shape (n_pos, head_dim // 2).

    ``scaling``: a config whose ``rope_scaling`` (none | llama3) rescales the frequencies.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None and scaling.rope_scaling == "llama3":
        inv = llama3_frequencies(inv, scaling)
    ang = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(ang), ang)


def model_rope(cfg: ModelConfig) -> torch.Tensor:
    """The rotary table a model of `cfg` uses: (block_size, head_size // 2) complex64."""
    return rope_tables(cfg.head_size(), cfg.block_size, cfg.rope_theta, cfg)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of (B, T, ..., D) by `rot` (T, D/2), in float32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())  # (B, T, ..., D/2)
    shape = (1, rot.shape[0]) + (1,) * (pairs.dim() - 3) + (rot.shape[1],)
    return torch.view_as_real(pairs * rot.view(shape)).flatten(-2).type_as(x)


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, n_kv_head, T_max, head_size) each."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """Allocate a cache for `batch` sequences of up to cfg.block_size tokens."""
        shape = (cfg.n_layer, batch, cfg.kv_heads(), cfg.block_size, cfg.head_size())
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class Attention(nn.Module):
    """Causal self-attention (grouped-query when n_kv_head < n_head) with rotary positions and
    an optional KV cache; ``qkv`` rows are all q heads, then all k heads, then all v heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads(), cfg.head_size()
        self.gqa = self.n_kv_head != self.n_head
        """SDPA shares each k/v head among n_head / n_kv_head query heads (``enable_gqa``)."""
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.attn_bias)
        self.out = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        """RMSNorm of each q and k head of ``qk`` (..., n_head + n_kv_head, D) with ``qk_norm``."""
        if self.q_norm is None or self.k_norm is None:
            return qk
        q, k = qk.split((self.n_head, self.n_kv_head), dim=-2)
        return torch.cat((_rms(self.q_norm, q), _rms(self.k_norm, k)), dim=-2)

    def forward(
        self,
        x: torch.Tensor,
        rot: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        nq, nk, d = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x)
        qk = apply_rope(self.norm_qk(qkv[..., : (nq + nk) * d].view(b, t, nq + nk, d)), rot)  # rotated together
        q, k = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = qkv[..., (nq + nk) * d :].view(b, t, nk, d).transpose(1, 2)
        sdpa = partial(F.scaled_dot_product_attention, enable_gqa=self.gqa)
        if cache is None:
            y = sdpa(q, k, v, is_causal=True)
        else:
            ck, cv = cache
            ck[:, :, start : start + t] = k
            cv[:, :, start : start + t] = v
            k, v = ck[:, :, : start + t], cv[:, :, : start + t]
            if t == 1:
                y = sdpa(q, k, v)
            elif start == 0:
                y = sdpa(q, k, v, is_causal=True)
            else:  # chunk after a prefix: query i sees keys 0..start+i
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = sdpa(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, nq * d))


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
        b = x.shape[0]
        nq, nk, d = attn.n_head, attn.n_kv_head, attn.head_dim
        qkv = attn.qkv(_rms(self.attn_norm, x))  # (B, (nq + 2 nk) D)
        qk = attn.norm_qk(qkv[:, : (nq + nk) * d].view(b, nq + nk, d))
        pairs = torch.view_as_complex(qk.float().reshape(b, nq + nk, d // 2, 2))
        qk = torch.view_as_real(pairs * rot).reshape(b, nq + nk, 1, d).to(ck.dtype)
        ck[:, :, pos] = qk[:, nq:, 0]
        cv[:, :, pos] = qkv[:, (nq + nk) * d :].reshape(b, nk, d)
        q, keys, values = qk[:, :nq], ck[:, :, : pos + 1], cv[:, :, : pos + 1]
        y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=attn.gqa)  # (B, H, 1, D)
        x = x + attn.out(y.reshape(b, nq * d))
        gate, up = mlp.gate_up(_rms(self.mlp_norm, x)).chunk(2, dim=-1)
        return x + mlp.down(F.silu(gate) * up)


class GPT(nn.Module):
    """Decoder-only language model over token ids (bytes or a subword vocabulary)."""

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
        self.register_buffer("rope", model_rope(cfg), persistent=False)

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
                rope = model_rope(self.cfg)
            self._buffers["rope"] = rope.to(device)
        return self

    def init_weights(self, seed: int) -> None:
        """Deterministic init: N(0, 0.02), residual outputs scaled by 1/sqrt(2 * n_layer), biases 0."""
        gen = torch.Generator().manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith(".bias"):
                    nn.init.zeros_(p)
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
