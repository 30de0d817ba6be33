"""Checkpoint tools behind the one entrypoint: `qtrain mode=verify` and `qtrain mode=upgrade`.

`verify` checks a checkpoint (or every checkpoint of a run dir) through the very path loading
takes (`checkpoint.verify_checkpoint`: manifest seal and values, file list, sizes, SHA-256,
safetensors headers, tensors against the described model on the meta device, quantization
parameters, trainer state), then reads every tensor and loads the weights strictly into the
model, as loading does. What verify accepts loads; what loading refuses, verify refuses. It
prints what the checkpoint holds. `upgrade` writes a migrated copy at the current format
version into a new directory, atomically, and never touches the original.

Example:
    $ qtrain mode=verify init_from=outputs/2025-01-01/12-00-00            # every checkpoint of a run
    $ qtrain mode=upgrade init_from=old/step_0000500 out=upgraded/step_0000500
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from qtrain import checkpoint as ck
from qtrain.console import console, plain, rank
from qtrain.errors import CheckpointError, ConfigError
from qtrain.runner import RunContext, model_from_checkpoint, n_params_of


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


def _files_table(v: Verified) -> Table:
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


def _layers_table(quant: Any) -> Table | None:
    layers = ck.quant_layers(quant)
    if not layers:
        return None
    state = quant.get("state") if isinstance(quant, dict) else None
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


def _status_table(results: list[tuple[Path, str]]) -> Table:
    table = Table(title="checkpoints", header_style="bold")
    table.add_column("checkpoint")
    table.add_column("status", overflow="fold")
    for path, status in results:
        style = "green" if status == "ok" else "red"
        table.add_row(plain(path.name), plain(status, style))  # error text names paths: never markup
    return table


def _show(*tables: Table | None) -> None:
    if rank() == 0:
        for t in tables:
            if t is not None:
                console.print(t)


def _report(ctx: RunContext, v: Verified, **extra: Any) -> dict[str, Any]:
    m = v.manifest
    created = m.get("created_unix")
    return {
        "mode": ctx.cfg.mode.name,
        "quant": m["quant"].get("config", m["quant"]) if isinstance(m.get("quant"), dict) else m.get("quant"),
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
        "scheme": ck.describe_scheme(ck.quant_layers(m.get("quant"))),
        "quant_state": m["quant"].get("state") if isinstance(m.get("quant"), dict) else None,
        "model_shape": ", ".join(
            f"{k}={m['model'][k]}"
            for k in ("n_layer", "n_embd", "n_head", "block_size", "mlp_hidden")
            if k in m["model"]
        ),
        "tensors": v.n_tensors,
        "elapsed_s": round(time.perf_counter() - ctx.t0, 3),
    }


# ---------------------------------------------------------------- modes


def run_verify(ctx: RunContext) -> dict[str, Any]:
    """mode=verify: check `init_from` (a checkpoint, or every checkpoint of a run dir); exit 3 if any is bad.

    Raises:
        ConfigError: `init_from` does not exist or holds no checkpoint.
        CheckpointError: a checkpoint fails a check (all failures listed).
    """
    target = Path(str(ctx.cfg.init_from)).expanduser()
    dirs = checkpoint_dirs(target)
    good: list[Verified] = []
    bad: list[tuple[Path, str]] = []
    statuses: list[tuple[Path, str]] = []
    for d in dirs:
        try:
            good.append(verify_full(d))
            statuses.append((d, "ok"))
        except CheckpointError as err:
            bad.append((d, str(err)))
            statuses.append((d, str(err)))
    temps = ck.temp_entries(dirs[0].parent) if len(dirs) > 1 or dirs[0] != target else []
    statuses += [
        (t, "temporary leftover of an interrupted save (ignored by resume, removed by the next save)") for t in temps
    ]
    if good:
        newest = good[-1]
        _show(_layers_table(newest.manifest.get("quant")), _files_table(newest))
    if len(statuses) > 1:
        _show(_status_table(statuses))
    if bad:
        listed = "\n  - ".join(f"{why}" for _, why in bad)
        raise CheckpointError(f"verify: {len(bad)} of {len(dirs)} checkpoint(s) refused:\n  - {listed}")
    return _report(ctx, good[-1], verified=len(good), ok=True)


def run_upgrade(ctx: RunContext) -> dict[str, Any]:
    """mode=upgrade: write a copy of `init_from` migrated to the current format into the new directory `out`.

    Raises:
        ConfigError: `out` exists and is not empty, or lies inside the source; bad `init_from`.
        CheckpointError: the source fails verification.
    """
    out = Path(str(ctx.cfg.out)).expanduser()
    src = Path(str(ctx.cfg.init_from)).expanduser()
    if src.exists():
        ck.check_upgrade_target(src, out)  # before reading anything
    src = ck.resolve_checkpoint(src)
    ck.check_upgrade_target(src, out)
    before = ck.read_manifest(src).get("migrated_from", ck.FORMAT_VERSION)
    ck.upgrade_checkpoint(src, out)
    v = verify_full(out)
    _show(_layers_table(v.manifest.get("quant")), _files_table(v))
    if rank() == 0:
        console.print(
            plain(
                f"upgraded {src} (format_version {before}) -> {out} (format_version {ck.FORMAT_VERSION}); "
                f"the original is unchanged"
            )
        )
    return _report(ctx, v, source=str(src), source_format_version=before, ok=True)


CHECKPOINT_MODES: dict[str, Callable[[RunContext], dict[str, Any]]] = {"verify": run_verify, "upgrade": run_upgrade}
"""Mode functions this module adds to `runner.MODES` (registered by `cli`)."""
