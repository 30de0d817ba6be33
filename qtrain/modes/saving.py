"""The one way a mode writes a checkpoint: rank 0 publishes its payload under the run's checkpoints/.

Training saves (the trainer's `save_fn`) and the final converted result go through `save`;
the manifest's `quant` section is part of the payload as it is built, never patched in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from qtrain import checkpoint as ck
from qtrain.console import info, rank
from qtrain.modes.context import RunContext, config_dict, unwrap
from qtrain.tokenizer import byte_tokenizer

QuantSection = Callable[[], "dict[str, Any] | None"]
"""Builds the manifest's `quant` section at save time (the layers as they are then), or None."""


def payload_for(
    ctx: RunContext, model: nn.Module, trainer_state: dict[str, Any] | None, quant: dict[str, Any] | None = None
) -> ck.Payload:
    """Everything a checkpoint stores for this run (`quant`: the manifest's quantization section)."""
    meta: dict[str, Any] = {"trainer": trainer_state} if trainer_state is not None else {}
    gpt = unwrap(model)
    manifest = {"mode": ctx.cfg.mode.name, "config": config_dict(ctx.cfg), "model": asdict(gpt.cfg)}
    if ctx.corpus is not None:
        manifest["corpus"] = ctx.corpus
    if ctx.imported_from is not None:
        manifest["imported_from"] = ctx.imported_from  # provenance: the imported model's files and hashes
    tok = ctx.tokenizer or byte_tokenizer()
    manifest["tokenizer"] = tok.manifest_section()  # its tokenizer.json travels as an extra file
    state = dict(model.state_dict())
    if quant is not None:
        manifest["quant"] = quant
    return ck.Payload(model_state=state, trainer_meta=meta, manifest=manifest, extra_files=tok.files())


def save(
    ctx: RunContext,
    model: nn.Module,
    step: int,
    trainer_state: dict[str, Any] | None = None,
    quant: QuantSection | None = None,
) -> Path | None:
    """Publish a checkpoint of `model` at `step` (rank 0; other ranks return None).

    Args:
        ctx: the run (its checkpoints/ dir and `train.keep`).
        model: the model (a DDP/compile wrapper is fine).
        step: the optimizer step the checkpoint is named after.
        trainer_state: the trainer's state to resume from, or None for a final result.
        quant: builds the manifest's `quant` section; None for a full-precision model.
    """
    if rank() != 0:
        return None
    payload = payload_for(ctx, model, trainer_state, quant() if quant is not None else None)
    path = ck.save_checkpoint(ctx.ckpt_root, step, payload, ctx.cfg.train.keep)
    info(f"checkpoint: {path}")
    return path


def saver(
    ctx: RunContext, model: nn.Module, quant: QuantSection | None = None
) -> Callable[[int, dict[str, Any]], Path | None]:
    """A `save_fn` for the Trainer: `save` with the trainer's step and state."""
    return lambda step, trainer_state: save(ctx, model, step, trainer_state, quant)
