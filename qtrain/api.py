"""Python entry points for your own training loop: load a model, quantize it with a recipe, save, export.

The CLI stays the main interface; these functions are the same machinery without Hydra, run
directories or reports. A model is a plain ``torch.nn.Module`` (:class:`qtrain.model.GPT`)
whose forward maps token ids ``(B, T)`` to logits ``(B, T, vocab)``.

Example:
    >>> from qtrain import api
    >>> model, tok = api.load_model("hf:path/to/Qwen2.5-0.5B")       # or a qtrain checkpoint / run dir
    >>> recipe = api.recipe("int4", group_size=32)
    >>> api.prepare_qat(model, recipe)                                # fake-quant: train it in your loop
    >>> ...                                                           # loss.backward(), optimizer.step()
    >>> api.convert(model, recipe)                                    # packed int4 weights
    >>> api.save(model, "runs/mine", tok, recipe, method="qat")       # a verified qtrain checkpoint
    >>> api.export_hf(model, "exported/mine", tok)                    # dequantized, for transformers

Post-training instead of QAT: ``api.quantize(model, recipe, "gptq", calib=[ids, ...])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qtrain import checkpoint as ck
from qtrain.config import QuantConfig
from qtrain.errors import ConfigError
from qtrain.export.hf import write_hf
from qtrain.hf.load import load_hf
from qtrain.model import GPT
from qtrain.quant.recipe import QuantRecipe
from qtrain.tokenizer import Tokenizer, byte_tokenizer, tokenizer_from_manifest

HF_PREFIX = "hf:"


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / ck.MANIFEST).is_file()


def load_model(
    path: str | Path, device: str | torch.device = "cpu", block_size: int | None = None, kernel: str = "auto"
) -> tuple[GPT, Tokenizer]:
    """A model and its tokenizer from a Hugging Face directory or a qtrain checkpoint / run dir.

    Args:
        path: ``hf:DIR`` or a directory with ``config.json`` (Hugging Face), or a checkpoint
            directory, or a run directory (its newest valid checkpoint).
        device: where the model goes.
        block_size: Hugging Face only: a shorter context than ``max_position_embeddings``.
        kernel: packed checkpoints: the matmul kernel (``quant.kernel`` values; ``reference``:
            dequantize + float32 matmul).

    Returns:
        ``(model, tokenizer)``: the model in eval mode (full precision, or packed / fake-quant as
        the checkpoint holds it); the tokenizer the model was trained with (bytes when none).
        ``model.qtrain_manifest`` holds the source's manifest (``imported_from`` for an import).

    Raises:
        ConfigError: not a model directory, or a model qtrain cannot represent exactly.
        CheckpointError: damaged or refused files.
    """
    dev = torch.device(device)
    text = str(path)
    src = Path(text.removeprefix(HF_PREFIX)).expanduser()
    if text.startswith(HF_PREFIX) or _is_hf_dir(src):
        source, model = load_hf(src, dev, block_size)
    else:
        source = ck.load_checkpoint(ck.resolve_checkpoint(src, "path"), with_trainer=False)
        model = ck.build_model(source, dev, kernel)
        source.model_state.clear()
    tok = (
        tokenizer_from_manifest(source.manifest, source.path) if source.manifest.get("tokenizer") else byte_tokenizer()
    )
    model.qtrain_manifest = source.manifest  # type: ignore[assignment]
    return model.eval(), tok


def recipe(scheme: str = "int4", **options: Any) -> QuantRecipe:
    """A :class:`QuantRecipe` from ``quant.*`` settings, e.g. ``recipe("int4", group_size=64, symmetric=False)``.

    Raises:
        ConfigError: an unknown setting.
    """
    known = set(QuantConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known - {"learn_scales"})
    if unknown:
        raise ConfigError(f"recipe: unknown settings {unknown}; valid: {sorted(known - {'scheme'})}, learn_scales")
    learn = bool(options.pop("learn_scales", False))
    return QuantRecipe.from_config(QuantConfig(scheme=scheme, **options), learn_scales=learn)


def prepare_qat(model: GPT, quant: QuantRecipe) -> GPT:
    """Full precision -> fake-quant layers for quantization-aware training (in place; returns the model)."""
    return quant.prepare(model)  # type: ignore[return-value]


def convert(model: GPT, quant: QuantRecipe) -> GPT:
    """Fake-quant (after QAT) or full precision -> packed integer layers (in place; returns the model)."""
    return quant.convert(model)  # type: ignore[return-value]


def quantize(
    model: GPT, quant: QuantRecipe, method: str = "gptq", calib: Sequence[torch.Tensor] | None = None, **opts: Any
) -> GPT:
    """Post-training quantization to packed layers (in place; returns the model).

    Args:
        model: a full-precision model.
        quant: the recipe.
        method: ``rtn`` | ``mse`` | ``gptq``.
        calib: token-id batches ``(B, T)`` on the model's device (gptq needs them).
        **opts: ``damp`` (GPTQ dampening, default 0.01), ``grid`` (MSE candidates, default 100),
            ``act_order`` (GPTQ column order, default True).
    """
    model.eval()
    return quant.quantize(model, method, list(calib or []), **opts)  # type: ignore[return-value]


def save(
    model: GPT,
    run_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    quant: QuantRecipe | None = None,
    method: str | None = None,
    step: int = 0,
) -> Path:
    """Publish a verified qtrain checkpoint of ``model`` under ``run_dir/checkpoints/`` (the CLI's modes read it).

    Args:
        model: the model (full precision, fake-quant or packed).
        run_dir: the run directory (created if needed).
        tokenizer: the model's tokenizer (stored with it; None: bytes).
        quant: the recipe the model was quantized with (None: full precision).
        method: what produced a packed model (``rtn``, ``gptq``, ``qat``, ...).
        step: the step the checkpoint is named after.

    Returns:
        The checkpoint directory.
    """
    tok = tokenizer or byte_tokenizer()
    section = quant.manifest_section(model, method) if quant is not None else None
    manifest: dict[str, Any] = {"mode": "api", "model": asdict(model.cfg), "quant": section}
    manifest["tokenizer"] = tok.manifest_section()
    imported = (getattr(model, "qtrain_manifest", None) or {}).get("imported_from")
    if imported is not None:
        manifest["imported_from"] = imported
    payload = ck.Payload(model_state=dict(model.state_dict()), manifest=manifest, extra_files=tok.files())
    root = Path(run_dir).expanduser() / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return ck.save_checkpoint(root, step, payload, keep=3)


def export_hf(
    model: GPT,
    out: str | Path,
    tokenizer: Tokenizer | None = None,
    float_type: str = "f32",
    quant: QuantRecipe | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a Hugging Face directory ``out`` (new; a quantized model dequantized).

    Returns:
        The export report (``model_type``, ``tensors``, ``bytes``, ``dequantized_from``, ...).
    """
    manifest = dict(getattr(model, "qtrain_manifest", None) or {})
    if quant is not None:
        manifest["quant"] = quant.manifest_section(model, "api")
    return write_hf(model, manifest, tokenizer or byte_tokenizer(), Path(out).expanduser(), float_type)
