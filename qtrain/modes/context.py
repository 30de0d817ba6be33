"""What every mode function gets (`RunContext`) and the run-wide pieces built from it.

The context carries the config, the run dir, the device and the stop flag; the helpers here
give every mode the same corpus, validation windows, calibration batches, memory check and first line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from qtrain import checkpoint as ck
from qtrain.config import ModelConfig, RunConfig, distills
from qtrain.console import info
from qtrain.data import BatchSampler, Corpus, load_corpus, target_bytes, tokenizer_for, val_starts
from qtrain.errors import ConfigError
from qtrain.evaluate import bits_per_byte, val_loss
from qtrain.model import GPT
from qtrain.modes import guards, memory
from qtrain.progress import banner
from qtrain.quant.recipe import QuantRecipe
from qtrain.tokenizer import Tokenizer, tokenizer_from_manifest
from qtrain.train import StopFlag


@dataclass
class RunContext:
    """What every mode function gets."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    stop: StopFlag = field(default_factory=StopFlag)
    t0: float = field(default_factory=time.perf_counter)
    overrides: list[str] = field(default_factory=list)
    """The command-line overrides (to tell an explicit `quant=...` from the default)."""
    corpus: dict[str, Any] | None = None
    """Fingerprint of the corpus this run loaded (`corpus_for`); None before or without one."""
    memory: dict[str, int] | None = None
    """`memory_estimate_bytes` and `memory_available_bytes` (`check_memory`); None when not estimated."""
    memory_model: ModelConfig | None = None
    """The model shape the memory was estimated for (the checkpoint's with `init_from`)."""
    memory_line: str | None = None
    """``memory: about N GB at peak (...); M GB available (...)``, printed under the banner."""
    tokenizer: Tokenizer | None = None
    """The run's tokenizer (`use_tokenizer`): the checkpoint's with `init_from`, else `data.tokenizer`'s."""
    imported_from: dict[str, Any] | None = None
    """Provenance of an imported model (`init_from=hf:DIR`, or a checkpoint carrying it): stored in
    the manifest of every checkpoint this run writes."""
    val_tokens_per_byte: float | None = None
    """Target tokens per UTF-8 byte of the fixed validation windows (`eval_fn_for`): turns val_loss into val_bpb."""

    @property
    def ckpt_root(self) -> Path:
        """The run's `checkpoints/` directory."""
        return self.run_dir / "checkpoints"


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain JSON data."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def world_size() -> int:
    """Processes in the DDP group (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def check_memory(ctx: RunContext, model: ModelConfig, loaded: str | None = None, ckpt: Path | None = None) -> None:
    """`guards.memory_check` for this run: records the estimate in `ctx` (`announce` prints it), or exits 5."""
    ctx.memory_model = model
    checked = guards.memory_check(ctx.cfg, ctx.device, model, loaded, ckpt)
    if checked is not None:
        ctx.memory, ctx.memory_line = checked


def corpus_for(ctx: RunContext, block_size: int) -> Corpus:
    """The configured corpus in the run's tokens, checked against the model's context; its fingerprint
    goes to `ctx.corpus`."""
    corpus = load_corpus(ctx.cfg.data, block_size, use_tokenizer(ctx))
    ctx.corpus = corpus.fingerprint
    return corpus


def use_tokenizer(ctx: RunContext, source: Any = None) -> Tokenizer:
    """The run's tokenizer, kept in `ctx.tokenizer`.

    With `source` (a loaded checkpoint or imported model: `.manifest`, `.path`) it is the one the
    source carries, and a tokenizer the config asks for explicitly must be that one. Without, the
    first call builds `data.tokenizer`'s (a bpe is trained on the training split or read from the
    cache) and sets `model.vocab_size` to its size.

    Raises:
        ConfigError: an explicit tokenizer or `model.vocab_size` that differs (exit 2, naming both).
        CheckpointError: the source's tokenizer file is missing or altered (exit 3).
    """
    if source is not None:
        tok = tokenizer_from_manifest(source.manifest, Path(source.path))
        requested = _requested_tokenizer(ctx)
        if requested is not None and requested.sha256 != tok.sha256:
            raise ConfigError(
                f"data.tokenizer: {source.path} was trained with the tokenizer {tok.describe()}, but this run "
                f"asks for {requested.describe()}; a model only works with its own tokenizer. Drop the "
                f"data.tokenizer settings (the checkpoint's tokenizer is used), or train a new model"
            )
        ctx.tokenizer = tok
    elif ctx.tokenizer is None:
        tok = tokenizer_for(ctx.cfg.data, ctx.cfg.seed)
        m = ctx.cfg.model
        if tok.kind != "bytes" and m.vocab_size != tok.vocab_size:
            if m.vocab_size != ModelConfig.vocab_size:
                raise ConfigError(
                    f"model.vocab_size: {m.vocab_size}, but data.tokenizer={tok.kind} gives {tok.vocab_size} ids "
                    f"({tok.describe()}); leave model.vocab_size unset: it follows the tokenizer"
                )
            m.vocab_size = tok.vocab_size
        ctx.tokenizer = tok
    assert ctx.tokenizer is not None
    return ctx.tokenizer


def _requested_tokenizer(ctx: RunContext) -> Tokenizer | None:
    """The tokenizer this run's config names explicitly (not the default bytes), else None."""
    data = ctx.cfg.data
    keys = {o.lstrip("+~").split("=", 1)[0] for o in ctx.overrides}
    if data.tokenizer == "bytes" and "data.tokenizer" not in keys:
        return None
    return tokenizer_for(data, ctx.cfg.seed)


def eval_fn_for(ctx: RunContext, corpus: Corpus, block_size: int) -> Callable[[nn.Module], float]:
    """Validation loss on the fixed, seeded windows (identical for every mode); sets `ctx.val_tokens_per_byte`."""
    starts = val_starts(len(corpus.val), block_size, ctx.cfg.data.val_windows)
    tok = corpus.tokenizer or ctx.tokenizer
    batch = memory.eval_batch_size(block_size, tok.vocab_size if tok is not None else 256)  # bounded memory
    n_bytes = target_bytes(corpus.val, starts, block_size, tok.token_bytes() if tok is not None else [])
    ctx.val_tokens_per_byte = len(starts) * block_size / n_bytes if n_bytes else None
    return lambda model: val_loss(model, corpus.val, starts, block_size, batch)


def val_bpb(ctx: RunContext, loss: float | None) -> float | None:
    """Bits per byte of a validation loss measured by `eval_fn_for` (None when unknown)."""
    if loss is None or ctx.val_tokens_per_byte is None:
        return None
    return bits_per_byte(loss, ctx.val_tokens_per_byte)


def calibration_batches(ctx: RunContext, corpus: Corpus, block: int, n_batches: int) -> list[torch.Tensor]:
    """`n_batches` training batches for calibration (their own seed: training's order is untouched)."""
    sampler = BatchSampler(corpus.train, block, ctx.cfg.train.batch_size, ctx.cfg.seed + 17)
    return [sampler.next_batch()[0].to(ctx.device) for _ in range(n_batches)]


def unwrap(model: nn.Module) -> GPT:
    """The GPT inside a DDP/compile wrapper."""
    inner: Any = model
    while not isinstance(inner, GPT):
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not a qtrain GPT: {type(model).__name__}")
    return inner


def n_params_of(model: GPT | ModelConfig) -> int:
    """Parameters of the model's full-precision shape (tied weights once), from the model or its config."""
    return memory.n_params(model if isinstance(model, ModelConfig) else model.cfg)


def _tokens_note(ctx: RunContext) -> str:
    """`, tokenizer bpe (vocab ...)` for the banner when the run's tokens are not bytes."""
    tok = ctx.tokenizer
    return f", tokenizer {tok.describe()}" if tok is not None and tok.kind != "bytes" else ""


def announce(ctx: RunContext, ckpt: ck.Checkpoint | None = None) -> None:
    """The run's first line: mode, model and parameter count, scheme, corpus, source, run dir."""
    cfg, mode = ctx.cfg, ctx.cfg.mode.name
    mcfg = ModelConfig(**ckpt.manifest["model"]) if ckpt is not None else cfg.model
    requested = QuantRecipe.from_config(cfg.quant).banner_label
    if mode == "ptq":
        scheme = f"{requested}, {cfg.ptq.method}"
    elif mode == "qat":
        scheme = f"{requested}, QAT{' + distill' if distills(cfg) and ckpt else ''}"
    else:
        held = QuantRecipe.from_manifest(ckpt.manifest.get("quant") if ckpt is not None else None)
        scheme = held.banner_label + (f", {held.method}" if held.method else "")
    training = mode in ("train", "qat", "finetune")
    banner(
        {
            "mode": mode,
            "model": f"{mcfg.name} ({n_params_of(mcfg):,} params)",
            "quant": scheme,
            "data": None
            if mode == "export"  # export reads no corpus
            else cfg.data.name + (f" {cfg.data.path}" if cfg.data.path else "") + _tokens_note(ctx),
            "steps": cfg.train.max_steps if training else None,
            "from": str(ckpt.path) if ckpt is not None else None,
            "device": str(ctx.device),
            "run dir": str(ctx.run_dir),
        }
    )
    if ctx.memory_line:  # the estimate (`check_memory`), right under the banner
        info(ctx.memory_line)
