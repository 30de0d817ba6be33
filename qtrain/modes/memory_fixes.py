"""What to change when a run's memory estimate (`qtrain.modes.memory`) does not fit: the remedies
the memory guard prints, each with the memory it would need."""

from __future__ import annotations

import dataclasses

from qtrain.config import TRAINING_MODES, ModelConfig, RunConfig, distills
from qtrain.modes.memory import IMPORTED, Fits, Setting, estimate, gb
from qtrain.quant.ptq import METHODS


def _with_train(cfg: RunConfig, **changes: object) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))  # type: ignore[arg-type]


def _split_batch(cfg: RunConfig, fits: Fits, checkpointing: bool) -> str | None:
    """The largest ``train.batch_size`` dividing the current one that fits, same sequences per step."""
    t = cfg.train
    for b in sorted((d for d in range(1, t.batch_size) if t.batch_size % d == 0), reverse=True):
        accum = t.grad_accum * t.batch_size // b
        need = fits(_with_train(cfg, batch_size=b, grad_accum=accum, activation_checkpointing=checkpointing))
        if need is not None:
            flag = " train.activation_checkpointing=true" if checkpointing and not t.activation_checkpointing else ""
            return (
                f"train.batch_size={b} train.grad_accum={accum}{flag} "
                f"(the same {t.batch_size * t.grad_accum} sequences per step; about {gb(need)})"
            )
    return None


def _training_remedies(cfg: RunConfig, fits: Fits) -> list[str]:
    out: list[str] = []
    split = _split_batch(cfg, fits, cfg.train.activation_checkpointing)
    if split:
        out.append(split)
    if not cfg.train.activation_checkpointing:
        need = fits(_with_train(cfg, activation_checkpointing=True))
        if need is not None:
            out.append(f"train.activation_checkpointing=true (about {gb(need)}; one more forward per block)")
        elif split is None and (both := _split_batch(cfg, fits, True)):
            out.append(both)
    if distills(cfg) and (need := fits(dataclasses.replace(cfg, qat=dataclasses.replace(cfg.qat, distill=False)))):
        out.append(f"qat.distill=false (no full-precision teacher copy; cross-entropy only; about {gb(need)})")
    return out


def remedies(cfg: RunConfig, model: ModelConfig, limit: int, setting: Setting = Setting()) -> list[str]:
    """Overrides that bring the estimate under `limit`, each with the memory it would need.

    Training: a smaller ``train.batch_size`` with a larger ``train.grad_accum`` (the same
    sequences per optimizer step), ``train.activation_checkpointing=true``, or both; for a
    fresh model when neither fits, and for a Hugging Face import in any mode, a shorter
    ``model.block_size``. GPTQ calibration: fewer ``ptq.calib_batches``. Empty when nothing
    qtrain can change fits.
    """

    def fits(c: RunConfig, m: ModelConfig = model) -> int | None:
        total = estimate(c, m, setting).total
        return total if total <= limit else None

    out: list[str] = []
    if cfg.mode.name in TRAINING_MODES:
        out = _training_remedies(cfg, fits)
    if not out and (setting.loaded == IMPORTED or setting.loaded is None and cfg.mode.name in TRAINING_MODES):
        halvings = 12 if setting.loaded == IMPORTED else 5  # an import's context may be 131072 tokens
        for size in (model.block_size // 2**k for k in range(1, halvings + 1)):
            if size >= 16 and (need := fits(cfg, dataclasses.replace(model, block_size=size))) is not None:
                out.append(f"model.block_size={size} (a shorter context; about {gb(need)})")
                break
    if cfg.mode.name == "ptq" and METHODS[cfg.ptq.method].needs_calibration or cfg.mode.name == "qat" and cfg.init_from:
        for n in (cfg.ptq.calib_batches // 2**k for k in range(1, 8)):
            if n >= 1 and (need := fits(dataclasses.replace(cfg, ptq=dataclasses.replace(cfg.ptq, calib_batches=n)))):
                out.append(f"ptq.calib_batches={n} (about {gb(need)})")
                break
    return out
