"""`mode=train`: full-precision training from scratch or from a full-precision `init_from`."""

from __future__ import annotations

from typing import Any

from qtrain.errors import ConfigError
from qtrain.modes.context import RunContext, announce, corpus_for
from qtrain.modes.loading import fresh_model, load_init
from qtrain.modes.results import base_report
from qtrain.modes.training import train_model


def run_train(ctx: RunContext) -> dict[str, Any]:
    """mode=train: full-precision training from scratch or `init_from`."""
    cfg = ctx.cfg
    if cfg.init_from:
        ckpt, model = load_init(ctx)
        if ckpt.manifest.get("quant"):
            raise ConfigError(
                f"init_from: {ckpt.path} is quantized; mode=train trains full-precision models. "
                f"Use mode=finetune init_from={ckpt.path} to train it further in its scheme"
            )
        announce(ctx, ckpt)
    else:
        model = fresh_model(ctx)  # memory checked first: a run that cannot fit prints only the refusal
        announce(ctx)
    corpus = corpus_for(ctx, model.cfg.block_size)
    trainer, summary = train_model(ctx, model, corpus)
    path = trainer.save() if trainer.step > 0 else None
    vloss = summary["val_loss"] if summary["val_loss"] is not None else trainer.evaluate()
    report = base_report(ctx, model, trainer.step, vloss, path)
    report["train_tokens_per_s"] = round(summary["tokens_per_s"], 1)
    return report
