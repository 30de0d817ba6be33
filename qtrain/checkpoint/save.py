"""Saving a step directory, publishing `latest`, pruning old checkpoints and stale temporaries."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from qtrain import rundir
from qtrain.checkpoint import write as ck_write
from qtrain.checkpoint.find import list_step_dirs, step_of, temp_entries
from qtrain.checkpoint.format import DISK_FULL, LATEST, TMP_PREFIX, Payload
from qtrain.checkpoint.load import verify_checkpoint
from qtrain.checkpoint.write import (
    fsync_dir,
    pid_of_temp,
    step_dir_name,
    tensor_bytes,
    write_dir_atomically,
    write_files,
)
from qtrain.errors import CheckpointError, ResourceError
from qtrain.fsinfo import pid_alive

# ---------------------------------------------------------------- saving and retention


def save_checkpoint(
    root: Path, step: int, payload: Payload, keep: int, before_publish: Callable[[Path], None] | None = None
) -> Path:
    """Write a checkpoint atomically under `root`, point `latest` at it, then prune.

    Args:
        root: the run's `checkpoints/` directory.
        step: optimizer step the state belongs to.
        payload: tensors and metadata to store.
        keep: number of valid checkpoints to retain (the newest valid one is never deleted).
        before_publish: called with the temporary directory just before the rename (tests).

    Returns:
        The published checkpoint directory.

    Raises:
        ResourceError: the disk filled up (temporary directory removed, nothing else touched).
        TypeError: trainer state that cannot be stored, naming its key (nothing else touched).
    """
    rundir.check_dir(root)  # the run's checkpoints/: never a planted link
    final = root / step_dir_name(step)
    need = tensor_bytes(payload.model_state) + tensor_bytes(payload.trainer_tensors)
    write_dir_atomically(final, lambda tmp: write_files(tmp, step, payload), need, before_publish)
    _publish_latest(root, final.name)
    prune(root, keep)
    return final


def _publish_latest(root: Path, name: str) -> None:
    rundir.check_file(root / LATEST)  # a planted link or a directory: refused (exit 2), never replaced
    tmp = root / f"{TMP_PREFIX}{LATEST}-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        with ck_write.open_new(tmp) as f:  # through the module: tests patch it there
            f.write((name + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / LATEST)
        fsync_dir(root)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in DISK_FULL:
            raise ResourceError(f"disk full while updating {root / LATEST}; {name} itself was published") from None
        raise


def _remove_stale_temps(root: Path) -> None:
    """Delete temporaries of dead processes (a SIGKILLed save) and of this one."""
    for entry in temp_entries(root):
        pid = pid_of_temp(entry.name)
        if pid is None or pid == os.getpid() or not pid_alive(pid):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def prune(root: Path, keep: int) -> list[Path]:
    """Delete the oldest checkpoints beyond the `keep` newest *valid* ones; never the newest valid.

    Invalid (corrupt, incomplete) directories newer than the cutoff are kept for inspection;
    temporaries left by killed processes are removed.
    """
    _remove_stale_temps(root)
    valid: list[Path] = []
    for d in list_step_dirs(root):
        try:
            verify_checkpoint(d)
            valid.append(d)
        except CheckpointError:
            continue
    if len(valid) <= keep:
        return []
    cutoff = step_of(valid[-keep])
    removed = []
    for d in list_step_dirs(root):
        if step_of(d) < cutoff:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
