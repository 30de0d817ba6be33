"""The rules a run's config must satisfy: ranges and cross-field checks, all problems at once.

:func:`validate` returns *every* problem so the CLI can list them together and exit 2 before
any work starts; :func:`warnings_for` lists what is allowed but probably not meant.

Example:
    >>> cfg = RunConfig(model=ModelConfig(name="tiny", n_layer=2, n_embd=96, n_head=4,
    ...                 block_size=128, mlp_hidden=256))
    >>> validate(cfg)
    []
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from qtrain.config import (
    EXPORT_FLOAT_TYPES,
    EXPORT_FORMATS,
    GROUP_SIZES,
    GROUPED_SCHEMES,
    KERNELS,
    MODES,
    PTQ_METHODS,
    SCHEME_NAMES,
    TRAINING_MODES,
    ModelConfig,
    QuantConfig,
    RunConfig,
)


def _check(problems: list[str], ok: bool, key: str, msg: str) -> None:
    if not ok:
        problems.append(f"{key}: {msg}")


def _check_overwrite(p: list[str], cfg: RunConfig) -> None:
    """`overwrite=true` only where a run starts over in a run dir that may hold checkpoints."""
    mode = cfg.mode.name
    if not cfg.overwrite or mode == "ptq" or (mode in ("train", "qat", "finetune") and cfg.resume == "never"):
        return
    if mode in ("train", "qat", "finetune"):
        p.append(
            f"overwrite: overwrite=true discards this run dir's checkpoints, but resume={cfg.resume} continues "
            f"from them; to start over use resume=never overwrite=true"
        )
    else:
        p.append(f"overwrite: mode={mode} writes no checkpoints, so there is nothing to discard; drop overwrite=true")


def _validate_tokenizer(p: list[str], cfg: RunConfig) -> None:
    """`data.tokenizer`, its vocabulary size, its path, and `model.vocab_size` against a bpe's."""
    d, vocab = cfg.data, cfg.model.vocab_size
    _check(p, d.tokenizer in ("bytes", "bpe", "hf"), "data.tokenizer", f"'{d.tokenizer}' must be bytes|bpe|hf")
    if d.tokenizer == "bpe":
        _check(p, 256 <= d.vocab_size <= 2**31 - 1, "data.vocab_size", f"must be >= 256 (got {d.vocab_size})")
        _check(
            p,
            vocab in (ModelConfig.vocab_size, d.vocab_size) or bool(cfg.init_from),
            "model.vocab_size",
            f"{vocab} differs from data.vocab_size={d.vocab_size} (data.tokenizer=bpe sets it); leave it unset",
        )
    if d.tokenizer == "hf" and not cfg.init_from:
        need = "required with data.tokenizer=hf (the directory of a tokenizer.json)"
        _check(p, bool(d.tokenizer_path), "data.tokenizer_path", need)


def validate(cfg: RunConfig) -> list[str]:
    """Return every configuration problem (empty when valid); each names its key."""
    p: list[str] = []
    m, t, q = cfg.model, cfg.train, cfg.quant
    _check(p, cfg.mode.name in MODES, "mode", f"'{cfg.mode.name}' is not one of {list(MODES)}")
    _check(p, cfg.resume in ("auto", "never", "must"), "resume", f"'{cfg.resume}' must be auto|never|must")
    _check_overwrite(p, cfg)
    _check(p, cfg.device in ("auto", "cpu", "cuda"), "device", f"'{cfg.device}' must be auto|cpu|cuda")
    _check(p, _threads_ok(cfg.threads), "threads", f"'{cfg.threads}' must be auto or a positive integer")
    _check(p, cfg.backend in ("qtrain", "llamacpp"), "backend", f"'{cfg.backend}' must be qtrain|llamacpp")
    if cfg.backend == "llamacpp":
        _check(p, cfg.mode.name in ("eval", "generate"), "backend", "backend=llamacpp runs mode=eval and mode=generate")
    for key in ("n_layer", "n_embd", "n_head", "block_size", "mlp_hidden", "vocab_size"):
        _check(p, getattr(m, key) > 0, f"model.{key}", f"must be > 0 (got {getattr(m, key)})")
    _validate_attention(p, m)
    _check(p, t.max_steps >= 0, "train.max_steps", f"must be >= 0 (got {t.max_steps})")
    _check(p, t.batch_size > 0, "train.batch_size", f"must be > 0 (got {t.batch_size})")
    _check(p, t.lr > 0, "train.lr", f"must be > 0 (got {t.lr})")
    _check(p, 0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1] (got {t.min_lr_ratio})")
    _check(p, t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0 (got {t.warmup_steps})")
    _check(p, t.grad_accum > 0, "train.grad_accum", f"must be > 0 (got {t.grad_accum})")
    _check(p, t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (got {t.grad_clip})")
    _check(p, t.weight_decay >= 0, "train.weight_decay", f"must be >= 0 (got {t.weight_decay})")
    for key in ("eval_every", "save_every"):
        _check(p, getattr(t, key) >= 0, f"train.{key}", f"must be >= 0 (got {getattr(t, key)})")
    _check(p, t.log_every >= 0, "train.log_every", f"must be >= 0, 0 meaning auto (got {t.log_every})")
    _check(p, t.keep >= 2, "train.keep", f"must be >= 2 so a valid checkpoint always survives (got {t.keep})")
    _check(p, 0 < cfg.data.val_fraction < 1, "data.val_fraction", f"must be in (0, 1) (got {cfg.data.val_fraction})")
    _check(p, cfg.data.val_windows == -1 or cfg.data.val_windows > 0, "data.val_windows", "must be > 0 or -1")
    _check(p, cfg.data.name in ("pydocs", "text"), "data.name", f"'{cfg.data.name}' must be pydocs|text")
    if cfg.data.name == "text":
        _check(p, bool(cfg.data.path), "data.path", "required with data=text (a file or a directory of .txt files)")
    _validate_tokenizer(p, cfg)
    _validate_quant(p, q, m)
    _check(p, cfg.ptq.method in PTQ_METHODS, "ptq.method", f"'{cfg.ptq.method}' is not one of {list(PTQ_METHODS)}")
    _check(p, cfg.ptq.calib_batches > 0, "ptq.calib_batches", f"must be > 0 (got {cfg.ptq.calib_batches})")
    _check(
        p,
        cfg.qat.init in ("auto", *PTQ_METHODS),
        "qat.init",
        f"'{cfg.qat.init}' is not one of {['auto', *PTQ_METHODS]}",
    )
    _check(p, cfg.qat.start_step >= 0, "qat.start_step", f"must be >= 0 (got {cfg.qat.start_step})")
    _check(p, cfg.qat.act_start_step >= 0, "qat.act_start_step", f"must be >= 0 (got {cfg.qat.act_start_step})")
    _check(p, cfg.qat.scale_lr > 0, "qat.scale_lr", f"must be > 0 (got {cfg.qat.scale_lr})")
    _check(p, cfg.qat.distill_temperature > 0, "qat.distill_temperature", "must be > 0")
    _check(
        p,
        cfg.qat.distill_schedule in ("constant", "linear"),
        "qat.distill_schedule",
        f"'{cfg.qat.distill_schedule}' is not one of ['constant', 'linear']",
    )
    ev = cfg.eval
    _check(p, ev.decode_tokens >= 0, "eval.decode_tokens", f"must be >= 0 (0: skip; got {ev.decode_tokens})")
    _check(p, ev.decode_repeats > 0, "eval.decode_repeats", f"must be > 0 (got {ev.decode_repeats})")
    _check(p, ev.prefill_tokens >= 0, "eval.prefill_tokens", f"must be >= 0 (0: skip; got {ev.prefill_tokens})")
    _check(p, cfg.generate.max_new_tokens >= 0, "generate.max_new_tokens", "must be >= 0")
    _check(p, cfg.generate.temperature >= 0, "generate.temperature", "must be >= 0")
    _validate_runnable(p, cfg)
    _validate_mode_inputs(p, cfg)
    return p


def warnings_for(cfg: RunConfig) -> list[str]:
    """Settings that are valid but almost certainly not what was meant: printed, not refused.

    ``train.warmup_steps >= train.max_steps`` is a warning, not an error: a short smoke run
    (``qtrain train.max_steps=20`` with the default 50 warmup steps) is a common first
    command, and it still trains; the warning says what the schedule does and how to fix it.
    """
    out: list[str] = []
    t = cfg.train
    if cfg.mode.name in TRAINING_MODES and 0 < t.max_steps <= t.warmup_steps:
        out.append(
            f"train.warmup_steps={t.warmup_steps} >= train.max_steps={t.max_steps}: the learning rate never "
            f"leaves warmup (it ends at {t.lr * t.max_steps / t.warmup_steps:.3g}, "
            f"{t.max_steps / t.warmup_steps:.0%} of train.lr={t.lr:g}) and the cosine decay never runs; "
            f"set train.warmup_steps below train.max_steps, e.g. train.warmup_steps={t.max_steps // 10}"
        )
    return out


def _threads_ok(value: Any) -> bool:
    text = str(value).strip()
    return text.lower() == "auto" or (not isinstance(value, bool) and text.isdigit() and int(text) > 0)


SEED_MAX = 2**32 - 1
"""Largest `seed`: the data order seeds a generator with seed * 100003 + epoch (64-bit)."""
FLOAT_SECTIONS = ("model", "quant", "data", "train", "ptq", "qat", "generate", "eval")


def _validate_runnable(p: list[str], cfg: RunConfig) -> None:
    """Values in range that the numerics cannot run with: seeds, epsilons, bases, non-finite floats."""
    m = cfg.model
    _check(p, 0 <= cfg.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}] (got {cfg.seed})")
    damp = f"must be in [1e-6, 1], a fraction of the mean Hessian diagonal (got {cfg.ptq.damp})"
    _check(p, 1e-6 <= cfg.ptq.damp <= 1, "ptq.damp", damp)
    _check(p, 1 <= m.rope_theta < math.inf, "model.rope_theta", f"must be a finite base >= 1 (got {m.rope_theta})")
    _check(p, 1e-12 <= m.norm_eps <= 1, "model.norm_eps", f"must be in [1e-12, 1] (got {m.norm_eps})")
    if m.vocab_size > 0:  # byte-level tokens: every byte value 0..255 must have an embedding row
        _check(p, m.vocab_size >= 256, "model.vocab_size", f"must be >= 256 for byte tokens (got {m.vocab_size})")
    reported = {problem.split(":", 1)[0] for problem in p}
    for section in FLOAT_SECTIONS:  # inf passes every `> 0` above, nan fails it: one message per key
        node = getattr(cfg, section)
        for f in fields(node):
            value, key = getattr(node, f.name), f"{section}.{f.name}"
            if isinstance(value, float) and not math.isfinite(value) and key not in reported:
                p.append(f"{key}: must be a finite number (got {value})")


ROPE_SCALINGS = ("none", "llama3")
"""The `model.rope_scaling` values the model implements."""


def _validate_attention(p: list[str], m: ModelConfig) -> None:
    """Heads, key/value heads (grouped-query), head size and rotary scaling."""
    if m.head_dim is None and m.n_head > 0:
        _check(p, m.n_embd % m.n_head == 0, "model.n_embd", f"{m.n_embd} not divisible by model.n_head={m.n_head}")
        _check(p, (m.n_embd // m.n_head) % 2 == 0, "model.n_head", "head size must be even for rotary embeddings")
    elif m.head_dim is not None:
        ok = m.head_dim > 0 and m.head_dim % 2 == 0
        _check(p, ok, "model.head_dim", f"must be a positive even number for rotary embeddings (got {m.head_dim})")
    if m.n_kv_head is not None:
        ok = m.n_kv_head > 0 and m.n_head % m.n_kv_head == 0
        _check(p, ok, "model.n_kv_head", f"{m.n_kv_head} must be > 0 and divide model.n_head={m.n_head}")
    _check(p, m.rope_scaling in ROPE_SCALINGS, "model.rope_scaling", f"'{m.rope_scaling}' must be none|llama3")
    if m.rope_scaling == "llama3":
        _check(p, m.rope_factor >= 1, "model.rope_factor", f"must be >= 1 (got {m.rope_factor})")
        low = m.rope_low_freq_factor
        _check(p, low > 0, "model.rope_low_freq_factor", f"must be > 0 (got {low})")
        _check(
            p,
            m.rope_high_freq_factor > m.rope_low_freq_factor,
            "model.rope_high_freq_factor",
            f"must be > model.rope_low_freq_factor={m.rope_low_freq_factor} (got {m.rope_high_freq_factor})",
        )
        _check(p, m.rope_original_context > 0, "model.rope_original_context", "must be > 0")


def _validate_quant(p: list[str], q: QuantConfig, m: ModelConfig) -> None:
    _check(p, q.scheme in SCHEME_NAMES, "quant.scheme", f"'{q.scheme}' is not one of {list(SCHEME_NAMES)}")
    _check(p, q.activations in ("none", "int8"), "quant.activations", f"'{q.activations}' must be none|int8")
    _check(p, q.kernel in KERNELS, "quant.kernel", f"'{q.kernel}' must be {'|'.join(KERNELS)}")
    grouped = GROUPED_SCHEMES.get(q.scheme)
    if grouped:
        ok = q.group_size == -1 or q.group_size in GROUP_SIZES
        _check(p, ok, "quant.group_size", f"{q.group_size} must be one of {list(GROUP_SIZES)} or -1 (per channel)")
        if ok and q.group_size > 0:
            inputs = [
                ("attention/MLP input (model.n_embd)", m.n_embd),
                ("MLP down input (model.mlp_hidden)", m.mlp_hidden),
            ]
            if m.head_dim is not None and m.n_head * m.head_dim != m.n_embd:
                inputs.append(("attention output input (model.n_head * model.head_dim)", m.n_head * m.head_dim))
            for name, k in inputs:
                _check(
                    p,
                    k % q.group_size == 0,
                    "quant.group_size",
                    f"{q.group_size} does not divide the {name} = {k}; pick one of "
                    f"{[g for g in GROUP_SIZES if k % g == 0] or 'none'} or -1",
                )
    if grouped is False:
        _check(
            p, q.symmetric, "quant.symmetric", f"{q.scheme} weights are symmetric per channel; set quant.symmetric=true"
        )


def _validate_mode_inputs(p: list[str], cfg: RunConfig) -> None:
    mode = cfg.mode.name
    needs_init = ("ptq", "finetune", "eval", "generate", "verify", "upgrade", "export")
    if mode in needs_init:
        _check(p, bool(cfg.init_from), "init_from", f"mode={mode} needs init_from=PATH (a checkpoint or run dir)")
    if mode in ("ptq", "qat"):
        _check(p, cfg.quant.scheme != "none", "quant", f"mode={mode} needs a scheme: quant={'|'.join(GROUPED_SCHEMES)}")
    if mode == "upgrade":
        _check(p, bool(cfg.out), "out", "mode=upgrade needs out=PATH (a new directory)")
    if mode == "export":
        _check(p, bool(cfg.out), "out", "mode=export needs out=PATH (a new directory, or file for gguf)")
        fmts, floats = EXPORT_FORMATS, EXPORT_FLOAT_TYPES
        _check(p, cfg.export.format in fmts, "export.format", f"'{cfg.export.format}' is not one of {list(fmts)}")
        ftype = cfg.export.float_type
        _check(p, ftype in floats, "export.float_type", f"'{ftype}' is not one of {list(floats)}")
    if mode == "report":
        _check(p, len(cfg.runs) > 0, "runs", "mode=report needs runs=[DIR,...]")
    if cfg.qat.distill is True and mode == "qat":
        _check(p, bool(cfg.init_from), "qat.distill", "distillation needs a full-precision teacher: init_from=PATH")
