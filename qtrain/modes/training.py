"""Training as `train`, `qat` and `finetune` run it, and how a quantized training run finishes.

`train_model` builds the same `Trainer` for every training mode (sampler, validation,
checkpoints through `qtrain.modes.saving`, resume) and runs it; `finish_quantized` turns a
fake-quant model into the packed one it ships, saves and reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from qtrain.config import RunConfig
from qtrain.console import rank
from qtrain.data import BatchSampler, Corpus
from qtrain.evaluate import perplexity
from qtrain.model import GPT
from qtrain.modes.context import RunContext, eval_fn_for, val_bpb, world_size
from qtrain.modes.results import quant_report
from qtrain.modes.resume import try_resume
from qtrain.modes.saving import QuantSection, save, saver
from qtrain.modes.sweep_jobs import METRICS_FILE
from qtrain.progress import TrainProgress
from qtrain.quant import freeze_scales, scale_parameters, set_fake_quant
from qtrain.quant.hooks import HookSet
from qtrain.quant.recipe import QuantRecipe
from qtrain.train import LossFn, StepCallback, TrainCallbacks, Trainer, cross_entropy_loss, default_param_groups


def train_model(
    ctx: RunContext,
    model: GPT,
    corpus: Corpus,
    *,
    quant: QuantSection | None = None,
    before_step: Sequence[StepCallback] = (),
    after_step: Sequence[StepCallback] = (),
    loss_fn: LossFn = cross_entropy_loss,
    param_groups: list[dict[str, Any]] | None = None,
) -> tuple[Trainer, dict[str, Any]]:
    """Train `model` on `corpus` to `train.max_steps`, resuming from the run dir per `resume`.

    Args:
        ctx: the run.
        model: the model to train (on the run's device).
        corpus: its corpus (training windows and validation).
        quant: builds the `quant` section of each checkpoint's manifest (None: full precision).
        before_step: callbacks before each optimizer step (the QAT schedule).
        after_step: callbacks after each optimizer step (quantization hooks).
        loss_fn: the training loss.
        param_groups: AdamW groups (None: `default_param_groups`).

    Returns:
        The trainer (its step and evaluation) and `Trainer.fit`'s summary.
    """
    cfg = ctx.cfg
    block = model.cfg.block_size
    sampler = BatchSampler(corpus.train, block, cfg.train.batch_size, cfg.seed, rank(), world_size())
    callbacks = TrainCallbacks(
        eval_fn=eval_fn_for(ctx, corpus, block),
        eval_extra=lambda loss: {"val_bpb": val_bpb(ctx, loss)},
        save_fn=saver(ctx, model, quant),
        before_step=list(before_step),
        after_step=list(after_step),
        stop=ctx.stop,
    )
    trainer = Trainer(
        model,
        cfg.train,
        sampler,
        ctx.device,
        callbacks=callbacks,
        loss_fn=loss_fn,
        param_groups=param_groups,
        metrics_path=ctx.run_dir / METRICS_FILE,
        compile_model=cfg.compile,
    )
    try_resume(ctx, model, trainer)
    return trainer, trainer.fit(TrainProgress(compiling=cfg.compile))


def schedule_callback(cfg: RunConfig) -> Callable[[int, nn.Module], None]:
    """QAT schedule: weight fake-quant from `qat.start_step`, activations from `qat.act_start_step`,
    scales frozen from `qat.freeze_step`; applied before the forward of each optimizer step."""
    q = cfg.qat
    frozen = [False]

    def before(step: int, model: nn.Module) -> None:
        set_fake_quant(model, weight=step >= q.start_step, activations=step >= q.act_start_step)
        if q.freeze_step >= 0 and step >= q.freeze_step and not frozen[0]:
            freeze_scales(model)
            frozen[0] = True

    return before


def qat_param_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """Default AdamW groups, with learnable scales in their own group (own lr, no decay)."""
    scales = scale_parameters(model)
    ids = {id(p) for p in scales}
    groups = default_param_groups(model, cfg.train)
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0, "base_lr": cfg.qat.scale_lr})
    return groups


def finish_quantized(
    ctx: RunContext,
    model: GPT,
    trainer: Trainer,
    hooks: HookSet,
    recipe: QuantRecipe,
    ref_loss: float | None,
    method: str,
) -> dict[str, Any]:
    """Evaluate fake-quant, convert, evaluate packed, save, report."""
    evaluate = trainer.callbacks.eval_fn
    assert evaluate is not None
    set_fake_quant(model, weight=True, activations=True)
    fake_loss = evaluate(model)
    hooks.before_convert(model)
    recipe.convert(model)
    vloss = evaluate(model)
    path = save(ctx, model, trainer.step, quant=lambda: recipe.manifest_section(model, method))
    report = quant_report(ctx, model, trainer.step, vloss, path, recipe, method, ref_loss)
    report["fake_quant_val_loss"] = fake_loss
    report["fake_quant_val_ppl"] = perplexity(fake_loss)
    report["fake_quant_val_bpb"] = val_bpb(ctx, fake_loss)
    return report
