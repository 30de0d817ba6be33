"""Quantized modes: `ptq`, `qat` and `finetune`.

Each loads what it needs through `runner`, trains with the same `Trainer` as `mode=train`,
converts to packed integer weights with `qtrain.quant`, evaluates, saves a checkpoint whose
manifest describes every quantized layer, and returns the report.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtrain import checkpoint as ck
from qtrain.config import QuantConfig, RunConfig
from qtrain.console import info, rank, warn
from qtrain.data import BatchSampler, Corpus
from qtrain.errors import ConfigError
from qtrain.evaluate import perplexity
from qtrain.model import GPT
from qtrain.progress import TrainProgress
from qtrain.quant import api
from qtrain.quant.hooks import HookSet, build_hooks
from qtrain.quant.ptq import quantize_ptq
from qtrain.runner import (
    RunContext,
    announce,
    base_report,
    benchmark,
    corpus_for,
    eval_fn_for,
    fresh_model,
    load_init,
    model_from_checkpoint,
    payload_for,
    try_resume,
    world_size,
)
from qtrain.train import Hooks, Trainer, cross_entropy_loss, default_param_groups


def quant_bits(model: nn.Module) -> dict[str, float]:
    """Stored bits per quantized weight (codes, scales and zero points included)."""
    weights = stored = 0
    for _, m in model.named_modules():
        if isinstance(m, api.PackedLinear):
            weights += m.in_features * m.out_features
            stored += sum(t.numel() * t.element_size() for t in m.state_dict().values())
    return {"bits_per_weight": 8 * stored / weights if weights else 0.0, "quantized_weights": weights}


def _calibration(ctx: RunContext, corpus: Corpus, block: int, n_batches: int) -> list[torch.Tensor]:
    sampler = BatchSampler(corpus.train, block, ctx.cfg.train.batch_size, ctx.cfg.seed + 17)
    return [sampler.next_batch()[0].to(ctx.device) for _ in range(n_batches)]


def _require_full_precision(ckpt: ck.Checkpoint, mode: str) -> None:
    if ckpt.manifest.get("quant"):
        scheme = ckpt.manifest["quant"].get("config", {}).get("scheme", "?")
        raise ConfigError(
            f"init_from: {ckpt.path} is already quantized ({scheme}); mode={mode} needs a full-precision "
            f"checkpoint. To train a quantized checkpoint further use mode=finetune init_from={ckpt.path}"
        )


def quant_manifest(
    qcfg: QuantConfig, model: nn.Module, state: str, method: str | None = None, learn_scales: bool = False
) -> dict[str, Any]:
    """The manifest's `quant` entry: scheme config, fake or packed, per-layer specs."""
    return {
        "config": asdict(qcfg),
        "state": state,
        "method": method,
        "learn_scales": learn_scales,
        "layers": api.layer_specs(model),
    }


def _save_quantized(
    ctx: RunContext,
    model: nn.Module,
    step: int,
    qcfg: QuantConfig,
    method: str | None,
    trainer_state: dict[str, Any] | None = None,
) -> Path | None:
    if rank() != 0:
        return None
    payload = payload_for(ctx, model, step, trainer_state)
    payload.manifest["quant"] = quant_manifest(qcfg, model, "packed", method)
    path = ck.save_checkpoint(ctx.ckpt_root, step, payload, ctx.cfg.train.keep)
    info(f"checkpoint: {path}")
    return path


def _quant_report(
    ctx: RunContext,
    model: nn.Module,
    step: int,
    vloss: float,
    path: Path | None,
    qcfg: QuantConfig,
    method: str | None,
    ref_loss: float | None,
) -> dict[str, Any]:
    report = base_report(ctx, model, step, vloss, path, {**asdict(qcfg), "method": method})
    report.update(quant_bits(model))
    if isinstance(model, GPT):  # the shipped (packed) model's decode speed, timed as bench_s
        report.update(benchmark(model, ctx.cfg.eval, prefill=False))
    if ref_loss is not None:
        report["reference_val_loss"] = ref_loss
        report["reference_val_ppl"] = perplexity(ref_loss)
        report["ppl_vs_reference"] = perplexity(vloss) / perplexity(ref_loss)
    return report


# ---------------------------------------------------------------- ptq


def run_ptq(ctx: RunContext) -> dict[str, Any]:
    """mode=ptq: calibrate and convert a full-precision checkpoint; evaluate both."""
    cfg = ctx.cfg
    ckpt, model = load_init(ctx)
    _require_full_precision(ckpt, "ptq")
    announce(ctx, ckpt)
    if cfg.hooks:  # they act on QAT's prepare, fake-quant and steps: say so rather than ignore them silently
        warn(f"mode=ptq does not run hooks (they act on mode=qat/finetune); ignoring {len(cfg.hooks)} hook(s)")
    corpus = corpus_for(ctx, model.cfg.block_size)
    evaluate = eval_fn_for(ctx, corpus, model.cfg.block_size)
    ref_loss = evaluate(model)
    calib = _calibration(ctx, corpus, model.cfg.block_size, cfg.ptq.calib_batches) if cfg.ptq.method == "gptq" else []
    model.eval()
    try:
        quantize_ptq(model, cfg.quant, cfg.ptq.method, calib, cfg.ptq.damp, cfg.ptq.mse_grid)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    vloss = evaluate(model)
    step = int(ckpt.manifest["step"])
    path = _save_quantized(ctx, model, step, cfg.quant, cfg.ptq.method)
    return _quant_report(ctx, model, step, vloss, path, cfg.quant, cfg.ptq.method, ref_loss)


# ---------------------------------------------------------------- qat


def schedule_callback(cfg: RunConfig) -> Callable[[int, nn.Module], None]:
    """QAT schedule: weight fake-quant from `qat.start_step`, activations from `qat.act_start_step`,
    scales frozen from `qat.freeze_step`; applied before the forward of each optimizer step."""
    q = cfg.qat
    frozen = [False]

    def before(step: int, model: nn.Module) -> None:
        api.set_fake_quant(model, weight=step >= q.start_step, activations=step >= q.act_start_step)
        if q.freeze_step >= 0 and step >= q.freeze_step and not frozen[0]:
            api.freeze_scales(model)
            frozen[0] = True

    return before


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


def qat_param_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """Default AdamW groups, with learnable scales in their own group (own lr, no decay)."""
    scales = api.scale_parameters(model)
    ids = {id(p) for p in scales}
    groups = default_param_groups(model, cfg.train)
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0, "base_lr": cfg.qat.scale_lr})
    return groups


def _prepare_qat(ctx: RunContext, model: GPT, corpus: Corpus, hooks: HookSet) -> GPT:
    cfg = ctx.cfg
    init = cfg.qat.init
    if init == "auto":  # from a trained model, start where the best PTQ ends (measured: regime Q)
        init = "gptq" if cfg.init_from else "rtn"
    try:
        if init == "rtn":
            api.prepare(model, cfg.quant, learn_scales=cfg.qat.learn_scales)
        else:
            # Start from the PTQ result itself: latent weights = its dequantized codes, scales
            # = its scales (learnable with qat.learn_scales, else fixed), so step 0 of QAT
            # computes exactly what `mode=ptq ptq.method=<init>` would have shipped.
            calib = _calibration(ctx, corpus, model.cfg.block_size, cfg.ptq.calib_batches)
            model.eval()
            quantize_ptq(model, cfg.quant, init, calib, cfg.ptq.damp, cfg.ptq.mse_grid)
            api.to_fake(model, learn_scales=cfg.qat.learn_scales)
            model.train()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    hooks.after_prepare(model)
    return model


def _train_quantized(
    ctx: RunContext,
    model: GPT,
    corpus: Corpus,
    hooks: HookSet,
    qcfg: QuantConfig,
    loss_fn: Callable[..., torch.Tensor],
    schedule: bool,
) -> Trainer:
    cfg = ctx.cfg
    block = model.cfg.block_size
    sampler = BatchSampler(corpus.train, block, cfg.train.batch_size, cfg.seed, rank(), world_size())
    thooks = Hooks(eval_fn=eval_fn_for(ctx, corpus, block), stop=ctx.stop)
    if schedule:
        thooks.before_step.append(schedule_callback(cfg))
    thooks.after_step.append(hooks.after_step)
    trainer = Trainer(
        model,
        cfg.train,
        sampler,
        ctx.device,
        hooks=thooks,
        loss_fn=loss_fn,
        param_groups=qat_param_groups(model, cfg),
        metrics_path=ctx.run_dir / "metrics.jsonl",
        compile_model=cfg.compile,
    )

    def save(step: int, state: dict[str, Any]) -> Path | None:
        if rank() != 0:
            return None
        payload = payload_for(ctx, model, step, state)
        payload.manifest["quant"] = quant_manifest(qcfg, model, "fake", learn_scales=cfg.qat.learn_scales)
        path = ck.save_checkpoint(ctx.ckpt_root, step, payload, cfg.train.keep)
        info(f"checkpoint: {path}")
        return path

    thooks.save_fn = save
    try_resume(ctx, model, trainer)
    trainer.fit(TrainProgress(compiling=cfg.compile))
    return trainer


def _finish(
    ctx: RunContext,
    model: GPT,
    trainer: Trainer,
    hooks: HookSet,
    qcfg: QuantConfig,
    ref_loss: float | None,
    method: str,
) -> dict[str, Any]:
    """Evaluate fake-quant, convert, evaluate packed, save, report."""
    evaluate = trainer.hooks.eval_fn
    assert evaluate is not None
    api.set_fake_quant(model, weight=True, activations=True)
    fake_loss = evaluate(model)
    hooks.before_convert(model)
    api.convert(model, qcfg)
    vloss = evaluate(model)
    path = _save_quantized(ctx, model, trainer.step, qcfg, method)
    report = _quant_report(ctx, model, trainer.step, vloss, path, qcfg, method, ref_loss)
    report["fake_quant_val_loss"] = fake_loss
    report["fake_quant_val_ppl"] = perplexity(fake_loss)
    return report


def finished_result(ctx: RunContext) -> dict[str, Any] | None:
    """If this run dir already holds its converted final checkpoint, re-evaluate and report it."""
    if ctx.cfg.resume == "never":
        return None
    found, _ = ck.find_latest_valid(ctx.ckpt_root)
    if found is None:
        return None
    manifest = ck.read_manifest(found)
    quant = manifest.get("quant") or {}
    if quant.get("state") != "packed" or manifest["step"] < ctx.cfg.train.max_steps:
        return None
    requested = vars(ctx.cfg.quant)
    mismatch = ck.config_scheme_mismatch(quant, requested)
    if mismatch and (ctx.cfg.mode.name == "qat" or requested["scheme"] != "none"):  # never another scheme's result
        raise ConfigError(
            f"resume: {found} {mismatch}. Re-run with the checkpoint's quant settings, "
            f"or start a new run dir (hydra.run.dir=...)"
        )
    info(f"resume: {found} is this run's converted final checkpoint; re-evaluating it")
    ckpt = ck.load_checkpoint(found, with_trainer=False)
    model = model_from_checkpoint(ckpt, ctx.device, ctx.cfg.quant.kernel)
    corpus = corpus_for(ctx, model.cfg.block_size)
    vloss = eval_fn_for(ctx, corpus, model.cfg.block_size)(model)
    qcfg = checkpoint_quant_config(ckpt)
    return _quant_report(ctx, model, manifest["step"], vloss, found, qcfg, quant.get("method"), None)


def run_qat(ctx: RunContext) -> dict[str, Any]:
    """mode=qat: fake-quant training (from scratch or a full-precision init_from), then convert."""
    cfg = ctx.cfg
    if (done := finished_result(ctx)) is not None:
        return done
    hooks = build_hooks(cfg.hooks, ctx.run_dir)
    ref_loss, teacher = None, None
    if cfg.init_from:
        ckpt, model = load_init(ctx)
        _require_full_precision(ckpt, "qat")
        announce(ctx, ckpt)
    else:
        model = fresh_model(ctx)  # memory checked first: a run that cannot fit prints only the refusal
        announce(ctx)
    corpus = corpus_for(ctx, model.cfg.block_size)
    if cfg.init_from:
        ref_loss = eval_fn_for(ctx, corpus, model.cfg.block_size)(model)
        if cfg.qat.distill:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
    _prepare_qat(ctx, model, corpus, hooks)
    loss_fn = (
        distill_loss(teacher, cfg.qat.distill_weight, cfg.qat.distill_temperature)
        if teacher is not None
        else cross_entropy_loss
    )
    trainer = _train_quantized(ctx, model, corpus, hooks, cfg.quant, loss_fn, schedule=True)
    return _finish(ctx, model, trainer, hooks, cfg.quant, ref_loss, f"qat{'+distill' if teacher else ''}")


# ---------------------------------------------------------------- finetune


def checkpoint_quant_config(ckpt: ck.Checkpoint) -> QuantConfig:
    """The QuantConfig a quantized checkpoint was written with."""
    return QuantConfig(**ckpt.manifest["quant"]["config"])


def _scheme_text(q: QuantConfig) -> str:
    group = "per-channel" if q.group_size == -1 else f"group {q.group_size}"
    return f"{q.scheme} ({group}, {'symmetric' if q.symmetric else 'asymmetric'})"


def _check_same_scheme(requested: QuantConfig, stored: QuantConfig, path: Path) -> None:
    if requested.scheme == "none":
        return
    if requested.scheme != stored.scheme or (
        stored.scheme != "int8" and (requested.group_size, requested.symmetric) != (stored.group_size, stored.symmetric)
    ):
        raise ConfigError(
            f"quant: requested {_scheme_text(requested)} but {path} holds {_scheme_text(stored)}; "
            f"finetune keeps the checkpoint's scheme: drop the quant override or use quant={stored.scheme}"
        )


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
    qcfg = checkpoint_quant_config(ckpt)
    if any(o.lstrip("+~").startswith("quant") for o in ctx.overrides):  # only an explicit request can clash
        _check_same_scheme(cfg.quant, qcfg, ckpt.path)
    qcfg.kernel = cfg.quant.kernel
    corpus = corpus_for(ctx, model.cfg.block_size)
    ref_loss = eval_fn_for(ctx, corpus, model.cfg.block_size)(model)
    api.to_fake(model, learn_scales=cfg.qat.learn_scales)
    hooks.after_prepare(model)
    trainer = _train_quantized(ctx, model, corpus, hooks, qcfg, cross_entropy_loss, schedule=False)
    return _finish(ctx, model, trainer, hooks, qcfg, ref_loss, "finetune")
