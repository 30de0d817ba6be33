"""Finding the run dirs of `mode=report` (runs and multirun sweeps) and reading what each left.

A run (job) dir holds any of `report.json`, `status.json`, `metrics.jsonl` or `.hydra/`;
a sweep dir holds job dirs (ordered by their Hydra job number). Unreadable or torn files are
noted on the :class:`Job`, never fatal: one broken job must not hide the others.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtrain.errors import ConfigError
from qtrain.report import REPORT_FILE

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
JOB_MARKERS = (REPORT_FILE, STATUS_FILE, METRICS_FILE, ".hydra")
"""A directory holding any of these is a run (job) dir."""


@dataclass
class Job:
    """What one run dir left behind."""

    path: Path
    report: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    overrides: list[str] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    problem: str | None = None
    """Why a file could not be read (shown in the status column)."""


def _is_job_dir(path: Path) -> bool:
    return any((path / name).exists() for name in JOB_MARKERS)


def _job_order(path: Path) -> tuple[int, str]:
    match = re.match(r"(\d+)", path.name)
    return (int(match.group(1)) if match else 1 << 30, path.name)


def find_job_dirs(runs: list[str]) -> list[Path]:
    """Expand run and sweep dirs into job dirs, in order, without duplicates.

    Args:
        runs: run dirs and/or multirun sweep dirs.

    Returns:
        The job dirs (a sweep's jobs sorted by their job number).

    Raises:
        ConfigError: a path does not exist or holds neither a run nor a sweep.
    """
    found: list[Path] = []
    for entry in runs:
        path = Path(entry)
        if not path.is_dir():
            raise ConfigError(f"runs: {entry} is not a directory")
        if _is_job_dir(path):
            jobs = [path]
        else:
            jobs = sorted((p for p in path.iterdir() if p.is_dir() and _is_job_dir(p)), key=_job_order)
        if not jobs:
            raise ConfigError(f"runs: {entry} holds no run (no {REPORT_FILE} or {STATUS_FILE}) and no sweep job dirs")
        found.extend(jobs)
    unique: dict[Path, Path] = {}
    for job in found:
        unique.setdefault(job.resolve(), job)
    return list(unique.values())


def _read_json(path: Path, job: Job) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        job.problem = f"unreadable {path.name}: {err}"
        return None
    return data if isinstance(data, dict) else None


def _read_overrides(path: Path) -> list[str]:
    file = path / ".hydra" / "overrides.yaml"
    if not file.exists():
        return []
    # Hydra writes a YAML list of strings: "- key=value" per line.
    return [line[2:].strip().strip("'\"") for line in file.read_text().splitlines() if line.startswith("- ")]


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) and (step, val_loss) pairs from a metrics.jsonl (bad lines skipped)."""
    losses: list[tuple[int, float]] = []
    vals: list[tuple[int, float]] = []
    if not path.exists():
        return losses, vals
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed run
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        if isinstance(rec.get("loss"), (int, float)):
            losses.append((int(rec["step"]), float(rec["loss"])))
        if isinstance(rec.get("val_loss"), (int, float)):
            vals.append((int(rec["step"]), float(rec["val_loss"])))
    return losses, vals


def read_job(path: Path) -> Job:
    """Read one job dir's report, status, overrides and metrics."""
    job = Job(path=path)
    job.report = _read_json(path / REPORT_FILE, job)
    job.status = _read_json(path / STATUS_FILE, job)
    job.overrides = list((job.status or {}).get("overrides") or _read_overrides(path))
    job.losses, job.val_losses = read_metrics(path / METRICS_FILE)
    return job
