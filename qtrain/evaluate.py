"""Perplexity on fixed validation windows, model comparison, sampling, decode/prefill speed.

Example:
    >>> starts = val_starts(len(corpus.val), 128, 128)
    >>> loss = val_loss(model, corpus.val, starts, 128)
    >>> text = generate(model, "def ", 100, temperature=0.8, top_k=50, seed=0)
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.data import windows
from qtrain.errors import CheckpointError
from qtrain.fastdecode import FastDecoder
from qtrain.model import GPT, KVCache
from qtrain.progress import phase
from qtrain.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def val_loss(
    model: nn.Module, tokens: torch.Tensor, starts: torch.Tensor, block_size: int, batch_size: int = 32
) -> float:
    """Mean next-token cross-entropy (nats per token) over the windows at `starts`."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    total, count = 0.0, 0
    with phase("validation", total=len(starts), unit="windows") as bar:
        for i in range(0, len(starts), batch_size):
            x, y = windows(tokens, starts[i : i + batch_size], block_size)
            logits = model(x.to(device)).float()
            total += float(F.cross_entropy(logits.view(-1, logits.size(-1)), y.to(device).reshape(-1), reduction="sum"))
            count += y.numel()
            bar.advance(x.shape[0])
    model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows."""
    return math.exp(loss) if loss < 700 else float("inf")


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """Validation bits per byte: mean loss (nats per token) x target tokens per target UTF-8 byte / ln 2.

    The same as the windows' total cross-entropy over their targets' UTF-8 byte count, in
    bits; comparable across tokenizers. For byte tokens `tokens_per_byte` is 1.0, so this is
    exactly ``loss / ln 2``.
    """
    return loss / math.log(2) * tokens_per_byte


@dataclass
class Comparison:
    """How a model's predictions differ from a reference's on the same windows."""

    kl: float
    """Mean KL(reference || model) per token, nats."""
    top1_agreement: float
    """Fraction of positions where both argmaxes agree."""
    reference_val_loss: float
    """The reference's validation loss on the same windows."""


@torch.no_grad()
def compare(
    model: nn.Module,
    reference: nn.Module,
    tokens: torch.Tensor,
    starts: torch.Tensor,
    block_size: int,
    batch_size: int = 32,
) -> Comparison:
    """Logit KL, top-1 agreement and the reference's loss on the same validation windows."""
    dev_m, dev_r = _model_device(model), _model_device(reference)
    kl_sum, agree, n, ref_loss = 0.0, 0, 0, 0.0
    with phase("comparison with compare_to", total=len(starts), unit="windows") as bar:
        for i in range(0, len(starts), batch_size):
            x, y = windows(tokens, starts[i : i + batch_size], block_size)
            lm = F.log_softmax(model(x.to(dev_m)).float().cpu(), dim=-1)
            lr = F.log_softmax(reference(x.to(dev_r)).float().cpu(), dim=-1)
            kl_sum += float((lr.exp() * (lr - lm)).sum())
            agree += int((lm.argmax(-1) == lr.argmax(-1)).sum())
            ref_loss += float(F.nll_loss(lr.view(-1, lr.size(-1)), y.reshape(-1), reduction="sum"))
            n += y.numel()
            bar.advance(x.shape[0])
    return Comparison(kl=kl_sum / n, top1_agreement=agree / n, reference_val_loss=ref_loss / n)


def _sample(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a draw from softmax(logits / temperature).

    A temperature so small that ``logits / temperature`` overflows is computed relative to
    each row's largest logit: the probabilities are then those of greedy decoding (1 on the
    argmax), not NaN.
    """
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    scaled = logits.float() / temperature
    if not torch.isfinite(scaled).all():  # only when it overflowed: otherwise the same numbers as always
        scaled = (logits.float() - logits.float().amax(-1, keepdim=True)) / temperature
    logits = scaled
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).to(logits.device)


@torch.no_grad()
def generate_tokens(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
) -> torch.Tensor:
    """Extend `prompt` (B, T) by `max_new_tokens` with the KV cache; returns (B, T + new).

    When the context fills, the cache is rebuilt from the last half of the window.
    """
    model.eval()
    device = _model_device(model)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    seq = prompt.to(device)[:, -cfg.block_size :]
    if seq.shape[1] + max_new_tokens <= cfg.block_size:  # no sliding: the static CUDA step can serve it
        fast = fast_decoder(model, seq, max_new_tokens)
        if fast is not None:
            return _generate_static(fast, seq, max_new_tokens, temperature, top_k, gen)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    cache = KVCache.empty(cfg, prompt.shape[0], device, dtype)
    logits = model(seq, cache, 0)[:, -1]
    pos = seq.shape[1]
    out = [seq]
    for _ in range(max_new_tokens):
        _check_finite(logits, pos)
        nxt = _sample(logits, temperature, top_k, gen)
        out.append(nxt)
        if pos >= cfg.block_size:  # slide: re-prefill the most recent half window
            ctx = torch.cat(out, dim=1)[:, -(cfg.block_size // 2) :]
            logits = model(ctx, cache, 0)[:, -1]
            pos = ctx.shape[1]
            continue
        logits = model(nxt, cache, pos)[:, -1]
        pos += 1
    return torch.cat(out, dim=1)


def fast_decoder(model: GPT, prompt: torch.Tensor, n_tokens: int) -> FastDecoder | None:
    """A :class:`~qtrain.fastdecode.FastDecoder` for ``prompt`` + ``n_tokens`` on CUDA, else None.

    None (the caller's KV-cache loop then runs) off CUDA, for a batch of more than one
    prompt, and when the decoder cannot be built: a layer it cannot plan, or a failed
    compile or graph capture (logged as a warning).
    """
    if _model_device(model).type != "cuda" or prompt.shape[0] != 1:
        return None
    try:  # compiles the blocks and captures the whole step as one CUDA graph (untimed callers' cost)
        return FastDecoder(model, prompt, max_len=prompt.shape[1] + n_tokens)
    except Exception as err:  # noqa: BLE001 - any failure: the plain loop gives the same tokens, slower
        log.warning("fast CUDA decode unavailable (%s: %s); using the KV-cache loop", type(err).__name__, err)
        return None


def _generate_static(
    dec: FastDecoder, seq: torch.Tensor, n: int, temperature: float, top_k: int, gen: torch.Generator | None
) -> torch.Tensor:
    """:func:`generate_tokens` through a built :class:`FastDecoder` (no sliding needed)."""
    out, pos = [seq], seq.shape[1]
    for i in range(n):
        _check_finite(dec.logits, pos)
        nxt = _sample(dec.logits, temperature, top_k, gen)  # a new tensor: the static buffers change below
        out.append(nxt)
        if i + 1 < n:
            dec.tok.copy_(nxt)  # the token the step consumes
            dec.step()
            pos += 1
    return torch.cat(out, dim=1)


def _check_finite(logits: torch.Tensor, pos: int) -> None:
    """Refuse to sample from NaN/inf logits (non-finite or overflowing weights): exit 3, not a crash."""
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(
            f"the model computes non-finite logits (NaN or inf) at position {pos}: its weights hold non-finite "
            f"values or overflow, so there is nothing to sample from (mode=eval shows its perplexity)"
        )


def generate(
    model: GPT,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    tokenizer: Tokenizer | None = None,
) -> str:
    """Sample text after `prompt`: encoded with `tokenizer` (None: bytes), the prompt and sample decoded
    (invalid UTF-8 replaced). An empty prompt starts from a newline."""
    if tokenizer is None or tokenizer.kind == "bytes":
        ids = torch.tensor([list(prompt.encode("utf-8")) or [10]], dtype=torch.long)
        out = generate_tokens(model, ids, max_new_tokens, temperature, top_k, seed)
        return bytes(out[0].tolist()).decode("utf-8", errors="replace")
    ids = torch.tensor([tokenizer.encode(prompt) or tokenizer.encode("\n") or [0]], dtype=torch.long)
    out = generate_tokens(model, ids, max_new_tokens, temperature, top_k, seed)
    return tokenizer.decode(out[0].tolist())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _float_dtype(model: nn.Module) -> torch.dtype:
    """Dtype of the model's floating-point parameters (packed models: float32 norms)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class GreedyDecoder:
    """Batch-1 greedy decoding with the KV cache, one token per :meth:`step`.

    The one decode loop :func:`decode_speed` times (and ``scripts/bench_decode.py`` runs
    side by side for several models). Call it under ``torch.inference_mode()``.

    Args:
        model: the GPT (full precision, bf16 or packed).
        prompt: ``(1, T)`` token ids; prefilled into a fresh cache by :meth:`reset`.

    Example:
        >>> with torch.inference_mode():
        ...     dec = GreedyDecoder(model, torch.zeros(1, 16, dtype=torch.long))
        ...     tokens = [dec.step() for _ in range(32)]
    """

    def __init__(self, model: GPT, prompt: torch.Tensor) -> None:
        self.model = model.eval()
        self.device = _model_device(model)
        self.prompt = prompt.to(self.device)
        self.cache = KVCache.empty(model.cfg, prompt.shape[0], self.device, _float_dtype(model))
        self.reset()

    def reset(self) -> None:
        """Start again from the prompt (the cache is reused, not reallocated)."""
        self.pos = self.prompt.shape[1]
        self.logits = self.model(self.prompt, self.cache, 0)[:, -1]

    @property
    def room(self) -> int:
        """Tokens that still fit in the context."""
        return self.model.cfg.block_size - self.pos

    def step(self) -> torch.Tensor:
        """Append the argmax token; returns it, ``(1, 1)``.

        Raises:
            ValueError: the context is full.
        """
        nxt = self.logits.argmax(-1, keepdim=True)
        self.logits = self.model.decode_step(nxt, self.cache, self.pos)
        self.pos += 1
        return nxt


def decode_speed(model: GPT, n_tokens: int = 64, repeats: int = 3, prompt_len: int = 16) -> dict[str, Any]:
    """Batch-1 greedy decode tokens/s with the KV cache: warm-up excluded, median of repeats.

    Works the same for full-precision, bf16 and packed models (packed linears run their
    fast kernels at one row per step). On CUDA (batch 1) the step is
    :class:`~qtrain.fastdecode.FastDecoder`'s: compiled blocks, the whole step replayed as one
    CUDA graph (compiled and captured before the timing); elsewhere :class:`GreedyDecoder`.

    Args:
        model: the GPT.
        n_tokens: tokens generated per repeat (capped so prompt + tokens fit the context).
        repeats: timed repeats after one warm-up pass.
        prompt_len: length of the random prompt prefilled (untimed) before each repeat.

    Returns:
        ``{"decode_tokens_per_s": median rate, "decode_tokens": tokens per repeat}``.
    """
    cfg = model.cfg
    prompt_len = max(1, min(prompt_len, cfg.block_size - 1))
    n_tokens = max(1, min(n_tokens, cfg.block_size - prompt_len))
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    rates = []
    with torch.inference_mode(), phase("decode benchmark", total=repeats + 1, unit="passes") as bar:
        dec: GreedyDecoder | FastDecoder = fast_decoder(model, prompt, n_tokens) or GreedyDecoder(model, prompt)
        for r in range(repeats + 1):
            dec.reset()
            _sync(dec.device)
            t0 = time.perf_counter()
            for _ in range(n_tokens):
                dec.step()
            _sync(dec.device)
            if r > 0:  # the first pass is warm-up
                rates.append(n_tokens / (time.perf_counter() - t0))
            bar.advance()  # between timed passes: not inside the timing
    return {"decode_tokens_per_s": statistics.median(rates), "decode_tokens": n_tokens}


def prefill_speed(model: GPT, n_tokens: int = 512, repeats: int = 3) -> dict[str, Any]:
    """Prompt-processing tokens/s for one prompt of `n_tokens` (capped at the context).

    One batch-1 forward over the whole prompt (no cache), warm-up excluded, median of
    repeats. Packed models take their many-row path here (see ``qtrain.quant.packed``).

    Returns:
        ``{"prefill_tokens_per_s": rate, "prefill_tokens": prompt length}``.
    """
    model.eval()
    device = _model_device(model)
    n_tokens = max(1, min(n_tokens, model.cfg.block_size))
    x = torch.randint(0, model.cfg.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    times = []
    with torch.inference_mode(), phase("prefill benchmark", total=repeats + 1, unit="passes") as bar:
        for r in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            if r > 0:
                times.append(time.perf_counter() - t0)
            bar.advance()  # between timed passes: not inside the timing
    return {"prefill_tokens_per_s": n_tokens / statistics.median(times), "prefill_tokens": n_tokens}
