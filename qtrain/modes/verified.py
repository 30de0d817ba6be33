"""What `mode=verify` and `mode=upgrade` find in a checkpoint, and how they show it.

`verify_full` checks a checkpoint through the very path loading takes
(`checkpoint.verify_checkpoint`: manifest seal and values, file list, sizes, SHA-256,
safetensors headers, tensors against the described model on the meta device, quantization
parameters, trainer state), then reads every tensor and loads the weights strictly into the
model, as loading does: what verify accepts loads; what loading refuses, verify refuses.
The tables print what the checkpoint holds; `checkpoint_report` is their report.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from qtrain import checkpoint as ck
from qtrain.console import console, plain, rank
from qtrain.errors import CheckpointError, ConfigError
from qtrain.modes.context import RunContext, n_params_of
from qtrain.modes.loading import model_from_checkpoint
from qtrain.quant.recipe import QuantRecipe


@dataclass
class Verified:
    """What verification found in one good checkpoint."""

    path: Path
    manifest: dict[str, Any]
    n_params: int
    n_tensors: int


def checkpoint_dirs(target: Path, key: str = "init_from") -> list[Path]:
    """The checkpoint dirs `target` names: itself, or the published ones of a run / checkpoints dir.

    Raises:
        ConfigError: the path does not exist or holds no checkpoint.
    """
    if not target.exists():
        raise ConfigError(f"{key}: {target} does not exist")
    if ck.is_checkpoint_dir(target):
        return [target]
    for root in (target / "checkpoints", target):
        dirs = ck.list_step_dirs(root)
        if dirs:
            return dirs
    raise ConfigError(f"{key}: {target} is neither a checkpoint directory nor a run directory with checkpoints")


def verify_full(path: Path) -> Verified:
    """Verify files and hashes, read every tensor, and load the weights strictly into the model.

    Raises:
        CheckpointError: the first problem found, naming the file or the tensors.
    """
    ckpt = ck.load_checkpoint(path, with_trainer=True)
    if not isinstance(ckpt.manifest.get("model"), dict):
        raise CheckpointError(f"{path / ck.MANIFEST}: no model shape ('model'), so no model can be built")
    try:
        model = model_from_checkpoint(ckpt, torch.device("cpu"))
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"{path}: the weights do not load strictly into the model the manifest describes: {str(err).strip()[:2000]}"
        ) from None
    return Verified(
        path=path,
        manifest=ckpt.manifest,
        n_params=n_params_of(model),
        n_tensors=len(ckpt.model_state) + len(ckpt.trainer_tensors),
    )


# ---------------------------------------------------------------- printing


def files_table(v: Verified) -> Table:
    """The checkpoint's files with sizes and hashes, the manifest's seal, the total."""
    table = Table(title=plain(f"files of {v.path}"), header_style="bold")
    for col in ("file", "bytes", "sha256"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    files = v.manifest["files"]
    for name in sorted(files):
        table.add_row(plain(name), f"{files[name]['bytes']:,}", plain(str(files[name]["sha256"])[:16] + "…"))
    manifest_bytes = (v.path / ck.MANIFEST).stat().st_size
    seal = v.manifest.get(ck.MANIFEST_HASH, "")
    old = v.manifest.get("migrated_from")
    sealed = f"sealed {seal[:16]}…" if old is None else f"not sealed (format {old}; mode=upgrade seals it)"
    table.add_row(ck.MANIFEST, f"{manifest_bytes:,}", plain(sealed))
    table.add_row(plain("total", "bold"), plain(f"{total_bytes(v):,}", "bold"), "")
    return table


def total_bytes(v: Verified) -> int:
    """All bytes of a checkpoint: the listed files and the manifest."""
    return sum(int(i["bytes"]) for i in v.manifest["files"].values()) + (v.path / ck.MANIFEST).stat().st_size


def layers_table(quant: Any) -> Table | None:
    """The manifest's quantized layers (None for a full-precision checkpoint)."""
    recipe = QuantRecipe.from_manifest(quant if isinstance(quant, dict) else None)
    layers = recipe.layers
    if not layers:
        return None
    state = recipe.state
    table = Table(title=plain(f"quantization per layer ({state or 'stored'})"), header_style="bold")
    for col in ("layer", "scheme", "bits", "group", "sym", "act", "in->out", "tied_to"):
        table.add_column(col, no_wrap=col == "layer")
    for name, s in layers.items():
        table.add_row(
            *map(
                plain,
                (
                    name,
                    s.get("scheme"),
                    s.get("bits", ""),
                    s.get("group_size", ""),
                    "yes" if s.get("symmetric", True) else "no",
                    s.get("activations", "none"),
                    f"{s.get('in_features', '?')}->{s.get('out_features', '?')}",
                    s.get("tied_to") or "",
                ),
            )
        )
    return table


def status_table(results: list[tuple[Path, str]]) -> Table:
    """One line per checkpoint of a run: ok, or why it is refused."""
    table = Table(title="checkpoints", header_style="bold")
    table.add_column("checkpoint")
    table.add_column("status", overflow="fold")
    for path, status in results:
        style = "green" if status == "ok" else "red"
        table.add_row(plain(path.name), plain(status, style))  # error text names paths: never markup
    return table


def show(*tables: Table | None) -> None:
    """Print the tables that exist (rank 0)."""
    if rank() == 0:
        for t in tables:
            if t is not None:
                console.print(t)


def checkpoint_report(ctx: RunContext, v: Verified, **extra: Any) -> dict[str, Any]:
    """report.json of verify/upgrade: what the checkpoint is, holds and was written by (`extra` in the middle)."""
    m = v.manifest
    created = m.get("created_unix")
    quant = m["quant"] if isinstance(m.get("quant"), dict) else None
    recipe = QuantRecipe.from_manifest(quant)
    return {
        "mode": ctx.cfg.mode.name,
        "quant": quant.get("config", quant) if quant is not None else m.get("quant"),
        "model": m["model"].get("name"),
        "n_params": v.n_params,
        "step": m["step"],
        "val_loss": None,
        "val_ppl": None,
        "checkpoint": str(v.path),
        "checkpoint_bytes": total_bytes(v),
        "model_bytes": (v.manifest["files"].get(ck.MODEL_FILE) or {}).get("bytes"),
        **extra,
        "format_version": m.get("migrated_from", ck.FORMAT_VERSION),
        "current_format_version": ck.FORMAT_VERSION,
        "qtrain_version": m.get("qtrain_version"),
        "torch_version": m.get("torch_version"),
        "created": datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="seconds")
        if isinstance(created, (int, float))
        else None,
        "scheme": recipe.label,
        "quant_state": recipe.state,
        "model_shape": ", ".join(
            f"{k}={m['model'][k]}"
            for k in ("n_layer", "n_embd", "n_head", "block_size", "mlp_hidden")
            if k in m["model"]
        ),
        "tensors": v.n_tensors,
        "elapsed_s": round(time.perf_counter() - ctx.t0, 3),
    }
