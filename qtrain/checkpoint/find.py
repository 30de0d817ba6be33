"""Finding checkpoints: step directories, the newest valid one, `init_from` paths."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from qtrain import rundir
from qtrain.checkpoint.format import (
    LATEST,
    MANIFEST,
    MODEL_FILE,
    STEP_LIKE_RE,
    STEP_RE,
    TMP_PREFIX,
    TRAINER_FILE,
    TRAINER_META,
)
from qtrain.checkpoint.load import verify_checkpoint
from qtrain.console import warn
from qtrain.errors import CheckpointError, ConfigError

T = TypeVar("T")

# ---------------------------------------------------------------- finding


def step_of(path: Path) -> int:
    """Step number from a `step_NNNNNNN` directory name (ASCII digits only; -1 otherwise)."""
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def list_step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest first (published names only)."""
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and STEP_RE.match(d.name)), key=step_of)


def find_latest_valid(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, plus every directory skipped and why.

    Published directories are tried newest step first (`latest` may lag by one if a save was
    killed between the rename and the pointer update). Temporary directories left by an
    interrupted save, and directories named like steps but not in ASCII digits, are
    reported as skipped, never loaded.
    """
    found, _, skipped = newest_usable(root, verify_checkpoint)
    return found, skipped


def newest_usable(root: Path, accept: Callable[[Path], T]) -> tuple[Path | None, T | None, list[tuple[Path, str]]]:
    """The newest step directory for which `accept(dir)` succeeds, its result, and what was skipped.

    `accept` (e.g. a full load for resuming) raising CheckpointError skips that directory for
    the next older one; any other error propagates (a usage problem is not a bad checkpoint).
    """
    skipped: list[tuple[Path, str]] = [
        (d, "incomplete save: temporary directory of an interrupted write") for d in temp_entries(root) if d.is_dir()
    ]
    skipped += [
        (d, "named like a step directory but not with ASCII digits (step_0001234); never loaded")
        for d in (sorted(root.iterdir()) if root.is_dir() else [])
        if STEP_LIKE_RE.match(d.name) and not STEP_RE.match(d.name)
    ]
    for d in reversed(list_step_dirs(root)):
        try:
            return d, accept(d), skipped
        except CheckpointError as err:
            skipped.append((d, str(err)))
    return None, None, skipped


def is_checkpoint_dir(p: Path) -> bool:
    """Whether `p` is meant as one checkpoint directory (step name or checkpoint files inside)."""
    return p.is_dir() and (
        bool(STEP_RE.match(p.name)) or any((p / n).exists() for n in (MANIFEST, MODEL_FILE, TRAINER_FILE, TRAINER_META))
    )


def resolve_checkpoint(path: str | Path, key: str = "init_from") -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir or a `checkpoints/` dir.

    A run dir means its newest valid checkpoint; each invalid one skipped is warned about.

    Raises:
        ConfigError: the path does not exist or holds no checkpoint (names `key` and path).
        CheckpointError: a run dir whose checkpoints are all invalid.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}: {p} does not exist")
    if is_checkpoint_dir(p):
        return p
    if os.path.lexists(p / "checkpoints") and not (p / "checkpoints").is_dir():  # a file, a dangling link
        raise ConfigError(f"{key}: {p / 'checkpoints'} is {rundir.describe(p / 'checkpoints')}, not a directory")
    for root in (p / "checkpoints", p):
        if list_step_dirs(root) or (root / LATEST).exists():
            found, skipped = find_latest_valid(root)
            if found is None:
                reasons = "; ".join(f"{d.name}: {why}" for d, why in skipped)
                raise CheckpointError(f"{key}: no valid checkpoint in {root} ({reasons})")
            for d, why in skipped:
                warn(f"{key}: skipping {d} ({why})")
            return found
    raise ConfigError(f"{key}: {p} is neither a checkpoint directory nor a run directory with checkpoints")


def temp_entries(root: Path) -> list[Path]:
    """Leftovers of interrupted writes under `root` (temporary directories and files)."""
    return sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []
