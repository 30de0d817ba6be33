"""Where a mode's model comes from: a fresh initialisation, or a checkpoint (`init_from`).

Both check the run's memory before anything is allocated; a loaded model is checked for
non-finite weights before a mode computes from it.
"""

from __future__ import annotations

import torch

from qtrain import checkpoint as ck
from qtrain.config import ModelConfig
from qtrain.errors import ConfigError
from qtrain.model import GPT
from qtrain.modes import guards
from qtrain.modes.context import RunContext, check_memory
from qtrain.quant.recipe import QuantRecipe


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
        scheme = QuantRecipe.from_manifest(manifest.get("quant")).scheme
        check_memory(ctx, ModelConfig(**manifest["model"]), loaded=scheme, ckpt=path)
    ckpt = ck.load_checkpoint(path, with_trainer=False)
    model = model_from_checkpoint(ckpt, ctx.device, ctx.cfg.quant.kernel)
    ckpt.model_state.clear()  # copied into the model: do not keep a second copy of the weights
    guards.check_finite(ctx.cfg.mode.name, path, model)
    return ckpt, model


def require_full_precision(ckpt: ck.Checkpoint, mode: str) -> None:
    """`mode=ptq` and `mode=qat` start from a full-precision checkpoint (exit 2 otherwise)."""
    if ckpt.manifest.get("quant"):
        scheme = QuantRecipe.from_manifest(ckpt.manifest["quant"]).scheme
        raise ConfigError(
            f"init_from: {ckpt.path} is already quantized ({scheme}); mode={mode} needs a full-precision "
            f"checkpoint. To train a quantized checkpoint further use mode=finetune init_from={ckpt.path}"
        )
