"""`mode=upgrade`: a migrated, re-verified copy of a checkpoint in a new directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qtrain import rundir
from qtrain.checkpoint.format import FORMAT_VERSION, SYSTEM_KEYS, TMP_PREFIX, Payload
from qtrain.checkpoint.load import load_checkpoint
from qtrain.checkpoint.write import pid_of_temp, tensor_bytes, write_dir_atomically, write_files
from qtrain.console import warn
from qtrain.errors import ConfigError
from qtrain.fsinfo import pid_alive

# ---------------------------------------------------------------- upgrading


def check_upgrade_target(src: Path, out: Path) -> None:
    """Refuse an `out` that exists with content, or that lies inside (or is) the source.

    Raises:
        ConfigError: naming `out` and why.
    """
    rundir.check_ancestors(out, "out: ")  # under a regular file: exit 2 naming it
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out: {out} already exists and is not an empty directory; upgrade writes a new directory")
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise ConfigError(f"out: {out} is inside the source checkpoint {src}; choose a directory outside it")


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove ``.tmp-<out name>-<pid>``, what an upgrade into `out` that was killed left, when `pid` is gone.

    A signal removes the temporary as the run ends; SIGKILL, a power cut or a second signal
    during that removal leave it for this clean-up (as checkpoint saves clean up theirs). A
    temporary of a live process (a concurrent upgrade) and anything that is not a plain
    directory (a planted link) are left alone.

    Returns:
        The removed directories (each said with a warning).
    """
    prefix = f"{TMP_PREFIX}{out.name}-"
    try:
        entries = [e for e in out.parent.iterdir() if e.name.startswith(prefix)] if out.parent.is_dir() else []
    except OSError:
        return []
    removed = []
    for entry in entries:
        pid = pid_of_temp(entry.name)
        if not entry.name[len(prefix) :].isdigit() or pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            warn(f"upgrade: removed {entry}, left by an interrupted upgrade (process {pid} is gone)")
            removed.append(entry)
    return removed


def upgrade_checkpoint(src: str | Path, out: str | Path) -> Path:
    """Write a migrated copy of checkpoint `src` at FORMAT_VERSION into the new directory `out`.

    The source is only read. Tensors are re-serialized, the manifest gets fresh sizes and
    hashes plus `upgraded_from` (the source's path and versions); the copy is written to a
    temporary sibling, fsynced and renamed, so `out` is either absent or complete.

    Returns:
        `out`.

    Raises:
        ConfigError: `out` exists and is not empty, or lies inside `src`.
        CheckpointError: the source fails verification.
        ResourceError: the disk filled up.
    """
    src_p, out_p = Path(src), Path(out).expanduser()
    check_upgrade_target(src_p, out_p)
    remove_stale_temps(out_p)
    ckpt = load_checkpoint(src_p, with_trainer=True)
    m = ckpt.manifest
    extras = {k: v for k, v in m.items() if k not in SYSTEM_KEYS and k != "upgraded_from"}
    extras["upgraded_from"] = {
        "path": str(src_p.resolve()),
        "format_version": m.get("migrated_from", FORMAT_VERSION),
        "qtrain_version": m.get("qtrain_version"),
        "torch_version": m.get("torch_version"),
    }
    payload = Payload(
        model_state=ckpt.model_state,
        trainer_tensors=ckpt.trainer_tensors,
        trainer_meta=ckpt.trainer_meta,
        manifest=extras,
        extra_files=ckpt.extra_files,  # the tokenizer.json it carries
    )
    need = tensor_bytes(ckpt.model_state) + tensor_bytes(ckpt.trainer_tensors)
    write_dir_atomically(out_p, lambda tmp: write_files(tmp, m["step"], payload), need)
    return out_p
