"""Checks a mode runs before it allocates or computes: memory, finite weights, comparable models.

Each raises the error whose exit code says what is wrong (DESIGN.md section 6): a run that
cannot fit in memory exits 5 before anything is allocated, a checkpoint whose weights are not
finite exits 3 where the run would compute from them, a `compare_to` model that cannot score
the evaluated model's windows exits 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qtrain import checkpoint as ck
from qtrain import sysmem
from qtrain.config import ModelConfig, RunConfig
from qtrain.console import warn
from qtrain.corpus import corpus_size
from qtrain.errors import CheckpointError, ConfigError, ResourceError
from qtrain.modes import memory, memory_fixes

MEMORY_MODES = ("train", "qat", "finetune", "ptq")
"""Modes whose peak memory is estimated, printed and checked before anything is allocated."""


def memory_check(
    cfg: RunConfig, device: torch.device, model: ModelConfig, loaded: str | None = None, ckpt: Path | None = None
) -> tuple[dict[str, int], str] | None:
    """Estimate the run's peak memory; exit 5 when it cannot fit (see `qtrain.modes.memory`).

    On CUDA the device's free memory is compared (activations counted in bf16); on CPU the
    memory the process may use (`qtrain.sysmem`), the corpus included. A checkpoint whose
    manifest describes a model too big to load is verified first, so a manifest that lies is
    refused as a damaged checkpoint (exit 3), not as too big (exit 5).

    Returns:
        ``memory_estimate_bytes`` and ``memory_available_bytes`` for report.json, and the line
        to print; None for modes that are not estimated.
    """
    if cfg.mode.name not in MEMORY_MODES:
        return None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        avail = sysmem.Available(free + torch.cuda.memory_reserved(device), f"free memory of {device}")
        setting = memory.Setting(loaded=loaded, baseline=0, act_bytes=2)
    else:
        data_bytes = corpus_size(cfg.data.name, cfg.data.path)
        avail = sysmem.available_memory()
        setting = memory.Setting(loaded=loaded, baseline=sysmem.current_rss(), data_bytes=data_bytes)
    try:
        return _check(cfg, model, avail, setting)
    except ResourceError:
        if ckpt is not None:
            ck.verify_checkpoint(ckpt)
        raise


def check_finite(mode: str, path: Path, model: nn.Module) -> None:
    """Name the tensors holding NaN/inf: refused (exit 3) where the run computes from them, else a warning."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return
    what = f"{path}: {len(bad)} tensor(s) hold non-finite values (NaN/inf): {', '.join(bad[:4])}"
    if mode in MEMORY_MODES:
        raise CheckpointError(f"{what}; nothing can be trained or quantized from it")
    warn(f"{what}; its outputs will not be finite")


def check_comparable(model: ModelConfig, path: Path) -> None:
    """`compare_to` must score the evaluated model's windows: same vocabulary, a context at least as long."""
    ref = ck.read_manifest(path).get("model") or {}
    if ref.get("vocab_size") != model.vocab_size or int(ref.get("block_size", 0)) < model.block_size:
        raise ConfigError(
            f"compare_to: {path} has model.vocab_size={ref.get('vocab_size')} and model.block_size="
            f"{ref.get('block_size')}, the evaluated model {model.vocab_size} and {model.block_size}: the reference "
            f"must score the same {model.block_size}-token windows over the same vocabulary. Compare with a model "
            f"of the same vocabulary whose context is at least {model.block_size} tokens"
        )


# ---------------------------------------------------------------- memory: the message


WARN_FRACTION = 0.85
"""An estimate above this fraction of the available memory is run, with a warning."""


def _check(
    cfg: RunConfig,
    model: ModelConfig,
    available: sysmem.Available,
    setting: memory.Setting,
) -> tuple[dict[str, int], str]:
    """The estimate against the available memory; refuse a run that cannot fit.

    Args:
        cfg: the run's config.
        model: the model's shape (the checkpoint's for ``init_from``).
        available: what the process may use (:func:`qtrain.sysmem.available_memory`).
        setting: checkpoint scheme, resident bytes now, corpus size, activation bytes.

    Returns:
        ``memory_estimate_bytes`` and ``memory_available_bytes`` for report.json, and the line
        to print (``memory: about ... available (...)``); a warning is printed above 85%.

    Raises:
        ResourceError: the estimate exceeds the available memory (exit 5), with overrides that fit.
    """
    procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    est = memory.estimate(cfg, model, setting)
    need = est.total * procs
    each = f" per process, x{procs} processes on this node" if procs > 1 else ""
    have = f"{memory.gb(available.bytes)} available ({available.source})"
    line = f"about {memory.gb(est.total)} at peak{each} ({est.describe()}); {have}"
    if need > available.bytes:
        raise ResourceError(_refusal(cfg, model, est, line, available.bytes // procs, setting))
    if need > WARN_FRACTION * available.bytes:
        warn(f"memory: the estimate is {need / available.bytes:.0%} of the available memory; {_knobs(cfg, model)}")
    return {"memory_estimate_bytes": est.total, "memory_available_bytes": available.bytes}, f"memory: {line}"


def _knobs(cfg: RunConfig, model: ModelConfig) -> str:
    t = cfg.train
    return (
        f"train.batch_size={t.batch_size} (with train.grad_accum={t.grad_accum}), model.block_size={model.block_size}"
        f" and train.activation_checkpointing={str(t.activation_checkpointing).lower()} set the activations"
    )


def _refusal(
    cfg: RunConfig, model: ModelConfig, est: memory.Estimate, line: str, limit: int, setting: memory.Setting
) -> str:
    fixes = memory_fixes.remedies(cfg, model, limit, setting)
    head = (
        f"not enough memory for this mode={cfg.mode.name} run (model={model.name}, train.batch_size="
        f"{cfg.train.batch_size}, model.block_size={model.block_size}): {line}. It would run out of memory part "
        f"way (killed by the kernel, or an allocation failing), so it was not started: nothing was allocated."
    )
    if fixes:
        return f"{head} Overrides that fit: " + "; or ".join(fixes)
    floor = sum(n for name, n in est.parts if not name.startswith(("activations", "backward", "batch", "valid")))
    return (
        f"{head} Nothing qtrain can change fits: weights, optimizer state and runtime alone need about "
        f"{memory.gb(floor)}. Use a smaller model (model=small|medium), fewer processes per node, or a machine "
        f"with more memory. {_knobs(cfg, model)}."
    )
