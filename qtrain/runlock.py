"""One run directory, one writer.

:class:`RunLock` takes an exclusive ``flock`` on ``<run dir>/.qtrain.lock`` and writes the
holder's pid into it. A second qtrain on the same run directory is refused (exit 2) naming
that pid. The kernel drops the lock of a process that dies, so a lock file left by a killed
run (still holding its pid) is taken over with a warning naming that pid. The lock file is
removed when the run ends. Every mode holds the lock of its own run directory (the one it
writes `report.json` and `status.json` into) for the whole job; directories a run only reads
(`init_from`, `compare_to`, `runs=`) are not locked: checkpoints are published atomically, so
reading a run while it trains is safe. Under DDP only rank 0 takes it (the other ranks write
nothing into the run directory); each job of a sweep locks its own directory.

Hydra writes ``.hydra/`` into the run directory before qtrain's code runs, so a run directory
named on the command line is checked first (`check_named_dirs`): not held by a live process,
no planted link among Hydra's files, no file on the way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from qtrain.console import warn
from qtrain.errors import ConfigError
from qtrain.fsinfo import pid_alive
from qtrain.rundir import NO_SURPRISES, check_ancestors, check_dir, check_file, lstat_or_none, open_for_write, write_all

LOCK_FILE = ".qtrain.lock"
_HELD: dict[str, RunLock] = {}
"""Run dirs this process holds the lock of (by real path), so nested holders do not lock themselves out."""


def _pid_in(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _held_message(run_dir: Path, pid: int | None) -> str:
    path = run_dir / LOCK_FILE
    if pid is None:
        who = "another process (it has not written its pid yet)"
    elif pid_alive(pid):
        who = f"qtrain pid {pid}"
    else:
        who = f"a process started by pid {pid} (no longer running; a child of it still holds the lock)"
    return (
        f"hydra.run.dir: {run_dir} is in use by {who} (lock {path}); one run directory has one writer. "
        f"Wait for it to finish, or choose another hydra.run.dir"
    )


class RunLock:
    """The exclusive lock of one run directory (``.qtrain.lock``, holding the holder's pid)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; take over one left by a dead process (warning naming its pid).

        Raises:
            ConfigError: a live process holds it (naming its pid), or the lock file is a
                planted link or not a regular file.
        """
        for _ in range(10):
            fd = open_for_write(self.path, os.O_CREAT, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _pid_in(fd)
                os.close(fd)
                raise ConfigError(_held_message(self.run_dir, pid)) from None
            st = lstat_or_none(self.path)
            if st is not None and st.st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder removed the file between our open and flock: try the new one
        else:
            raise ConfigError(f"{self.path}: the lock file keeps being replaced; is a second qtrain running?")
        stale = _pid_in(fd)
        if stale is not None and stale != os.getpid():
            warn(f"{self.run_dir}: taking over the lock left by pid {stale}, which is no longer running (killed?)")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        write_all(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file, then drop the lock (so nobody locks a file about to vanish unseen)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            st = lstat_or_none(self.path)
            if st is not None and st.st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block (re-entrant within this process).

    Raises:
        ConfigError: another live process holds it, or the lock file is planted.
    """
    key = _key(run_dir)
    if key in _HELD:
        yield
        return
    lock = RunLock(run_dir)
    lock.acquire()
    _HELD[key] = lock
    try:
        yield
    finally:
        _HELD.pop(key, None)
        lock.release()


def holder(run_dir: Path) -> int | None:
    """Pid in `run_dir`'s lock when a live process holds it (0 when it has not written it yet); else None."""
    if _key(run_dir) in _HELD:
        return None
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | NO_SURPRISES)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_unheld(run_dir: Path) -> None:
    """Refuse (exit 2) when a live process holds `run_dir` (checked before Hydra writes `.hydra/`).

    Raises:
        ConfigError: naming the holder's pid.
    """
    pid = holder(run_dir)
    if pid is not None:
        raise ConfigError(_held_message(run_dir, pid or None))


HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
"""What Hydra writes into ``<run dir>/.hydra/`` before qtrain runs (Hydra follows links: checked first)."""


def check_for_hydra(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """Before Hydra writes anything: `run_dir` can be created, holds no planted `.hydra/` link, is not held.

    Raises:
        ConfigError: naming the path (a file on the way, a planted link) or the holder's pid.
    """
    check_ancestors(run_dir, f"{key}: ")
    if not run_dir.is_dir():
        return
    check_dir(run_dir / ".hydra")
    for name in HYDRA_FILES:
        check_file(run_dir / ".hydra" / name)
    check_unheld(run_dir)


def _override(overrides: list[str], key: str) -> Path | None:
    values = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith(key + "=")]
    return Path(values[-1]).expanduser() if values and values[-1] and "${" not in values[-1] else None


def check_named_dirs(overrides: list[str], multirun: bool) -> None:
    """`check_for_hydra` on a run dir (or a sweep dir's job dirs) named on the command line.

    Raises:
        ConfigError: as `check_for_hydra`.
    """
    if not multirun:
        if (run_dir := _override(overrides, "hydra.run.dir")) is not None:
            check_for_hydra(run_dir)
        return
    sweep = _override(overrides, "hydra.sweep.dir")
    if sweep is None:
        return
    check_for_hydra(sweep, "hydra.sweep.dir")
    check_file(sweep / "multirun.yaml")  # Hydra's
    check_file(sweep / "sweep_status.json")  # qtrain's, written after the jobs: refused before any runs
    if sweep.is_dir():
        for job in sorted(p for p in sweep.iterdir() if p.is_dir() and not p.is_symlink()):
            check_for_hydra(job, "hydra.sweep.dir")
