"""Decode near the memory bound: static KV cache, static shapes, the whole step as one CUDA graph.

:class:`FastDecoder` is batch-1 greedy decoding (the same tokens as
:class:`qtrain.evaluate.GreedyDecoder`) through one static-shape step:

- the KV cache is preallocated for ``max_len`` positions (rounded up to 64, at most the
  context); attention runs over all of it with the mask ``positions <= pos``;
- the position and the token are device tensors, updated in place by the step itself;
- each block's math is one function of plain tensors (:func:`make_block_step`: RMSNorm,
  the q/k norms when the model has them, rotary in float32 from cos/sin tables,
  ``index_copy_`` into the cache, grouped-query SDPA, SwiGLU) and
  its linears follow :func:`qtrain.quant.cuda.linear.plan_linear` (int8: a fused int8 GEMV
  under ``coordinate_descent_tuning``; int4: tinygemm). On CUDA it is compiled once per
  distinct block layout (``fullgraph=True``, every layer reuses the graph: regional
  compilation), and the whole step (embedding, 20 compiled blocks, head, argmax, position
  update) is captured as one ``torch.cuda.CUDAGraph`` and replayed per token.

On the CPU the same step runs eagerly (or compiled, for tests): that is how its logic is
checked without a GPU. Call it under ``torch.inference_mode()``.

Example:
    >>> with torch.inference_mode():
    ...     dec = FastDecoder(model, prompt, max_len=prompt.shape[1] + 256)
    ...     tokens = [int(dec.step()) for _ in range(256)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtrain.config import ModelConfig
from qtrain.model import GPT, KVCache
from qtrain.quant.cuda.linear import LinearPlan, apply_linear, plan_linear

COMPILE_OPTIONS: dict[str, Any] = {"coordinate_descent_tuning": True}
"""Inductor options of the decode graphs (one-row products become fused GEMV reductions)."""

BlockFn = Callable[..., Tensor]


def rope_cos_sin(model: GPT) -> tuple[Tensor, Tensor]:
    """float32 ``(block_size, head_dim / 2)`` cos and sin of the model's rotary table."""
    rot = model.get_buffer("rope")
    return rot.real.float().contiguous(), rot.imag.float().contiguous()


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of ``x (R, H, D)`` by ``cos/sin (R, D/2)`` in float32, as ``qtrain.model.apply_rope``
    does with complex numbers (real math, which Inductor can fuse)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (R, H, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # (R, 1, D/2)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


def make_block_step(plans: tuple[LinearPlan, ...], counts: tuple[int, ...], cfg: ModelConfig) -> BlockFn:
    """The decode math of one block for a given layout of its four linears.

    Args:
        plans: qkv, out, gate_up, down plans.
        counts: how many tensors each plan reads (they arrive flat, in that order).
        cfg: the model's shape (heads, key/value heads, head size, RMSNorm epsilon, q/k norms).

    Returns:
        ``fn(x, cos, sin, mask, pos, ck, cv, attn_norm_w, mlp_norm_w, q_norm_w, k_norm_w,
        *linear_tensors) -> x`` with ``x (1, C)``, ``cos/sin (1, D/2)``, ``mask (1, 1, 1, T)`` bool,
        ``pos (1,)`` int64, ``ck/cv (1, Hkv, T, D)`` (written at ``pos``); the q/k norm weights
        are None without ``model.qk_norm``. A linear's bias (Qwen2's qkv) is one of its
        tensors (``LinearPlan.bias``).
    """
    starts = [sum(counts[:i]) for i in range(len(counts))]
    nq, nk, d, eps = cfg.n_head, cfg.kv_heads(), cfg.head_size(), cfg.norm_eps

    def block_step(
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        pos: Tensor,
        ck: Tensor,
        cv: Tensor,
        n1: Tensor,
        n2: Tensor,
        qn: Tensor | None,
        kn: Tensor | None,
        *ts: Tensor,
    ) -> Tensor:
        lin = [ts[a : a + n] for a, n in zip(starts, counts, strict=True)]
        c = x.shape[-1]
        qkv = apply_linear(plans[0], F.rms_norm(x, (c,), n1, eps), lin[0])  # (1, (nq + 2 nk) D)
        q, k = qkv[:, : nq * d].view(1, nq, d), qkv[:, nq * d : (nq + nk) * d].view(1, nk, d)
        if qn is not None and kn is not None:
            q, k = F.rms_norm(q, (d,), qn, eps), F.rms_norm(k, (d,), kn, eps)
        q, k = rotate_pairs(q, cos, sin).to(ck.dtype), rotate_pairs(k, cos, sin).to(ck.dtype)
        ck.index_copy_(2, pos, k.unsqueeze(2))
        cv.index_copy_(2, pos, qkv[:, (nq + nk) * d :].view(1, nk, 1, d).to(cv.dtype))
        y = F.scaled_dot_product_attention(q.unsqueeze(2), ck, cv, attn_mask=mask, enable_gqa=nk != nq)  # (1,H,1,D)
        x = x + apply_linear(plans[1], y.reshape(1, nq * d).to(x.dtype), lin[1])
        gate, up = apply_linear(plans[2], F.rms_norm(x, (c,), n2, eps), lin[2]).chunk(2, dim=-1)
        return x + apply_linear(plans[3], F.silu(gate) * up, lin[3])

    return block_step


def make_head_step(plan: LinearPlan, eps: float) -> BlockFn:
    """``fn(x, norm_w, *head_tensors) -> logits (1, V)``: final RMSNorm and output head."""

    def head_step(x: Tensor, nw: Tensor, *ts: Tensor) -> Tensor:
        return apply_linear(plan, F.rms_norm(x, (x.shape[-1],), nw, eps), ts)

    return head_step


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class FastDecoder:
    """Greedy batch-1 decoding through a static step; a CUDA graph of it on CUDA.

    Args:
        model: the GPT (full precision, bf16 or packed; tied or untied head).
        prompt: ``(1, T)`` token ids.
        max_len: positions the static cache holds (prompt + tokens to decode; rounded up to
            64, at most ``block_size``; default ``block_size``). Attention reads all of them,
            so a tight value is faster.
        compile: compile the block and head functions (default: on CUDA).
        graph: capture the step as a CUDA graph (default: on CUDA; needs CUDA).
        backend: ``torch.compile`` backend (tests count graphs with their own).
        int4: packed decode kernels, ``"triton-int8"`` (the default: qtrain's Triton GEMV for
            int8 layers, 1.9-3.0 TB/s on an H200 against 0.5-1.0 for the compiled GEMV; tinygemm
            for int4, which the Triton int4 GEMV did not beat), ``"triton"``, ``"triton-int4"``,
            ``"tinygemm"`` or ``"inductor"`` (see :func:`~qtrain.quant.cuda.linear.plan_linear`;
            without Triton the Triton choices fall back to tinygemm).
    """

    def __init__(
        self,
        model: GPT,
        prompt: Tensor,
        max_len: int | None = None,
        compile: bool | None = None,
        graph: bool | None = None,
        backend: str | Callable[..., Any] = "inductor",
        int4: str = "triton-int8",
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.use_graph = cuda if graph is None else graph
        if self.use_graph and not cuda:
            raise ValueError(f"FastDecoder: a CUDA graph needs a CUDA device, the model is on {self.device}")
        cfg = model.cfg
        want = cfg.block_size if max_len is None else max_len
        self.max_len = min(cfg.block_size, -(-want // 64) * 64)
        if prompt.shape[1] >= self.max_len:
            raise ValueError(
                f"FastDecoder: prompt of {prompt.shape[1]} tokens leaves no room in max_len={self.max_len}"
            )
        self.prompt = prompt.to(self.device)
        dtype, dev = _float_dtype(model), self.device
        shape = (cfg.n_layer, 1, cfg.kv_heads(), self.max_len, cfg.head_size())
        self.cache = KVCache(torch.zeros(shape, device=dev, dtype=dtype), torch.zeros(shape, device=dev, dtype=dtype))
        self.cos, self.sin = rope_cos_sin(model)
        self.positions = torch.arange(self.max_len, device=dev)
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.out_tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits = torch.zeros(1, cfg.vocab_size, dtype=dtype, device=dev)
        self._plan(compile if compile is not None else cuda, backend, int4)
        self.graph: Any = None
        self.reset()
        if self.use_graph:
            self._capture()

    def _plan(self, compiled: bool, backend: str | Callable[..., Any], int4: str) -> None:
        """Plans and tensors of every block and the head; one (compiled) function per layout."""
        cfg, dev = self.model.cfg, self.device
        fns: dict[tuple[LinearPlan, ...], BlockFn] = {}
        self.blocks: list[tuple[BlockFn, tuple[Tensor | None, ...]]] = []

        def maybe_compile(fn: BlockFn) -> BlockFn:
            if not compiled:
                return fn
            opts = COMPILE_OPTIONS if backend == "inductor" else None
            return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, options=opts)  # type: ignore[return-value]

        for block in self.model.blocks:
            attn, mlp = block.get_submodule("attn"), block.get_submodule("mlp")
            mods = [attn.get_submodule(n) for n in ("qkv", "out")] + [mlp.get_submodule(n) for n in ("gate_up", "down")]
            planned = [plan_linear(m, dev, int4=int4) for m in mods]
            plans = tuple(p for p, _ in planned)
            if plans not in fns:
                counts = tuple(len(t) for _, t in planned)
                fns[plans] = maybe_compile(make_block_step(plans, counts, cfg))
            norms = (block.get_parameter("attn_norm.weight"), block.get_parameter("mlp_norm.weight"))
            qk_norms = tuple(getattr(getattr(attn, n), "weight", None) for n in ("q_norm", "k_norm"))
            self.blocks.append((fns[plans], (*norms, *qk_norms, *(t for _, ts in planned for t in ts))))
        head_plan, head_ts = plan_linear(self.model.lm_head, dev, int4=int4)
        self.head = maybe_compile(make_head_step(head_plan, cfg.norm_eps))
        self.head_tensors = (self.model.norm.weight, *head_ts)

    def reset(self) -> None:
        """Prefill the prompt with the model's own path; the next step decodes after it.

        Afterwards ``logits`` holds the prompt's last logits and ``tok`` their argmax (the token
        the next :meth:`step` consumes; overwrite it to sample instead).
        """
        logits = self.model(self.prompt, self.cache, 0)[:, -1]
        self.logits.copy_(logits)  # sampling callers draw from it and write their token into ``tok``
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(self.prompt.shape[1])
        self.n = self.prompt.shape[1]

    def _step(self) -> None:
        """The static step: consume ``tok`` at ``pos``; ``out_tok = tok``, ``tok`` = the next one."""
        cos, sin = self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)
        mask = (self.positions <= self.pos).view(1, 1, 1, -1)
        x = self.model.tok_emb(self.tok)[:, 0].to(self.logits.dtype)  # (1, C); a packed table gives float32
        for i, (fn, ts) in enumerate(self.blocks):
            x = fn(x, cos, sin, mask, self.pos, self.cache.k[i], self.cache.v[i], *ts)
        logits = self.head(x, *self.head_tensors)
        self.logits.copy_(logits)
        self.out_tok.copy_(self.tok)
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)

    def _capture(self) -> None:
        """Compile and warm up outside the capture, capture one step, start again from the prompt."""
        self._step()  # compiles (once per block layout)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.reset()

    @property
    def room(self) -> int:
        """Tokens that can still be decoded."""
        return self.max_len - self.n

    def step(self) -> Tensor:
        """Decode one token; returns it as a ``(1, 1)`` device tensor (a static buffer: copy it
        to keep it). The same token :meth:`GreedyDecoder.step` returns.

        Raises:
            ValueError: the static cache is full.
        """
        if self.n >= self.max_len:
            raise ValueError(f"FastDecoder: the static cache of max_len={self.max_len} positions is full")
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.n += 1
        return self.out_tok
