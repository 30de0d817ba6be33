"""The files a run (job) leaves for `mode=report`: writing a job's status, finding run dirs, reading them.

`cli` records each job's exit code and overrides in its `status.json` and a sweep's summary
in `sweep_status.json` (`write_status`, `write_sweep_status`); `mode=report` reads them back
here, with the job's `report.json`, `metrics.jsonl` and `.hydra/overrides.yaml`.

A run (job) dir holds any of `report.json`, `status.json`, `metrics.jsonl` or `.hydra/`;
a sweep dir holds job dirs (ordered by their Hydra job number). Unreadable or torn files are
noted on the :class:`Job`, never fatal: one broken job must not hide the others. Files are
opened only when they are regular files (a FIFO or device in a run dir never blocks or streams
into the report), read with a size limit and decoded as UTF-8 explicitly.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtrain import rundir, runlock
from qtrain.console import err_console, labelled, rank
from qtrain.errors import ConfigError
from qtrain.report_format import REPORT_FILE
from qtrain.rundir import READ_LIMIT, RunFileError, open_regular, read_regular

STATUS_FILE = "status.json"
SWEEP_STATUS_FILE = "sweep_status.json"
METRICS_FILE = "metrics.jsonl"
LABEL_SKIP = ("init_from", "compare_to", "data.path", "out", "runs", "hydra.")
"""Overrides left out of job labels (paths, Hydra's own settings): status.json keeps them."""
LABEL_VALUE_CHARS = 32
"""Longer override values are cut in labels (report_table.json rows keep the job's path)."""
TARGET = re.compile(r"_target_\s*[:=]\s*['\"]?([\w.]+)")
LINE_LIMIT = 1 << 20
"""Longest metrics.jsonl line read as one (longer ones are garbage: read in pieces, skipped)."""
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
    problems: list[str] = field(default_factory=list)
    """What could not be read, or was of the wrong kind or type (shown in the status column)."""


# ---------------------------------------------------------------- writing (cli, after each job)


def write_status(run_dir: Path, code: int, overrides: list[str]) -> None:
    """status.json (rank 0), under the run dir's lock: never into a dir another live qtrain holds, nor via a link."""
    if rank() != 0:
        return
    status = {"exit_code": code, "ok": code == 0, "overrides": overrides}
    try:
        rundir.make_dirs(run_dir)
        with runlock.hold(run_dir):
            rundir.write_atomic(run_dir / STATUS_FILE, json.dumps(status, indent=2) + "\n")
    except ConfigError as err:
        err_console.print(labelled("warning", "yellow", f"{STATUS_FILE} not written: {err}"))


def write_sweep_status(sweep_dir: Path, jobs: list[dict[str, Any]], failed: int) -> None:
    """sweep_status.json: every job of a sweep with its exit code, and the counts.

    Raises:
        ConfigError: a planted link or a directory in its place (refused, never written through).
    """
    summary = {"jobs": jobs, "failed": failed, "succeeded": len(jobs) - failed}
    rundir.write_atomic(sweep_dir / SWEEP_STATUS_FILE, json.dumps(summary, indent=2) + "\n")


# ---------------------------------------------------------------- reading (mode=report)


def _is_job_dir(path: Path) -> bool:
    try:
        return any(os.path.lexists(path / name) for name in JOB_MARKERS)
    except OSError:  # cannot look inside: listed, and its row says why
        return True


def _job_order(path: Path) -> tuple[int, str]:
    match = re.match(r"(\d+)", path.name)
    return (int(match.group(1)) if match else 1 << 30, path.name)


def _jobs_in(entry: str) -> list[Path]:
    path = Path(entry)
    if not path.is_dir():
        raise ConfigError(f"runs: {entry} is not a directory")
    if _is_job_dir(path):
        return [path]
    try:
        return sorted((p for p in path.iterdir() if p.is_dir() and _is_job_dir(p)), key=_job_order)
    except OSError as err:
        raise ConfigError(f"runs: cannot list {entry}: {err.strerror}") from None


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
        jobs = _jobs_in(entry)
        if not jobs:
            raise ConfigError(f"runs: {entry} holds no run (no {REPORT_FILE} or {STATUS_FILE}) and no sweep job dirs")
        found.extend(jobs)
    unique: dict[Path, Path] = {}
    for job in found:
        unique.setdefault(job.resolve(), job)
    return list(unique.values())


def read_text(path: Path, job: Job, limit: int = READ_LIMIT) -> str | None:
    """The UTF-8 text of a run file, or None (absent, or unreadable: the reason goes to ``job.problems``)."""
    try:
        raw = read_regular(path, limit)
    except FileNotFoundError:
        return None
    except RunFileError as err:
        job.problems.append(str(err))
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        job.problems.append(f"{path.name} is not UTF-8 text (byte {err.start})")
        return None


def _read_json(path: Path, job: Job) -> dict[str, Any] | None:
    text = read_text(path, job)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except RecursionError:
        job.problems.append(f"{path.name} is nested too deeply")
        return None
    except ValueError as err:
        job.problems.append(f"{path.name} is not valid JSON ({err})")
        return None
    if not isinstance(data, dict):
        job.problems.append(f"{path.name} holds a JSON {type(data).__name__}, not an object")
        return None
    return data


def _read_overrides(path: Path, job: Job) -> list[str]:
    text = read_text(path / ".hydra" / "overrides.yaml", job)
    # Hydra writes a YAML list of strings: "- key=value" per line.
    return [line[2:].strip().strip("'\"") for line in (text or "").splitlines() if line.startswith("- ")]


def finite(value: Any) -> bool:
    """Whether `value` is a finite int or float (not a bool; a huge int does not raise)."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        return False


def _metric_lines(path: Path, job: Job) -> Iterator[bytes]:
    """The lines of metrics.jsonl, each cut at :data:`LINE_LIMIT` (never a whole huge file in memory)."""
    try:
        f = open_regular(path)
    except FileNotFoundError:
        return
    except RunFileError as err:
        job.problems.append(str(err))
        return
    with f:
        try:
            while line := f.readline(LINE_LIMIT):
                if len(line) == LINE_LIMIT and not line.endswith(b"\n"):  # garbage: skip to its end
                    while (rest := f.readline(LINE_LIMIT)) and not rest.endswith(b"\n"):
                        pass
                    line = b""
                yield line
        except OSError as err:
            job.problems.append(f"{path.name}: cannot read ({err.strerror})")


def read_metrics(path: Path, job: Job | None = None) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) and (step, val_loss) pairs from a metrics.jsonl (bad lines skipped and counted)."""
    job = job if job is not None else Job(path=path.parent)
    losses: list[tuple[int, float]] = []
    vals: list[tuple[int, float]] = []
    bad = 0
    for line in _metric_lines(path, job):
        try:
            rec = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            bad += 1  # a torn last line of a killed run, or garbage
            continue
        if not isinstance(rec, dict) or not finite(rec.get("step")):
            continue
        step = int(rec["step"])
        if finite(rec.get("loss")):
            losses.append((step, float(rec["loss"])))
        if finite(rec.get("val_loss")):
            vals.append((step, float(rec["val_loss"])))
    if bad > 1:  # one torn line is what a killed run leaves: not worth a note
        job.problems.append(f"{path.name}: {bad} unreadable lines skipped")
    return losses, vals


def _check_status(job: Job) -> None:
    """Drop a status.json whose `ok` / `exit_code` are of the wrong type (noted on the job)."""
    st = job.status
    if st is None:
        return
    wrong = [
        k
        for k, ok in (("ok", isinstance(st.get("ok", True), bool)), ("exit_code", _is_int(st.get("exit_code", 0))))
        if not ok
    ]
    if wrong:
        job.problems.append(f"{STATUS_FILE}: {', '.join(wrong)} of the wrong type; ignored")
        job.status = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_job(path: Path) -> Job:
    """Read one job dir's report, status, overrides and metrics; what cannot be read goes to ``problems``."""
    job = Job(path=path)
    job.report = _read_json(path / REPORT_FILE, job)
    job.status = _read_json(path / STATUS_FILE, job)
    _check_status(job)
    listed = (job.status or {}).get("overrides")
    if not isinstance(listed, list):
        listed = _read_overrides(path, job)
    job.overrides = [o for o in listed if isinstance(o, str)]
    job.losses, job.val_losses = read_metrics(path / METRICS_FILE, job)
    return job


def _labelled(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return not any(key == k or (k.endswith(".") and key.startswith(k)) for k in LABEL_SKIP)


def short_override(override: str) -> str:
    """An override as a label shows it: a hook list by its class names, other long values cut."""
    key, sep, value = override.partition("=")
    targets = TARGET.findall(value)
    if targets:
        value = "[" + ",".join(t.rsplit(".", 1)[-1] for t in targets) + "]"
    elif len(value) > LABEL_VALUE_CHARS:
        value = value[: LABEL_VALUE_CHARS - 3] + "..."
    return f"{key}{sep}{value}"


def _varying(group: list[list[str]]) -> list[list[str]]:
    """Per job, the overrides not shared by every job of the group (all of them for a lone job)."""
    common = set.intersection(*map(set, group)) if len(group) > 1 else set()
    return [[o for o in overrides if o not in common] or overrides for overrides in group]


def job_labels(jobs: list[Job]) -> list[str]:
    """Readable, unique job names from the overrides in status.json / .hydra/overrides.yaml.

    Jobs are compared with the others in the same directory (a sweep's jobs with each other):
    a job is named by its overrides that differ from its siblings', space-separated as typed
    (all of a lone run's), hook lists by their class names. A job without overrides is named
    by its directory; labels that still coincide get ``(parent/N)`` appended.
    """
    kept = [[short_override(o) for o in j.overrides if _labelled(o)] for j in jobs]
    groups: dict[Path, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.path.parent, []).append(i)
    labels = [""] * len(jobs)
    for members in groups.values():
        for i, varying in zip(members, _varying([kept[i] for i in members]), strict=True):
            labels[i] = " ".join(varying) if varying else jobs[i].path.name
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return [
        f"{label} ({job.path.parent.name}/{job.path.name.split('_', 1)[0]})" if seen[label] > 1 else label
        for job, label in zip(jobs, labels, strict=True)
    ]
