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
from qtrain.config import ModelConfig, RunConfig
from qtrain.console import info
from qtrain.data import BatchSampler, Corpus, load_corpus, val_starts
from qtrain.evaluate import val_loss
from qtrain.model import GPT
from qtrain.modes import guards, memory
from qtrain.progress import banner
from qtrain.quant.recipe import QuantRecipe
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
    """The configured corpus, checked against the model's context; its fingerprint goes to `ctx.corpus`."""
    corpus = load_corpus(ctx.cfg.data, block_size)
    ctx.corpus = corpus.fingerprint
    return corpus


def eval_fn_for(ctx: RunContext, corpus: Corpus, block_size: int) -> Callable[[nn.Module], float]:
    """Validation loss on the fixed, seeded windows (identical for every mode)."""
    starts = val_starts(len(corpus.val), block_size, ctx.cfg.data.val_windows)
    batch = memory.eval_batch_size(block_size)  # 32 windows up to 1024 tokens each, fewer beyond
    return lambda model: val_loss(model, corpus.val, starts, block_size, batch)


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
    c = model if isinstance(model, ModelConfig) else model.cfg
    per_block = 4 * c.n_embd * c.n_embd + 3 * c.n_embd * c.mlp_hidden + 2 * c.n_embd
    emb = c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)
    return c.n_layer * per_block + emb + c.n_embd


def announce(ctx: RunContext, ckpt: ck.Checkpoint | None = None) -> None:
    """The run's first line: mode, model and parameter count, scheme, corpus, source, run dir."""
    cfg, mode = ctx.cfg, ctx.cfg.mode.name
    mcfg = ModelConfig(**ckpt.manifest["model"]) if ckpt is not None else cfg.model
    requested = QuantRecipe.from_config(cfg.quant).banner_label
    if mode == "ptq":
        scheme = f"{requested}, {cfg.ptq.method}"
    elif mode == "qat":
        scheme = f"{requested}, QAT{' + distill' if cfg.qat.distill and ckpt else ''}"
    else:
        held = QuantRecipe.from_manifest(ckpt.manifest.get("quant") if ckpt is not None else None)
        scheme = held.banner_label + (f", {held.method}" if held.method else "")
    training = mode in ("train", "qat", "finetune")
    banner(
        {
            "mode": mode,
            "model": f"{mcfg.name} ({n_params_of(mcfg):,} params)",
            "quant": scheme,
            "data": cfg.data.name + (f" {cfg.data.path}" if cfg.data.path else ""),
            "steps": cfg.train.max_steps if training else None,
            "from": str(ckpt.path) if ckpt is not None else None,
            "device": str(ctx.device),
            "run dir": str(ctx.run_dir),
        }
    )
    if ctx.memory_line:  # the estimate (`check_memory`), right under the banner
        info(ctx.memory_line)
