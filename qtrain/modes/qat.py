"""`mode=qat`: fake-quant training (from scratch or a full-precision `init_from`), then convert.

The steps: reuse a finished result in this run dir if there is one; load or initialise the
model; measure the full-precision reference; prepare fake-quant (from round-to-nearest, or
from a PTQ result itself); train with the QAT schedule (optionally distilling from the
full-precision teacher); evaluate fake-quant, convert, evaluate packed, save, report.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.data import Corpus
from qtrain.errors import ConfigError
from qtrain.model import GPT
from qtrain.modes.context import RunContext, announce, calibration_batches, corpus_for, eval_fn_for
from qtrain.modes.loading import fresh_model, load_init, require_full_precision
from qtrain.modes.resume import finished_result
from qtrain.modes.training import finish_quantized, qat_param_groups, schedule_callback, train_model
from qtrain.quant.hooks import HookSet, build_hooks
from qtrain.quant.recipe import QuantRecipe
from qtrain.train import cross_entropy_loss


def run_qat(ctx: RunContext) -> dict[str, Any]:
    """mode=qat: fake-quant training (from scratch or a full-precision init_from), then convert."""
    cfg = ctx.cfg
    if (done := finished_result(ctx)) is not None:
        return done
    hooks = build_hooks(cfg.hooks, ctx.run_dir)
    ref_loss, teacher = None, None
    if cfg.init_from:
        ckpt, model = load_init(ctx)
        require_full_precision(ckpt, "qat")
        announce(ctx, ckpt)
    else:
        model = fresh_model(ctx)  # memory checked first: a run that cannot fit prints only the refusal
        announce(ctx)
    corpus = corpus_for(ctx, model.cfg.block_size)
    if cfg.init_from:
        ref_loss = eval_fn_for(ctx, corpus, model.cfg.block_size)(model)
        if cfg.qat.distill:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
    recipe = QuantRecipe.from_config(cfg.quant, learn_scales=cfg.qat.learn_scales)
    prepare_qat(ctx, model, corpus, hooks, recipe)
    loss_fn = (
        distill_loss(teacher, cfg.qat.distill_weight, cfg.qat.distill_temperature)
        if teacher is not None
        else cross_entropy_loss
    )
    trainer, _ = train_model(
        ctx,
        model,
        corpus,
        quant=lambda: recipe.manifest_section(model),
        before_step=[schedule_callback(cfg)],
        after_step=[hooks.after_step],
        loss_fn=loss_fn,
        param_groups=qat_param_groups(model, cfg),
    )
    return finish_quantized(ctx, model, trainer, hooks, recipe, ref_loss, f"qat{'+distill' if teacher else ''}")


def prepare_qat(ctx: RunContext, model: GPT, corpus: Corpus, hooks: HookSet, recipe: QuantRecipe) -> GPT:
    """Swap in fake-quant layers per `qat.init`: round-to-nearest, or the PTQ result of that method."""
    cfg = ctx.cfg
    init = cfg.qat.init
    if init == "auto":  # from a trained model, start where the best PTQ ends (measured: regime Q)
        init = "gptq" if cfg.init_from else "rtn"
    try:
        if init == "rtn":
            recipe.prepare(model)
        else:
            # Start from the PTQ result itself: latent weights = its dequantized codes, scales
            # = its scales (learnable with qat.learn_scales, else fixed), so step 0 of QAT
            # computes exactly what `mode=ptq ptq.method=<init>` would have shipped.
            calib = calibration_batches(ctx, corpus, model.cfg.block_size, cfg.ptq.calib_batches)
            model.eval()
            recipe.quantize(model, init, calib, damp=cfg.ptq.damp, grid=cfg.ptq.mse_grid, act_order=cfg.ptq.act_order)
            recipe.to_fake(model)
            model.train()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    hooks.after_prepare(model)
    return model


def distill_loss(teacher: nn.Module, weight: float, temperature: float) -> Callable[..., torch.Tensor]:
    """Cross-entropy plus `weight` x KL(teacher || student) at `temperature` (teacher frozen)."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        with torch.no_grad():
            t_logits = teacher(x).float()
        t = temperature
        kl = (
            F.kl_div(
                F.log_softmax(logits / t, -1).view(-1, logits.size(-1)),
                F.log_softmax(t_logits / t, -1).view(-1, logits.size(-1)),
                log_target=True,
                reduction="batchmean",
            )
            * t
            * t
        )
        return ce + weight * kl

    return loss_fn
