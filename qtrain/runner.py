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
from qtrain import guards, memory, resume_check, runtime
from qtrain.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
from qtrain.console import console, info, printable, rank, warn
from qtrain.data import BatchSampler, Corpus, load_corpus, val_starts
from qtrain.errors import CheckpointError, ConfigError
from qtrain.evaluate import decode_speed, generate, perplexity, prefill_speed, val_loss
from qtrain.model import GPT
from qtrain.progress import TrainProgress, banner, scheme_label
from qtrain.quant import api, autotune
from qtrain.train import Hooks, StopFlag, Trainer


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
    corpus: dict[str, Any] | None = None
    """Fingerprint of the corpus this run loaded (`corpus_for`); None before or without one."""
    memory: dict[str, int] | None = None
    """`memory_estimate_bytes` and `memory_available_bytes` (`check_memory`); None when not estimated."""
    memory_model: ModelConfig | None = None
    """The model shape the memory was estimated for (the checkpoint's with `init_from`)."""
    memory_line: str | None = None
    """``memory: about N GB at peak (...); M GB available (...)``, printed under the banner."""

    @property
    def ckpt_root(self) -> Path:
        """The run's `checkpoints/` directory."""
        return self.run_dir / "checkpoints"


# ---------------------------------------------------------------- shared pieces


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain JSON data."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def check_memory(ctx: RunContext, model: ModelConfig, loaded: str | None = None, ckpt: Path | None = None) -> None:
    """`guards.memory_check` for this run: records the estimate in `ctx` (`announce` prints it), or exits 5."""
    ctx.memory_model = model
    checked = guards.memory_check(ctx.cfg, ctx.device, model, loaded, ckpt)
    if checked is not None:
        ctx.memory, ctx.memory_line = checked


def fresh_model(ctx: RunContext) -> GPT:
    """A newly initialised model on the run's device (after the memory check)."""
    check_memory(ctx, ctx.cfg.model)
    model = GPT(ctx.cfg.model)
    model.init_weights(ctx.cfg.seed)
    return model.to(ctx.device)


def model_from_checkpoint(ckpt: ck.Checkpoint, device: torch.device, kernel: str = "auto") -> GPT:
    """Rebuild the model a checkpoint describes (from its manifest alone) and load its weights.

    Full precision, packed (PTQ/QAT/finetune results) and fake-quant (QAT in progress)
    checkpoints all rebuild without any config: shapes and per-layer schemes come from the
    manifest, which loading has validated, and which the tensors were compared with on the
    meta device before anything was allocated. Loading is strict.

    Raises:
        CheckpointError: the state does not match the manifest's model.
    """
    return ck.build_model(ckpt, device, kernel)  # built like the meta-device model it was checked against


def load_init(ctx: RunContext) -> tuple[ck.Checkpoint, GPT]:
    """Load `init_from` (a checkpoint or run dir) and its model."""
    path = ck.resolve_checkpoint(str(ctx.cfg.init_from))
    manifest = ck.read_manifest(path)  # sealed and validated; the tensors are checked by load_checkpoint
    if isinstance(manifest.get("model"), dict):
        scheme = ((manifest.get("quant") or {}).get("config") or {}).get("scheme", "none")
        check_memory(ctx, ModelConfig(**manifest["model"]), loaded=scheme, ckpt=path)
    ckpt = ck.load_checkpoint(path, with_trainer=False)
    model = model_from_checkpoint(ckpt, ctx.device, ctx.cfg.quant.kernel)
    ckpt.model_state.clear()  # copied into the model: do not keep a second copy of the weights
    guards.check_finite(ctx.cfg.mode.name, path, model)
    return ckpt, model


def corpus_for(ctx: RunContext, block_size: int) -> Corpus:
    """The configured corpus, checked against the model's context; its fingerprint goes to `ctx.corpus`."""
    corpus = load_corpus(ctx.cfg.data, block_size)
    ctx.corpus = corpus.fingerprint
    return corpus


def world_size() -> int:
    """Processes in the DDP group (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def eval_fn_for(ctx: RunContext, corpus: Corpus, block_size: int) -> Callable[[nn.Module], float]:
    """Validation loss on the fixed, seeded windows (identical for every mode)."""
    starts = val_starts(len(corpus.val), block_size, ctx.cfg.data.val_windows)
    batch = memory.eval_batch_size(block_size)  # 32 windows up to 1024 tokens each, fewer beyond
    return lambda model: val_loss(model, corpus.val, starts, block_size, batch)


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
    if ctx.corpus is not None:
        manifest["corpus"] = ctx.corpus
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
    """Continue from the run dir's newest usable checkpoint per `resume`; True if resumed.

    A checkpoint that fails for any reason (seal, hashes, manifest values, shapes, trainer
    state) is skipped with one warning for the next older one; with none usable, `auto`
    starts fresh and says so, `must` exits 3 (2 when there is nothing at all). One written
    for another model or quantization is a usage error (exit 2), never skipped.
    """
    if ctx.cfg.resume == "never":
        return False
    found, ckpt, skipped = ck.newest_usable(ctx.ckpt_root, lambda d: _resume_from(d, model, trainer, ctx))
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
    if applied := settings_changes(ctx, ckpt).applied:
        info(resume_check.applied_note(found, applied))
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
    from dataclasses import replace

    from qtrain.train import lr_factor

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


def _resume_from(path: Path, model: nn.Module, trainer: Trainer, ctx: RunContext) -> ck.Checkpoint:
    """Load checkpoint `path` into the run's model and trainer.

    Raises:
        CheckpointError: `path` is unusable (the caller tries the next older one).
        ConfigError: it was written with other model, quantization, data, optimizer or
            schedule settings (`qtrain.resume_check`).
    """
    ckpt = ck.load_checkpoint(path)
    stored = ckpt.manifest.get("model") or {}
    ours = asdict(unwrap(model).cfg)
    differ = [
        f"model.{k}={stored.get(k)!r} (this run: {v!r})" for k, v in ours.items() if k != "name" and stored.get(k) != v
    ]
    if differ:
        raise ConfigError(
            f"resume: {path} holds another model: {', '.join(differ)}; start a new run dir (hydra.run.dir=...)"
        )
    mismatch = ck.scheme_mismatch(ckpt.manifest.get("quant"), api.layer_specs(model))
    if mismatch:  # never a silent load of another scheme's codes and scales (shapes can coincide)
        raise ConfigError(
            f"resume: {path} {mismatch}. Re-run with the checkpoint's quant settings, "
            f"or start a new run dir (hydra.run.dir=...)"
        )
    if refused := settings_changes(ctx, ckpt).refused:  # before anything is loaded into the model
        raise ConfigError(resume_check.refusal(path, refused))
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
        "model_bytes": model_bytes(path),
        "corpus": ctx.corpus,
        **(ctx.memory or {}),
        "elapsed_s": round(time.perf_counter() - ctx.t0, 3),
    }


def model_bytes(path: Path | None) -> int | None:
    """Size of a checkpoint's ``model.safetensors``: the model a user deploys, without trainer state."""
    file = path / ck.MODEL_FILE if path is not None else None
    return file.stat().st_size if file is not None and file.is_file() else None


def benchmark(model: GPT, ev: EvalConfig, prefill: bool = True) -> dict[str, Any]:
    """Decode (and prefill) speed per `eval.*`, with the seconds they took as ``bench_s``.

    ``bench_s`` is part of the run's ``elapsed_s`` and shown apart so runs compare fairly.
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if ev.decode_tokens > 0:
        out.update(decode_speed(model, ev.decode_tokens, ev.decode_repeats))
    if prefill and ev.prefill_tokens > 0:
        out.update(prefill_speed(model, ev.prefill_tokens, ev.decode_repeats))
    if out:
        out["bench_s"] = round(time.perf_counter() - t0, 3)
    return out


def n_params_of(model: GPT | ModelConfig) -> int:
    """Parameters of the model's full-precision shape (tied weights once), from the model or its config."""
    c = model if isinstance(model, ModelConfig) else model.cfg
    per_block = 4 * c.n_embd * c.n_embd + 3 * c.n_embd * c.mlp_hidden + 2 * c.n_embd
    emb = c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)
    return c.n_layer * per_block + emb + c.n_embd


def _progress(ctx: RunContext) -> TrainProgress:
    return TrainProgress(compiling=ctx.cfg.compile)


def announce(ctx: RunContext, ckpt: ck.Checkpoint | None = None) -> None:
    """The run's first line: mode, model and parameter count, scheme, corpus, source, run dir."""
    cfg, mode = ctx.cfg, ctx.cfg.mode.name
    mcfg = ModelConfig(**ckpt.manifest["model"]) if ckpt is not None else cfg.model
    stored = (ckpt.manifest.get("quant") or {}) if ckpt is not None else {}
    if mode == "ptq":
        scheme = f"{scheme_label(asdict(cfg.quant))}, {cfg.ptq.method}"
    elif mode == "qat":
        scheme = f"{scheme_label(asdict(cfg.quant))}, QAT{' + distill' if cfg.qat.distill and ckpt else ''}"
    else:
        scheme = scheme_label(stored.get("config")) + (f", {stored['method']}" if stored.get("method") else "")
    training = mode in ("train", "qat", "finetune")
    banner(
        {
            "mode": mode,
            "model": f"{mcfg.name} ({n_params_of(mcfg):,} params)",
            "quant": scheme,
            "data": cfg.data.name + (f" {cfg.data.path}" if cfg.data.path else ""),
            "steps": cfg.train.max_steps if training else None,
            "from": str(ckpt.path) if ckpt is not None else None,
            "device": str(ctx.device),
            "run dir": str(ctx.run_dir),
        }
    )
    if ctx.memory_line:  # the estimate (`check_memory`), right under the banner
        info(ctx.memory_line)


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
        announce(ctx, ckpt)
    else:
        model = fresh_model(ctx)  # memory checked first: a run that cannot fit prints only the refusal
        announce(ctx)
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
    announce(ctx, ckpt)
    corpus = corpus_for(ctx, model.cfg.block_size)
    vloss = eval_fn_for(ctx, corpus, model.cfg.block_size)(model)
    report = base_report(ctx, model, ckpt.manifest["step"], vloss, ckpt.path, ckpt.manifest.get("quant"))
    load_before = runtime.load_average()
    report.update(benchmark(model, ctx.cfg.eval))
    if "bench_s" in report:  # speeds were measured: say whether they can be trusted, and which kernels ran
        report.update(runtime.speed_conditions(load_before))  # `threads` itself: every report (modes.run)
        report.update({"kernels": autotune.decisions()} if autotune.decisions() else {})
    if ctx.cfg.compare_to:
        from qtrain.evaluate import compare

        ref_path = ck.resolve_checkpoint(ctx.cfg.compare_to, "compare_to")
        guards.check_comparable(model.cfg, ref_path)  # before loading it
        ref_ckpt = ck.load_checkpoint(ref_path, with_trainer=False)
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
    ckpt, model = load_init(ctx)
    announce(ctx, ckpt)
    g = ctx.cfg.generate
    text = generate(model, g.prompt, g.max_new_tokens, g.temperature, g.top_k, ctx.cfg.seed)
    if rank() == 0:
        console.print(printable(text), markup=False)  # model output: control bytes shown escaped
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
