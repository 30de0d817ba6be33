"""Peak memory of a run, estimated before anything is allocated (the available side: `qtrain.sysmem`).

Pure arithmetic from the config: no tensor is created. A run's peak is the largest of its
phases (loading a checkpoint, a training step, validation, PTQ calibration), each a sum of
named parts:

- weights 4 B/parameter, gradients 4 B, AdamW state 8 B (two fp32 moments);
- activations kept for the backward pass, per layer per token (fp32, measured on this
  model): block input, two RMSNorms (input, normalized, output: ``2C + 1``), ``qkv`` ``3C``,
  rotated q/k ``2C``, attention output ``C`` and log-sum-exp ``n_head``, residual ``C``,
  ``gate_up`` ``2F``, SiLU ``F``, product ``F``: ``12C + 4F + n_head + 2`` per layer; then the
  final norm ``3C + 1`` and the log-softmax of the logits ``vocab``. (Widths for full multi-head
  attention; with grouped-query heads or ``model.head_dim``, ``qkv`` is ``(n_head + 2 n_kv_head) D``,
  rotated q/k ``(n_head + n_kv_head) D`` and the attention output ``n_head D``: :func:`attn_widths`;
  ``model.qk_norm`` adds the normalized q/k.) With
  ``train.activation_checkpointing=true`` a layer keeps only its input ``C`` and one layer's
  activations are recomputed at a time;
- the backward pass's peak: at the logits (their gradients in fp32, ``2 x vocab`` per token)
  or inside a block (its gradients, ``4F + 4C``, and with checkpointing its recomputation);
- QAT: each fake-quantized weight is kept quantized-dequantized (4 B) with its clamp mask
  (1 B); distillation adds the frozen teacher and the KL terms;
- validation: the largest set of tensors alive in a no-grad forward of one validation batch
  (32 windows, fewer beyond 1024 tokens: :func:`eval_batch_size`), beside the AdamW state;
- PTQ/GPTQ: the calibration batches' block inputs (twice: one block's inputs and outputs),
  the Hessians of one block (``3 C^2 + F^2`` fp32) and GPTQ's factorizations of the widest
  (``4 K^2``), and one block's forward of one calibration batch: GPTQ goes block by block from
  the captured block inputs and never computes logits, unless the head is quantized too
  (``quant.lm_head``, or a tied ``quant.embeddings``): then a forward pass per calibration
  batch, all their logits kept until the head's Hessian is done;
- loading: a checkpoint's tensors beside the model built from them; a Hugging Face import
  (memory-mapped, tensor by tensor) the model plus a float32 copy of its largest tensor.

Tensors smaller than glibc's largest mmap threshold (32 MiB) come from the heap, which keeps
freed memory for reuse: their peak resident size was measured at about 1.6x their size, and
the estimate counts them so. The process's resident size when the estimate is made (Python,
torch, qtrain) is the baseline, plus the corpus. On CUDA the activations are counted at
2 bytes (bf16 autocast) and compared with the device's free memory. Measured against peak
RSS on CPU (tests/unit/modes/test_memory.py and the notes of issue 16): within about 20%, mostly
above.

Example:
    >>> est = estimate(cfg, cfg.model, Setting(baseline=sysmem.current_rss()))
    >>> fits = est.total <= sysmem.available_memory().bytes   # else refuse before allocating
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from qtrain.config import TRAINING_MODES, ModelConfig, RunConfig, distills
from qtrain.corpus import COPIES
from qtrain.quant.ptq import METHODS
from qtrain.quant.recipe import QuantRecipe

GB = 1e9
HEAP_MMAP_MAX = 32 * 2**20
"""glibc's largest dynamic mmap threshold: smaller blocks are served from the heap."""
HEAP_SLACK = 0.6
"""Extra resident memory per byte of heap-served activations (freed blocks kept for reuse)."""
RUNTIME_BYTES = 400 * 2**20
"""Baseline when the process's resident size cannot be read (Python, torch and qtrain)."""
FIRST_STEP_BYTES = 64 * 2**20
"""Thread pools and kernel scratch the first forward/backward adds."""
EVAL_TOKENS = 32 * 1024
"""Tokens per validation batch: 32 windows up to block_size 1024, fewer windows beyond."""
EVAL_BATCH = 32
EVAL_LOGIT_BYTES = 2**30
"""Most bytes of float32 logits one validation batch may hold (a 128k vocabulary at 2048 tokens
per window is 1 GB a window: such a model validates one window at a time)."""
IMPORTED = "hf"
"""`Setting.loaded` of a Hugging Face import (`init_from=hf:DIR`): read tensor by tensor, memory-mapped."""
Fits = Callable[[RunConfig], "int | None"]
"""Estimated bytes of a changed config when it fits the limit, else None."""


def eval_batch_size(block_size: int, vocab_size: int = 256) -> int:
    """Validation windows per batch: 32, fewer for contexts over 1024 tokens or large vocabularies.

    Bounded memory: at most :data:`EVAL_TOKENS` tokens and :data:`EVAL_LOGIT_BYTES` of float32
    logits per batch, at least one window.
    """
    by_logits = EVAL_LOGIT_BYTES // max(1, 4 * vocab_size * block_size)
    return max(1, min(EVAL_BATCH, EVAL_TOKENS // max(1, block_size), by_logits))


@dataclass(frozen=True)
class Estimate:
    """The peak phase of a run and what it is made of (bytes)."""

    phase: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        """Estimated peak resident bytes of the process."""
        return sum(n for _, n in self.parts)

    def describe(self) -> str:
        """``training: weights 0.50 GB, gradients 0.50 GB, ...`` (parts of 10 MB and more)."""
        shown = ", ".join(f"{name} {gb(n)}" for name, n in self.parts if n >= 10**7)
        return f"{self.phase}: {shown}"


def gb(n: float) -> str:
    """Bytes as ``12.3 GB`` (decimal gigabytes, two significant decimals below 10)."""
    return f"{n / GB:.2f} GB" if n < 10 * GB else f"{n / GB:.1f} GB"


# ---------------------------------------------------------------- model arithmetic


def n_params(m: ModelConfig) -> int:
    """Parameters, tied weights once."""
    return block_linear_params(m) + linear_free_params(m)


def attn_widths(m: ModelConfig) -> tuple[int, int, int]:
    """Per-token widths of the attention: ``qkv`` output, rotated q and k, attention output."""
    nq, nk, d = m.n_head, m.kv_heads(), m.head_size()
    return (nq + 2 * nk) * d, (nq + nk) * d, nq * d


def linear_free_params(m: ModelConfig) -> int:
    """Parameters outside the blocks' projection weights (embedding, head, norms, q/k/v biases)."""
    qkv = attn_widths(m)[0]
    per_layer = 2 * m.n_embd + (qkv if m.attn_bias else 0) + (2 * m.head_size() if m.qk_norm else 0)
    return m.vocab_size * m.n_embd * (1 if m.tie_embeddings else 2) + m.n_embd + m.n_layer * per_layer


def block_linear_params(m: ModelConfig) -> int:
    """Weights of the blocks' four projections: what quantization targets by default."""
    qkv, _, att = attn_widths(m)
    return m.n_layer * (m.n_embd * (qkv + att) + 3 * m.n_embd * m.mlp_hidden)


def _tensors(widths: list[int], tokens: int, nbytes: int) -> int:
    """Resident bytes of per-token tensors ``tokens x width x nbytes``, heap slack included."""
    total = 0.0
    for w in widths:
        size = tokens * w * nbytes
        total += size * (1 + HEAP_SLACK) if size < HEAP_MMAP_MAX else size
    return int(total)


def block_saved(m: ModelConfig, act_int8: bool = False) -> list[int]:
    """Widths of the per-token tensors one block keeps for the backward pass (see module doc)."""
    c, f = m.n_embd, m.mlp_hidden
    qkv, qk, att = attn_widths(m)
    widths = [c, 1, c, c, qkv, qk, m.n_head, att, c, 1, c, c, 2 * f, f, f]
    widths += [qk, m.n_head + m.kv_heads()] if m.qk_norm else []  # normalized q/k and their rsqrt
    return widths + ([att] if act_int8 else [])  # the attention output, fake-quantized, beside itself


def head_saved(m: ModelConfig) -> list[int]:
    """Final norm (input, rsqrt, normalized, output) and the log-softmax of the logits."""
    return [m.n_embd, 1, m.n_embd, m.n_embd, m.vocab_size]


def block_widths(m: ModelConfig) -> list[int]:
    """Largest set of per-token tensors alive at once in one block's no-grad forward."""
    c, f = m.n_embd, m.mlp_hidden
    qkv, qk, _ = attn_widths(m)
    attention = [c, c, qkv, qk, qk]
    mlp = [c, c, 2 * f, f, f]
    return max(attention, mlp, key=sum)


def eval_widths(m: ModelConfig) -> list[int]:
    """Largest set of per-token tensors alive at once in a no-grad forward, logits included."""
    return block_widths(m) + [m.vocab_size] * 3


# ---------------------------------------------------------------- phases


def _activations(cfg: RunConfig, m: ModelConfig, act_bytes: int) -> list[tuple[str, int]]:
    """Kept activations, and the largest of the two backward peaks: at the logits (head kept,
    logits' gradients) or inside a block (its gradients; with checkpointing, its recomputation)."""
    t, mode = cfg.train, cfg.mode.name
    tokens = t.batch_size * m.block_size
    act_int8 = mode in ("qat", "finetune") and QuantRecipe.from_config(cfg.quant).quantizes_activations
    one = block_saved(m, act_int8)
    c, f, v = m.n_embd, m.mlp_hidden, m.vocab_size
    at_logits = head_saved(m) + [v, v] + ([v, v, v, v] if distills(cfg) else [])
    in_block = [2 * f, f, f, c, c, c, c] + (one if t.activation_checkpointing else [])
    per_block = [c] if t.activation_checkpointing else one  # times n_layer (not a list of n_layer copies)
    label = (
        f"activations ({t.batch_size} x {m.block_size} tokens{', checkpointed' if t.activation_checkpointing else ''})"
    )
    return [
        (label, m.n_layer * _tensors(per_block, tokens, act_bytes)),
        (
            "backward peak (logits or one block)",
            max(_tensors(at_logits, tokens, 4), _tensors(in_block, tokens, act_bytes)),
        ),
        ("batch", tokens * 16),
    ]


def loading_phase(m: ModelConfig, loaded: str) -> list[tuple[str, int]]:
    """A checkpoint's tensors while the model is built from them (``loaded``: its scheme); freed after.
    An import (:data:`IMPORTED`) holds one tensor at a time (measured 1.10x the model for Llama-3.2-1B)."""
    if loaded == IMPORTED:
        qkv, _, _ = attn_widths(m)
        largest = max(m.vocab_size, qkv, 2 * m.mlp_hidden) * m.n_embd
        return [("weights", 4 * n_params(m)), ("one imported tensor", 4 * largest)]
    bits = QuantRecipe.from_config({"scheme": loaded}).weight_bits
    lin = block_linear_params(m)
    return [("weights", 4 * n_params(m)), ("checkpoint tensors", lin * bits // 8 + 4 * (n_params(m) - lin))]


def _optimizer_parts(cfg: RunConfig, m: ModelConfig) -> list[tuple[str, int]]:
    p = n_params(m)
    parts = [("weights", 4 * p), ("gradients", 4 * p), ("AdamW state", 8 * p)]
    if cfg.mode.name in ("qat", "finetune"):
        lin = block_linear_params(m)
        parts.append(("fake-quant weights and masks", 5 * lin))
    if distills(cfg):
        parts.append(("distillation teacher", 4 * p))
    if _world() > 1:
        parts.append(("DDP gradient buckets", 4 * p))
    return parts


def _world() -> int:
    """Processes of a torchrun/SLURM launch (each holds its own DDP gradient buckets)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def training_phase(cfg: RunConfig, m: ModelConfig, act_bytes: int = 4) -> list[tuple[str, int]]:
    """One optimizer step at its peak (start of the backward pass, steady state)."""
    return _optimizer_parts(cfg, m) + _activations(cfg, m, act_bytes)


def validation_phase(cfg: RunConfig, m: ModelConfig, training: bool) -> list[tuple[str, int]]:
    """A no-grad validation batch; during training the AdamW state stays (gradients are freed)."""
    p = n_params(m)
    parts = [("weights", 4 * p)]
    if training:
        parts += [("AdamW state", 8 * p)] + [x for x in _optimizer_parts(cfg, m)[3:]]
    windows = eval_batch_size(m.block_size, m.vocab_size)
    if cfg.data.val_windows > 0:
        windows = min(windows, cfg.data.val_windows)
    tokens = windows * m.block_size
    parts.append((f"validation batch ({tokens} tokens)", _tensors(eval_widths(m), tokens, 4)))
    return parts


def calibration_phase(cfg: RunConfig, m: ModelConfig, method: str) -> list[tuple[str, int]]:
    """PTQ (or QAT's PTQ start): GPTQ calibration data and Hessians, or MSE/RTN per-layer work."""
    c, f = m.n_embd, m.mlp_hidden
    qkv, _, att = attn_widths(m)
    parts = [("weights", 4 * n_params(m))]
    head = m.vocab_size * c if head_quantized(cfg, m) else 0
    widest = max(c * (qkv + att), 3 * c * f, head)  # largest weight worked on (qkv+out, gate_up+down, head)
    if not METHODS[method].needs_calibration:
        return parts + [(f"{method} per-layer work", 6 * 4 * widest)]
    batch = cfg.train.batch_size * m.block_size
    n = cfg.ptq.calib_batches
    parts.append((f"calibration ({n} x {cfg.train.batch_size} x {m.block_size} tokens)", n * batch * (2 * 4 * c + 8)))
    parts.append(
        (
            f"{method.upper()} Hessians and factors",
            4 * (2 * c * c + att * att + f * f) + 4 * 4 * max(c, f, att) ** 2 + 3 * 4 * widest,
        )
    )
    parts.append(_calibration_forward(cfg, m, batch, n))
    return parts


def head_quantized(cfg: RunConfig, m: ModelConfig) -> bool:
    """Whether quantization targets the output head (``quant.lm_head``, or a tied ``quant.embeddings``)."""
    return bool(cfg.quant.lm_head or (m.tie_embeddings and cfg.quant.embeddings))


def _calibration_forward(cfg: RunConfig, m: ModelConfig, batch: int, n: int) -> tuple[str, int]:
    """GPTQ's forward work (`qtrain.quant.gptq.quantize_layers`): one block on one batch, no logits;
    with the head quantized, a full forward per batch for the head's Hessian (one batch's logits at a time)."""
    block = _tensors(block_widths(m), batch, 4)
    if not head_quantized(cfg, m):
        return ("calibration forward (one block, one batch)", block)
    return ("calibration forward (head: one batch's logits)", max(block, _tensors(eval_widths(m), batch, 4)))


def _phases(cfg: RunConfig, m: ModelConfig, loaded: str | None, act_bytes: int) -> dict[str, list[tuple[str, int]]]:
    mode = cfg.mode.name
    phases: dict[str, list[tuple[str, int]]] = {}
    if loaded is not None:
        phases["loading"] = loading_phase(m, loaded)
    if mode in TRAINING_MODES:
        phases["training"] = training_phase(cfg, m, act_bytes)
        phases["validation"] = validation_phase(cfg, m, training=True)
    if mode == "ptq":
        phases["validation"] = validation_phase(cfg, m, training=False)
        phases[f"PTQ ({cfg.ptq.method})"] = calibration_phase(cfg, m, cfg.ptq.method)
    if mode == "qat" and cfg.init_from:
        init = cfg.qat.init if cfg.qat.init != "auto" else "gptq"
        if init != "rtn":
            phases[f"QAT start ({init})"] = calibration_phase(cfg, m, init)
    return phases


@dataclass(frozen=True)
class Setting:
    """Where a run starts, beside its config."""

    loaded: str | None = None
    """Scheme of the checkpoint the weights come from (``none``: full precision); None: a fresh model."""
    baseline: int | None = None
    """The process's resident bytes now; None: :data:`RUNTIME_BYTES`; 0 for device memory."""
    data_bytes: int = 0
    """Size of the corpus (held ``COPIES`` times while it is read)."""
    act_bytes: int = 4
    """Bytes per activation element (4; 2 under CUDA bf16 autocast)."""


def estimate(cfg: RunConfig, model: ModelConfig, setting: Setting = Setting()) -> Estimate:
    """The run's estimated peak resident memory.

    Args:
        cfg: the run's config (mode, train, quant, ptq, qat).
        model: the model's shape (from the checkpoint for ``init_from``).
        setting: checkpoint scheme, resident bytes now, corpus size, activation bytes.

    Returns:
        The peak phase with its parts (the runtime, first-step overhead and corpus included).
    """
    s = setting
    fixed = [("runtime", (RUNTIME_BYTES if s.baseline is None else s.baseline) + FIRST_STEP_BYTES)]
    if s.data_bytes:
        fixed.append(("corpus", COPIES * s.data_bytes))
    loaded, act_bytes = s.loaded, s.act_bytes
    phases = _phases(cfg, model, loaded, act_bytes) or {"weights": [("weights", 4 * n_params(model))]}
    name, parts = max(phases.items(), key=lambda kv: sum(n for _, n in kv[1]))
    return Estimate(name, tuple(parts + fixed))
