"""Where a mode's model comes from: a fresh initialisation, or a checkpoint (`init_from`).

Both check the run's memory before anything is allocated; a loaded model is checked for
non-finite weights before a mode computes from it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtrain import checkpoint as ck
from qtrain.config import ModelConfig
from qtrain.errors import ConfigError
from qtrain.hf.config import model_config_from_hf, read_config
from qtrain.hf.load import import_config, load_hf
from qtrain.model import GPT
from qtrain.modes import guards, memory
from qtrain.modes.context import RunContext, check_memory, use_tokenizer
from qtrain.quant.recipe import QuantRecipe


def fresh_model(ctx: RunContext) -> GPT:
    """A newly initialised model on the run's device (after the memory check)."""
    use_tokenizer(ctx)  # bpe/hf: model.vocab_size follows the tokenizer
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
    """Load `init_from` (a checkpoint or run dir, or `hf:DIR`: a Hugging Face model) and its model."""
    if str(ctx.cfg.init_from).startswith(HF_PREFIX):
        return load_hf_init(ctx)
    path = ck.resolve_checkpoint(str(ctx.cfg.init_from))
    manifest = ck.read_manifest(path)  # sealed and validated; the tensors are checked by load_checkpoint
    if isinstance(manifest.get("model"), dict):
        scheme = QuantRecipe.from_manifest(manifest.get("quant")).scheme
        check_memory(ctx, ModelConfig(**manifest["model"]), loaded=scheme, ckpt=path)
    ckpt = ck.load_checkpoint(path, with_trainer=False)
    use_tokenizer(ctx, ckpt)  # the checkpoint's tokenizer (an explicit other one: exit 2)
    model = model_from_checkpoint(ckpt, ctx.device, ctx.cfg.quant.kernel)
    ckpt.model_state.clear()  # copied into the model: do not keep a second copy of the weights
    guards.check_finite(ctx.cfg.mode.name, path, model)
    ctx.imported_from = ckpt.manifest.get("imported_from")  # provenance travels on to what this run writes
    return ckpt, model


HF_PREFIX = "hf:"
"""`init_from=hf:DIR`: import a Hugging Face model directory (`qtrain.hf.load_hf`)."""


def load_hf_init(ctx: RunContext) -> tuple[ck.Checkpoint, GPT]:
    """Import `init_from=hf:DIR`; its tokenizer becomes the run's (`data.tokenizer=hf`, `data.tokenizer_path=DIR`).

    An explicit `model.block_size` override shortens the context (e.g. for training memory).

    Raises:
        ConfigError: a model qtrain cannot represent exactly, or no tokenizer.json (exit 2).
        CheckpointError: damaged or mismatched weights (exit 3).
    """
    src = Path(str(ctx.cfg.init_from)[len(HF_PREFIX) :]).expanduser()
    keys = {o.lstrip("+~").split("=", 1)[0] for o in ctx.overrides}
    block = ctx.cfg.model.block_size if "model.block_size" in keys else None
    if not (src / "tokenizer.json").is_file():
        raise ConfigError(f"init_from: hf:{src} holds no tokenizer.json; qtrain runs a model with its own tokenizer")
    check_memory(ctx, import_config(src, block), loaded=memory.IMPORTED)  # mmapped: model + one tensor
    writes = ctx.cfg.mode.name in ("train", "qat", "finetune", "ptq")  # provenance: hash what a checkpoint records
    ckpt, model = load_hf(src, ctx.device, block, hash_files=writes)
    use_tokenizer(ctx, ckpt)  # the model's tokenizer (an explicit other one: exit 2)
    ctx.cfg.data.tokenizer, ctx.cfg.data.tokenizer_path = "hf", str(src)
    guards.check_finite(ctx.cfg.mode.name, src, model)
    ctx.imported_from = ckpt.manifest["imported_from"]
    return ckpt, model


def load_reference(ctx: RunContext, like: ModelConfig, compare_to: str) -> tuple[ck.Checkpoint, GPT]:
    """`compare_to`: a checkpoint or run dir, or `hf:DIR` (imported with the evaluated model's context).

    Raises:
        ConfigError: a reference that cannot score the same windows (vocabulary, context), named.
        CheckpointError: a refused reference.
    """
    if not compare_to.startswith(HF_PREFIX):
        ref_path = ck.resolve_checkpoint(compare_to, "compare_to")
        guards.check_comparable(like, ref_path)  # before loading it
        ref_ckpt = ck.load_checkpoint(ref_path, with_trainer=False)
        return ref_ckpt, model_from_checkpoint(ref_ckpt, ctx.device, "reference")
    src = Path(compare_to[len(HF_PREFIX) :]).expanduser()
    cfg = model_config_from_hf(read_config(src), str(src / "config.json"), like.block_size)  # window checked at it
    if cfg.vocab_size != like.vocab_size or cfg.block_size < like.block_size:
        raise ConfigError(
            f"compare_to: {compare_to} has vocab_size={cfg.vocab_size} and max_position_embeddings="
            f"{cfg.block_size}, the evaluated model {like.vocab_size} and {like.block_size}: the reference must "
            f"score the same windows over the same vocabulary"
        )
    return load_hf(src, ctx.device, like.block_size)


def require_full_precision(ckpt: ck.Checkpoint, mode: str) -> None:
    """`mode=ptq` and `mode=qat` start from a full-precision checkpoint (exit 2 otherwise)."""
    if ckpt.manifest.get("quant"):
        scheme = QuantRecipe.from_manifest(ckpt.manifest["quant"]).scheme
        raise ConfigError(
            f"init_from: {ckpt.path} is already quantized ({scheme}); mode={mode} needs a full-precision "
            f"checkpoint. To train a quantized checkpoint further use mode=finetune init_from={ckpt.path}"
        )
