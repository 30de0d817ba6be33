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

from qtrain.config import distills
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
        if distills(cfg):
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
    recipe = QuantRecipe.from_config(cfg.quant, learn_scales=cfg.qat.learn_scales)
    prepare_qat(ctx, model, corpus, hooks, recipe)
    before_step = [schedule_callback(cfg)]
    loss_fn: Callable[..., torch.Tensor] = cross_entropy_loss
    if teacher is not None:
        q = cfg.qat
        loss_fn = distill = DistillLoss(
            teacher, q.distill_weight, q.distill_temperature, q.distill_schedule, cfg.train.max_steps
        )
        before_step.append(distill.before_step)
    trainer, _ = train_model(
        ctx,
        model,
        corpus,
        quant=lambda: recipe.manifest_section(model),
        before_step=before_step,
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


class DistillLoss:
    """Cross-entropy plus `weight` x KL(teacher || student) at `temperature` (teacher frozen).

    `schedule` "linear": the KL weight falls from `weight` at step 0 to zero at `max_steps` (set by
    `before_step`, so a resumed run picks up the weight of its step); "constant": `weight` throughout.
    """

    def __init__(self, teacher: nn.Module, weight: float, temperature: float, schedule: str, max_steps: int):
        self.teacher, self.base, self.temperature = teacher, weight, temperature
        self.schedule, self.max_steps = schedule, max(1, max_steps)
        self.weight = weight

    def before_step(self, step: int, model: nn.Module) -> None:
        if self.schedule == "linear":
            self.weight = self.base * max(0.0, 1.0 - step / self.max_steps)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        if self.weight == 0.0:
            return ce
        with torch.no_grad():
            t_logits = self.teacher(x).float()
        t = self.temperature
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
        return ce + self.weight * kl
