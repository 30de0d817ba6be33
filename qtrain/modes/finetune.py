"""`mode=finetune`: continue training a quantized checkpoint from exactly its codes and scales.

The steps: reuse a finished result in this run dir if there is one; load the quantized
checkpoint (its scheme is kept: an explicit `quant=` override must name the same one);
measure the packed model as the reference; turn it back into fake-quant; train; evaluate
fake-quant, convert, evaluate packed, save, report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtrain.errors import ConfigError
from qtrain.modes.context import RunContext, announce, corpus_for, eval_fn_for
from qtrain.modes.loading import load_init
from qtrain.modes.resume import finished_result
from qtrain.modes.training import finish_quantized, qat_param_groups, train_model
from qtrain.quant.hooks import build_hooks
from qtrain.quant.recipe import QuantRecipe


def run_finetune(ctx: RunContext) -> dict[str, Any]:
    """mode=finetune: continue training a quantized checkpoint from exactly its codes and scales."""
    cfg = ctx.cfg
    if (done := finished_result(ctx)) is not None:
        return done
    hooks = build_hooks(cfg.hooks, ctx.run_dir)
    ckpt, model = load_init(ctx)
    announce(ctx, ckpt)
    if not ckpt.manifest.get("quant"):
        raise ConfigError(
            f"init_from: {ckpt.path} is a full-precision checkpoint; mode=finetune trains quantized checkpoints. "
            f"Quantize it with mode=qat init_from={ckpt.path} (or mode=ptq)"
        )
    stored = QuantRecipe.from_manifest(ckpt.manifest["quant"])
    if any(o.lstrip("+~").startswith("quant") for o in ctx.overrides):  # only an explicit request can clash
        check_same_scheme(stored, QuantRecipe.from_config(cfg.quant), ckpt.path)
    recipe = stored.with_(kernel=cfg.quant.kernel, learn_scales=cfg.qat.learn_scales)
    corpus = corpus_for(ctx, model.cfg.block_size)
    ref_loss = eval_fn_for(ctx, corpus, model.cfg.block_size)(model)
    recipe.to_fake(model)
    hooks.after_prepare(model)
    trainer, _ = train_model(
        ctx,
        model,
        corpus,
        quant=lambda: recipe.manifest_section(model),
        after_step=[hooks.after_step],
        param_groups=qat_param_groups(model, cfg),
    )
    return finish_quantized(ctx, model, trainer, hooks, recipe, ref_loss, "finetune")


def check_same_scheme(stored: QuantRecipe, requested: QuantRecipe, path: Path) -> None:
    """An explicit `quant=` request must name the checkpoint's weight format (finetune keeps it); exit 2 otherwise."""
    if requested.full_precision:
        return
    if (difference := stored.difference(requested, weights_only=True)) is not None:
        raise ConfigError(
            f"quant: {path} {difference}; finetune keeps the checkpoint's scheme: "
            f"drop the quant override or use quant={stored.scheme}"
        )
