"""Continuing a run from its own checkpoints (`resume=auto|must|never`).

`try_resume` loads the newest usable checkpoint of the run dir into the model and trainer;
`finished_result` recognises a run dir that already holds its converted final result.
What a resumed run may change is `qtrain.modes.resume_check`'s.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from torch import nn

from qtrain import checkpoint as ck
from qtrain.config import TrainConfig
from qtrain.console import info, warn
from qtrain.errors import CheckpointError, ConfigError
from qtrain.modes import resume_check
from qtrain.modes.context import RunContext, config_dict, corpus_for, eval_fn_for, unwrap, use_tokenizer
from qtrain.modes.loading import model_from_checkpoint
from qtrain.modes.results import quant_report
from qtrain.quant.recipe import QuantRecipe
from qtrain.train import Trainer, lr_factor


def try_resume(ctx: RunContext, model: nn.Module, trainer: Trainer) -> bool:
    """Continue from the run dir's newest usable checkpoint per `resume`; True if resumed.

    A checkpoint that fails for any reason (seal, hashes, manifest values, shapes, trainer
    state) is skipped with one warning for the next older one; with none usable, `auto`
    starts fresh and says so, `must` exits 3 (2 when there is nothing at all). One written
    for another model or quantization is a usage error (exit 2), never skipped.
    """
    if ctx.cfg.resume == "never":
        return False
    found, ckpt, skipped = ck.newest_usable(ctx.ckpt_root, lambda d: resume_from(d, model, trainer, ctx))
    for d, why in skipped:
        warn(f"resume: ignoring {d} ({why})")
    if found is None:
        refused = f" ({len(skipped)} refused, see the warnings above)" if skipped else ""
        if ctx.cfg.resume == "must":
            if skipped:
                raise CheckpointError(f"resume=must: no usable checkpoint in {ctx.ckpt_root}{refused}")
            raise ConfigError(f"resume=must: no valid checkpoint in {ctx.ckpt_root}")
        info(f"resume=auto: no valid checkpoint in {ctx.ckpt_root}{refused}; starting fresh")
        return False
    info(f"resume: continuing from {found} (step {trainer.step})")
    assert ckpt is not None
    changes = settings_changes(ctx, ckpt)
    if changes.applied:
        info(resume_check.applied_note(found, changes.applied))
    if changes.kept:  # the trainer reads ctx.cfg.train at every step: the schedule stays the checkpoint's
        resume_check.keep_values(ctx.cfg, changes.kept)
        info(resume_check.kept_note(found, changes.kept))
    saved = (ckpt.manifest.get("config") or {}).get("train")
    if note := schedule_change(saved, ctx.cfg.train, trainer.step):
        warn(f"resume: {note}")
    return True


def schedule_change(saved: dict[str, Any] | None, now: TrainConfig, step: int) -> str | None:
    """What changes when a run resumes at `step` with other schedule settings than its
    checkpoint was trained with (`saved`: the checkpoint's ``train`` config), or None.

    Extending ``train.max_steps`` stretches the cosine: the learning rate jumps at the resumed
    step, and the result differs from a run started with the new ``max_steps``.
    """
    keys = [k for k in ("max_steps", "warmup_steps", "lr", "min_lr_ratio") if k in (saved or {})]
    changed = [k for k in keys if saved is not None and saved[k] != getattr(now, k)]
    if saved is None or not changed:
        return None
    what = ", ".join(f"train.{k} {saved[k]} -> {getattr(now, k)}" for k in changed)
    if step >= now.max_steps:
        return f"{what}: the checkpoint is at step {step}, so there is nothing left to train"
    old = replace(now, **{k: saved[k] for k in keys})
    lr_old, lr_new = old.lr * lr_factor(step, old), now.lr * lr_factor(step, now)
    return (
        f"{what} since the checkpoint was written: the learning-rate schedule changes (at step {step} "
        f"the lr goes from {lr_old:.3g} to {lr_new:.3g}, then decays to {now.lr * now.min_lr_ratio:.3g} at step "
        f"{now.max_steps}); the result will differ from a run started with these settings"
    )


def settings_changes(ctx: RunContext, ckpt: ck.Checkpoint) -> resume_check.Comparison:
    """This run's settings and corpus compared with those `ckpt` was trained with (case 38)."""
    saved = ckpt.manifest.get("config")
    if not isinstance(saved, dict):  # a checkpoint that records no config: nothing to compare
        return resume_check.Comparison()
    return resume_check.compare(saved, config_dict(ctx.cfg), ckpt.manifest.get("corpus"), ctx.corpus)


def _check_same_run(path: Path, ckpt: ck.Checkpoint, model: nn.Module, ctx: RunContext) -> None:
    """Refuse (exit 2) a checkpoint of another model, quantization or settings, before loading anything."""
    stored = ckpt.manifest.get("model") or {}
    ours = asdict(unwrap(model).cfg)
    differ = [
        f"model.{k}={stored.get(k)!r} (this run: {v!r})" for k, v in ours.items() if k != "name" and stored.get(k) != v
    ]
    if differ:
        raise ConfigError(
            f"resume: {path} holds another model: {', '.join(differ)}; start a new run dir (hydra.run.dir=...)"
        )
    saved_tok = (ckpt.manifest.get("tokenizer") or {}).get("sha256")
    if ctx.tokenizer is not None and saved_tok != ctx.tokenizer.sha256:  # never another tokenizer's ids
        section = ckpt.manifest.get("tokenizer") or {"kind": "bytes"}
        raise ConfigError(
            f"resume: {path} was trained with the tokenizer {section.get('kind')} (vocab {section.get('vocab_size')}, "
            f"sha256 {str(saved_tok)[:12]}), this run uses {ctx.tokenizer.describe()}; re-run with the "
            f"checkpoint's data.tokenizer settings, or start a new run dir (hydra.run.dir=...)"
        )
    mismatch = QuantRecipe.from_manifest(ckpt.manifest.get("quant")).layer_difference(model)
    if mismatch:  # never a silent load of another scheme's codes and scales (shapes can coincide)
        raise ConfigError(
            f"resume: {path} {mismatch}. Re-run with the checkpoint's quant settings, "
            f"or start a new run dir (hydra.run.dir=...)"
        )
    if refused := settings_changes(ctx, ckpt).refused:  # before anything is loaded into the model
        raise ConfigError(resume_check.refusal(path, refused))


def resume_from(path: Path, model: nn.Module, trainer: Trainer, ctx: RunContext) -> ck.Checkpoint:
    """Load checkpoint `path` into the run's model and trainer.

    Raises:
        CheckpointError: `path` is unusable (the caller tries the next older one).
        ConfigError: it was written with other model, quantization, data, optimizer or
            schedule settings (`qtrain.modes.resume_check`).
    """
    ckpt = ck.load_checkpoint(path)
    _check_same_run(path, ckpt, model, ctx)
    if "trainer" not in ckpt.trainer_meta:
        if (ckpt.manifest.get("quant") or {}).get("state") == "packed":
            raise ConfigError(
                f"resume: {path} is a converted final checkpoint (no trainer state); "
                f"use it with init_from={path} in a new run dir instead"
            )
        raise CheckpointError(f"{path}: holds no trainer state to resume from")
    groups = [[tuple(p.shape) for p in g["params"]] for g in trainer.optimizer.param_groups]
    try:
        ck.validate_trainer_state(path / ck.TRAINER_META, ckpt.trainer_meta, {}, ckpt.manifest["step"], groups)
    except CheckpointError as err:
        raise ConfigError(f"resume: {path} was written by a run with other optimizer settings: {err}") from None
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
        trainer.load_state_dict(ckpt.trainer_meta["trainer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: does not load into this run's model and optimizer: {err}") from None
    return ckpt


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
    stored, requested = QuantRecipe.from_manifest(quant), QuantRecipe.from_config(ctx.cfg.quant)
    mismatch = stored.difference(requested)
    if mismatch and (ctx.cfg.mode.name == "qat" or not requested.full_precision):  # never another scheme's result
        raise ConfigError(
            f"resume: {found} {mismatch}. Re-run with the checkpoint's quant settings, "
            f"or start a new run dir (hydra.run.dir=...)"
        )
    info(f"resume: {found} is this run's converted final checkpoint; re-evaluating it")
    ckpt = ck.load_checkpoint(found, with_trainer=False)
    use_tokenizer(ctx, ckpt)
    model = model_from_checkpoint(ckpt, ctx.device, ctx.cfg.quant.kernel)
    corpus = corpus_for(ctx, model.cfg.block_size)
    vloss = eval_fn_for(ctx, corpus, model.cfg.block_size)(model)
    return quant_report(ctx, model, manifest["step"], vloss, found, stored, stored.method, None)
