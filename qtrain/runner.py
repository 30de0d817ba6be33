"""Mode functions: each loads what it needs, runs the library code, saves and reports.

`cli` composes and validates the config, then `qtrain.modes.run(ctx)` calls the mode function.
Everything here is plain library code that tests call directly with a `RunContext`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from qtrain import checkpoint as ck
from qtrain.config import ModelConfig, QuantConfig, RunConfig
from qtrain.console import console, info, rank, warn
from qtrain.data import BatchSampler, Corpus, load_corpus, val_starts
from qtrain.errors import CheckpointError, ConfigError
from qtrain.evaluate import decode_speed, generate, perplexity, prefill_speed, val_loss
from qtrain.model import GPT
from qtrain.quant import api
from qtrain.train import Hooks, StopFlag, Trainer, progress_printer


@dataclass
class RunContext:
    """What every mode function gets."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    stop: StopFlag = field(default_factory=StopFlag)
    t0: float = field(default_factory=time.perf_counter)
    overrides: list[str] = field(default_factory=list)
    """The command-line overrides (to tell an explicit `quant=...` from the default)."""

    @property
    def ckpt_root(self) -> Path:
        """The run's `checkpoints/` directory."""
        return self.run_dir / "checkpoints"


# ---------------------------------------------------------------- shared pieces


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain JSON data."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def fresh_model(ctx: RunContext) -> GPT:
    """A newly initialised model on the run's device."""
    model = GPT(ctx.cfg.model)
    model.init_weights(ctx.cfg.seed)
    return model.to(ctx.device)


def model_from_checkpoint(ckpt: ck.Checkpoint, device: torch.device, kernel: str = "auto") -> GPT:
    """Rebuild the model a checkpoint describes (from its manifest alone) and load its weights.

    Full precision, packed (PTQ/QAT/finetune results) and fake-quant (QAT in progress)
    checkpoints all rebuild without any config: shapes and per-layer schemes come from the
    manifest. Loading is strict.

    Raises:
        CheckpointError: the state does not match the manifest's model.
    """
    model = GPT(ModelConfig(**ckpt.manifest["model"]))
    quant = ckpt.manifest.get("quant")
    if quant and quant.get("state") == "fake":
        qcfg = QuantConfig(**quant["config"])
        for name in api.target_layers(model, qcfg):
            if name not in quant["layers"]:  # kept in full precision by a hook
                api.keep_full_precision(model.get_submodule(name))
        api.prepare(model, qcfg, learn_scales=bool(quant.get("learn_scales")))
    elif quant:
        api.build_packed_skeleton(model, quant["layers"], kernel)
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt.path}: tensors do not match the manifest's model: {err}") from None
    return model.to(device)


def load_init(ctx: RunContext) -> tuple[ck.Checkpoint, GPT]:
    """Load `init_from` (a checkpoint or run dir) and its model."""
    path = ck.resolve_checkpoint(str(ctx.cfg.init_from))
    info(f"init_from: {path}")
    ckpt = ck.load_checkpoint(path, with_trainer=False)
    return ckpt, model_from_checkpoint(ckpt, ctx.device, ctx.cfg.quant.kernel)


def corpus_for(ctx: RunContext, block_size: int) -> Corpus:
    """The configured corpus, checked against the model's context."""
    return load_corpus(ctx.cfg.data, block_size)


def world_size() -> int:
    """Processes in the DDP group (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def eval_fn_for(ctx: RunContext, corpus: Corpus, block_size: int) -> Callable[[nn.Module], float]:
    """Validation loss on the fixed, seeded windows (identical for every mode)."""
    starts = val_starts(len(corpus.val), block_size, ctx.cfg.data.val_windows)
    return lambda model: val_loss(model, corpus.val, starts, block_size)


def unwrap(model: nn.Module) -> GPT:
    """The GPT inside a DDP/compile wrapper."""
    inner: Any = model
    while not isinstance(inner, GPT):
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not a qtrain GPT: {type(model).__name__}")
    return inner


def payload_for(ctx: RunContext, model: nn.Module, step: int, trainer_state: dict[str, Any] | None) -> ck.Payload:
    """Everything a checkpoint stores for this run."""
    meta: dict[str, Any] = {"trainer": trainer_state} if trainer_state is not None else {}
    gpt = unwrap(model)
    manifest = {"mode": ctx.cfg.mode.name, "config": config_dict(ctx.cfg), "model": asdict(gpt.cfg)}
    return ck.Payload(model_state=dict(model.state_dict()), trainer_meta=meta, manifest=manifest)


def saver(ctx: RunContext, model: nn.Module) -> Callable[[int, dict[str, Any]], Path | None]:
    """A `save_fn` for the Trainer: rank 0 publishes under the run's checkpoints/."""

    def save(step: int, trainer_state: dict[str, Any]) -> Path | None:
        if rank() != 0:
            return None
        path = ck.save_checkpoint(ctx.ckpt_root, step, payload_for(ctx, model, step, trainer_state), ctx.cfg.train.keep)
        info(f"checkpoint: {path}")
        return path

    return save


def try_resume(ctx: RunContext, model: nn.Module, trainer: Trainer) -> bool:
    """Continue from the run dir's newest valid checkpoint per `resume`; True if resumed."""
    if ctx.cfg.resume == "never":
        return False
    found, skipped = ck.find_latest_valid(ctx.ckpt_root)
    for d, why in skipped:
        warn(f"resume: ignoring {d} ({why})")
    if found is None:
        if ctx.cfg.resume == "must":
            raise ConfigError(f"resume=must: no valid checkpoint in {ctx.ckpt_root}")
        info(f"resume=auto: no valid checkpoint in {ctx.ckpt_root}; starting fresh")
        return False
    ckpt = ck.load_checkpoint(found)
    mismatch = ck.scheme_mismatch(ckpt.manifest.get("quant"), api.layer_specs(model))
    if mismatch:  # never a silent load of another scheme's codes and scales (shapes can coincide)
        raise ConfigError(
            f"resume: {found} {mismatch}. Re-run with the checkpoint's quant settings, "
            f"or start a new run dir (hydra.run.dir=...)"
        )
    if "trainer" not in ckpt.trainer_meta:
        raise CheckpointError(
            f"resume: {found} holds no trainer state (a final converted checkpoint?); "
            f"use it with init_from= in a new run dir instead"
        )
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"resume: {found} does not load into this run's model: {err}") from None
    trainer.load_state_dict(ckpt.trainer_meta["trainer"])
    info(f"resume: continuing from {found} (step {trainer.step})")
    return True


def base_report(
    ctx: RunContext,
    model: nn.Module,
    step: int,
    vloss: float | None,
    path: Path | None,
    quant: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The keys every report.json has (DESIGN.md section 2)."""
    gpt = unwrap(model)
    size = sum(f.stat().st_size for f in path.iterdir()) if path is not None else None
    return {
        "mode": ctx.cfg.mode.name,
        "quant": quant,
        "model": ctx.cfg.model.name if ctx.cfg.mode.name in ("train", "qat") else gpt.cfg.name,
        "n_params": n_params_of(gpt),
        "step": step,
        "val_loss": vloss,
        "val_ppl": perplexity(vloss) if vloss is not None else None,
        "checkpoint": str(path) if path is not None else None,
        "checkpoint_bytes": size,
        "elapsed_s": round(time.perf_counter() - ctx.t0, 3),
    }


def n_params_of(model: GPT) -> int:
    """Parameters of the model's full-precision shape (tied weights once)."""
    c = model.cfg
    per_block = 4 * c.n_embd * c.n_embd + 3 * c.n_embd * c.mlp_hidden + 2 * c.n_embd
    emb = c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)
    return c.n_layer * per_block + emb + c.n_embd


def _progress(ctx: RunContext) -> Callable[[int, float], None]:
    return progress_printer(ctx.cfg.train.max_steps)


# ---------------------------------------------------------------- modes


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
    else:
        model = fresh_model(ctx)
    corpus = corpus_for(ctx, model.cfg.block_size)
    block = model.cfg.block_size
    sampler = BatchSampler(corpus.train, block, cfg.train.batch_size, cfg.seed, rank(), world_size())
    hooks = Hooks(eval_fn=eval_fn_for(ctx, corpus, block), stop=ctx.stop)
    trainer = Trainer(
        model,
        cfg.train,
        sampler,
        ctx.device,
        hooks=hooks,
        metrics_path=ctx.run_dir / "metrics.jsonl",
        compile_model=cfg.compile,
    )
    hooks.save_fn = saver(ctx, model)
    try_resume(ctx, model, trainer)
    summary = trainer.fit(_progress(ctx))
    path = trainer.save() if trainer.step > 0 else None
    vloss = summary["val_loss"] if summary["val_loss"] is not None else trainer.evaluate()
    report = base_report(ctx, model, trainer.step, vloss, path)
    report["train_tokens_per_s"] = round(summary["tokens_per_s"], 1)
    return report


def run_eval(ctx: RunContext) -> dict[str, Any]:
    """mode=eval: perplexity, size, decode and prefill speed; `compare_to` adds KL/top-1."""
    ckpt, model = load_init(ctx)
    corpus = load_corpus(ctx.cfg.data, model.cfg.block_size)
    vloss = eval_fn_for(ctx, corpus, model.cfg.block_size)(model)
    report = base_report(ctx, model, ckpt.manifest["step"], vloss, ckpt.path, ckpt.manifest.get("quant"))
    ev = ctx.cfg.eval
    if ev.decode_tokens > 0:
        report.update(decode_speed(model, ev.decode_tokens, ev.decode_repeats))
    if ev.prefill_tokens > 0:
        report.update(prefill_speed(model, ev.prefill_tokens, ev.decode_repeats))
    if ctx.cfg.compare_to:
        from qtrain.evaluate import compare

        ref_ckpt = ck.load_checkpoint(ck.resolve_checkpoint(ctx.cfg.compare_to, "compare_to"), with_trainer=False)
        ref = model_from_checkpoint(ref_ckpt, ctx.device, "reference")
        starts = val_starts(len(corpus.val), model.cfg.block_size, ctx.cfg.data.val_windows)
        cmp = compare(model, ref, corpus.val, starts, model.cfg.block_size)
        report.update(
            {
                "reference_val_ppl": perplexity(cmp.reference_val_loss),
                "logit_kl": cmp.kl,
                "top1_agreement": cmp.top1_agreement,
            }
        )
    return report


def run_generate(ctx: RunContext) -> dict[str, Any]:
    """mode=generate: sample text from any checkpoint."""
    _, model = load_init(ctx)
    g = ctx.cfg.generate
    text = generate(model, g.prompt, g.max_new_tokens, g.temperature, g.top_k, ctx.cfg.seed)
    if rank() == 0:
        console.print(text, markup=False)
    return {
        "mode": "generate",
        "prompt": g.prompt,
        "text": text,
        "checkpoint": str(ctx.cfg.init_from),
        "elapsed_s": round(time.perf_counter() - ctx.t0, 3),
    }


BASE_MODES: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    "train": run_train,
    "eval": run_eval,
    "generate": run_generate,
}
