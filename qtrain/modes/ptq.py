"""`mode=ptq`: calibrate and convert a full-precision checkpoint to packed integer weights; evaluate both."""

from __future__ import annotations

from typing import Any

import torch

from qtrain.console import warn
from qtrain.errors import ConfigError
from qtrain.modes.context import RunContext, announce, calibration_batches, corpus_for, eval_fn_for
from qtrain.modes.loading import load_init, require_full_precision
from qtrain.modes.results import quant_report
from qtrain.modes.saving import save
from qtrain.quant.ptq import METHODS
from qtrain.quant.recipe import QuantRecipe


def run_ptq(ctx: RunContext) -> dict[str, Any]:
    """mode=ptq: calibrate and convert a full-precision checkpoint; evaluate both."""
    cfg = ctx.cfg
    ckpt, model = load_init(ctx)
    require_full_precision(ckpt, "ptq")
    announce(ctx, ckpt)
    if cfg.hooks:  # they act on QAT's prepare, fake-quant and steps: say so rather than ignore them silently
        warn(f"mode=ptq does not run hooks (they act on mode=qat/finetune); ignoring {len(cfg.hooks)} hook(s)")
    corpus = corpus_for(ctx, model.cfg.block_size)
    evaluate = eval_fn_for(ctx, corpus, model.cfg.block_size)
    ref_loss = evaluate(model)
    method = cfg.ptq.method
    calib: list[torch.Tensor] = []
    if needs_calibration(method):
        calib = calibration_batches(ctx, corpus, model.cfg.block_size, cfg.ptq.calib_batches)
    recipe = QuantRecipe.from_config(cfg.quant)
    model.eval()
    try:
        recipe.quantize(model, method, calib, damp=cfg.ptq.damp, grid=cfg.ptq.mse_grid, act_order=cfg.ptq.act_order)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    vloss = evaluate(model)
    step = int(ckpt.manifest["step"])
    path = save(ctx, model, step, quant=lambda: recipe.manifest_section(model, method))
    return quant_report(ctx, model, step, vloss, path, recipe, method, ref_loss)


def needs_calibration(method: str) -> bool:
    """Whether PTQ `method` needs calibration batches (the PTQ registry says; an unknown method is refused later)."""
    entry = METHODS.get(method)
    return entry is not None and entry.needs_calibration
