"""Writing inside a run directory safely, and one writer per run directory.

Every file qtrain writes in a run directory (`metrics.jsonl`, `report.json`, `status.json`,
`report_table.json`, `report.png`, a sweep's `sweep_status.json`) goes through this module:

- nothing is written through a symbolic link qtrain did not create: files are opened with
  ``O_NOFOLLOW``, temporaries with ``O_CREAT | O_EXCL`` (which never follows a link), and a
  planted link, or a directory, FIFO or device where a file belongs, is refused with a
  :class:`~qtrain.errors.ConfigError` (exit 2) naming the path;
- whole files are replaced atomically (temporary sibling, fsync, ``os.replace``);
- files qtrain reads from a run (reports, metrics, status) are opened only when they are
  regular files (``O_NONBLOCK``, then ``fstat``: a FIFO never blocks the reader), with a size
  limit.

One writer per run directory: `qtrain.runlock`. This module imports nothing from qtrain but
`errors` and `console`, so every layer (the trainer's metrics, checkpoints, reports) uses it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import IO

from qtrain.errors import ConfigError
from qtrain.fsinfo import file_kind

TMP_SUFFIX = ".tmp"
"""A whole-file write goes to ``<name>.tmp`` first (created exclusively), then replaces ``<name>``."""
READ_LIMIT = 64 << 20
"""Largest run file (report.json, status.json, overrides) qtrain reads whole."""
NO_SURPRISES = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""Never through a link; a FIFO does not block the open (fstat then refuses it); not inherited."""


def describe(path: Path) -> str:
    """What `path` is, as words: ``a regular file``, ``a symbolic link to a missing file``, ``missing``."""
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    if stat.S_ISLNK(st.st_mode) and not os.path.exists(path):
        return "a symbolic link to a missing file"
    return file_kind(st.st_mode)


def lstat_or_none(path: Path) -> os.stat_result | None:
    """`os.lstat`, or None when `path` does not exist (a file on the way: ConfigError)."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise ConfigError(f"{path}: a component of the path is not a directory") from None


def _planted(path: Path) -> ConfigError:
    return ConfigError(
        f"{path} is a symbolic link that qtrain did not create; refusing to write through it "
        f"(remove it, or choose another run directory)"
    )


def check_file(path: Path) -> None:
    """Refuse `path` unless it is absent or a regular file (not a link, directory, FIFO, device).

    Raises:
        ConfigError: naming the path and what it is.
    """
    st = lstat_or_none(path)
    if st is None or stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        raise _planted(path)
    raise ConfigError(f"{path} is {file_kind(st.st_mode)}, not a regular file; qtrain writes this file (move it away)")


def check_dir(path: Path) -> None:
    """Refuse `path` unless it is absent or a real directory (not a link to one).

    Raises:
        ConfigError: naming the path and what it is.
    """
    st = lstat_or_none(path)
    if st is None or stat.S_ISDIR(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        raise _planted(path)
    raise ConfigError(f"{path} is {file_kind(st.st_mode)}, not a directory; qtrain writes into it (move it away)")


def check_ancestors(path: Path, prefix: str) -> None:
    """Refuse `path` when its nearest existing ancestor (links followed: the user's choice) is not a directory.

    Raises:
        ConfigError: naming the ancestor and what it is (`prefix` names the key).
    """
    for parent in [path, *path.parents]:
        try:
            st = os.stat(parent)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{prefix}cannot use {path}: {parent} is {file_kind(st.st_mode)}, not a directory")
        return


def make_dirs(path: Path, key: str = "", own: bool = True) -> Path:
    """``mkdir -p`` that names the culprit when an ancestor is a file (exit 2, never exit 1).

    Ancestors are followed (a user may link a run directory elsewhere); with `own` (a
    directory qtrain creates itself, such as ``checkpoints/``) `path` must not be a link.

    Raises:
        ConfigError: an ancestor or `path` is not a directory, or `path` is a planted link.
    """
    prefix = f"{key}: " if key else ""
    check_ancestors(path, prefix)
    if own:
        check_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise ConfigError(f"{prefix}cannot create {path}: {err.strerror}") from None
    return path


def _open_error(path: Path, err: OSError) -> ConfigError:
    """The user error a failed open means (a link, a wrong kind, no permission); others re-raised (ENOSPC)."""
    if err.errno == errno.ELOOP:
        return _planted(path)
    if err.errno in (errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
        st = lstat_or_none(path)
        what = file_kind(st.st_mode) if st is not None else "not a regular file"
        return ConfigError(f"{path} is {what}, not a regular file; qtrain writes this file (move it away)")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConfigError(f"{path}: cannot write it ({err.strerror})")
    raise err


def open_for_write(path: Path, flags: int, access: int = os.O_WRONLY) -> int:
    """An fd for writing `path` that is a regular file reached without following a link.

    Raises:
        ConfigError: `path` is a planted link, or not a regular file (named).
    """
    try:
        fd = os.open(path, access | NO_SURPRISES | flags, 0o644)
    except OSError as err:
        raise _open_error(path, err) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = file_kind(st.st_mode)
        raise ConfigError(f"{path} is {what}, not a regular file; qtrain writes this file (move it away)")
    os.set_blocking(fd, True)
    return fd


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def append_text(path: Path, text: str) -> None:
    """Append `text` to `path` (created if absent) with one ``O_APPEND`` write; never through a link.

    Raises:
        ConfigError: `path` is a planted link or not a regular file.
    """
    fd = open_for_write(path, os.O_APPEND | os.O_CREAT)
    try:
        write_all(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def _new_temp(tmp: Path) -> int:
    """Create `tmp` exclusively; a regular leftover of a killed writer is replaced, anything else refused."""
    for _ in range(2):
        try:
            return open_for_write(tmp, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            check_file(tmp)  # a planted link or a directory: refused, naming it
            tmp.unlink(missing_ok=True)  # our own leftover (a regular file)
    raise ConfigError(f"{tmp}: another process keeps creating this temporary file; is a second qtrain running?")


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Replace `path` with `data` atomically: ``<path>.tmp`` (exclusive, fsynced), then ``os.replace``.

    Raises:
        ConfigError: `path` or its temporary is a planted link or not a regular file.
        OSError: the write failed (disk full: ENOSPC); the temporary is removed.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    check_file(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = _new_temp(tmp)
    try:
        try:
            write_all(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        check_file(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


# ---------------------------------------------------------------- reading run files


class RunFileError(Exception):
    """A run file that cannot be read: what is wrong, in words (shown in a report row)."""


def open_regular(path: Path) -> IO[bytes]:
    """Open `path` for reading only if it is a regular file (a FIFO or device never blocks or streams).

    Raises:
        FileNotFoundError: `path` does not exist.
        RunFileError: it is not a regular file, or cannot be opened (the reason in words).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise RunFileError(f"{path.name}: cannot open ({err.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RunFileError(f"{path.name} is {file_kind(st.st_mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, limit: int = READ_LIMIT) -> bytes:
    """The bytes of regular file `path`, at most `limit` of them.

    Raises:
        FileNotFoundError: `path` does not exist.
        RunFileError: not a regular file, unreadable, or larger than `limit`.
    """
    with open_regular(path) as f:
        try:
            data = f.read(limit + 1)
        except OSError as err:
            raise RunFileError(f"{path.name}: cannot read ({err.strerror})") from None
    if len(data) > limit:
        raise RunFileError(f"{path.name} is larger than {limit >> 20} MiB")
    return data
