"""Corpus bytes, the train/validation split and its fingerprint, without torch or Hydra.

This module imports only the standard library, so the corpus (and its fingerprint) can be
checked under any Python, with or without torch installed:

    $ PYTHONPATH=/path/to/qtrain python3.12 -c \\
        "from qtrain.corpus import corpus_fingerprint; print(corpus_fingerprint('pydocs'))"

The embedded `pydocs` corpus is a fixed snapshot shipped with the package
(`qtrain/corpora/pydocs.txt.gz`): the text qtrain built from CPython 3.11.7's
`pydoc_data.topics` (topics sorted by name, joined by blank lines; 466,273 bytes of UTF-8).
Every Python's own `pydoc_data.topics` differs (460,220 bytes on 3.10.13, 493,500 on 3.12.1,
511,947 on 3.13.0), so reading it at run time would give each Python a different corpus.

Example:
    >>> raw, source = corpus_bytes("pydocs")
    >>> n_train = split_point(len(raw), 0.1)
    >>> fingerprint("pydocs", raw[:n_train], raw[n_train:])["val_bytes"]
    46627
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import logging
import os
import stat
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

from qtrain import sysmem
from qtrain.fsinfo import file_kind

PYDOCS_SNAPSHOT = "corpora/pydocs.txt.gz"
"""The snapshot's path inside the `qtrain` package."""
PYDOCS_BYTES = 466_273
"""Length of the uncompressed snapshot."""
PYDOCS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"
"""SHA-256 of the uncompressed snapshot (checked on every load)."""
PYDOCS_SOURCE = "pydocs (snapshot of CPython 3.11.7's pydoc_data.topics)"
"""How reports and messages name the embedded corpus."""
COPIES = 2
"""Bytes of memory per corpus byte while a run holds it (the bytes read, the split's token views)."""
CHUNK = 16 * 2**20
"""UTF-8 is checked this many bytes at a time (no decoded copy of the whole corpus)."""
_log = logging.getLogger("qtrain.corpus")
Buffer = bytes | bytearray | memoryview


class DataError(ValueError):
    """A corpus that cannot be used (missing, empty, binary or too short)."""


def pydocs_bytes() -> bytes:
    """The embedded `pydocs` corpus: the same bytes on every Python.

    Raises:
        DataError: the snapshot is missing or damaged in this installation.
    """
    snap = resources.files("qtrain").joinpath(PYDOCS_SNAPSHOT)
    try:
        raw = gzip.decompress(snap.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"data=pydocs: cannot read qtrain/{PYDOCS_SNAPSHOT} ({err}); reinstall qtrain") from None
    if len(raw) != PYDOCS_BYTES or hashlib.sha256(raw).hexdigest() != PYDOCS_SHA256:
        raise DataError(
            f"data=pydocs: qtrain/{PYDOCS_SNAPSHOT} is damaged (expected {PYDOCS_BYTES} bytes with "
            f"SHA-256 {PYDOCS_SHA256}, got {len(raw)} bytes); reinstall qtrain"
        )
    return raw


def _kind(mode: int) -> str | None:
    """What a non-regular file is, for messages (None for a regular file or a directory)."""
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else file_kind(mode)


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise DataError(f"data.path: {path} does not exist") from None
    except OSError as err:
        raise DataError(f"data.path: cannot access {path}: {err.strerror or err}") from None


def memory_limit() -> tuple[int, str]:
    """Largest corpus (bytes) this process can hold (:data:`COPIES` per byte), and what bounds it."""
    avail = sysmem.available_memory()
    return max(0, avail.bytes - sysmem.current_rss()) // COPIES, avail.source


def read_text_corpus(path: Path, limit: int | None = None) -> bytearray:
    """The bytes of a UTF-8 file, or of a directory's `*.txt` files (sorted, joined by newlines).

    Nothing is read from a path that is not a regular file (a FIFO or a device would stream
    without end), and nothing at all when the files' sizes exceed `limit` (see `plan`).

    Args:
        path: a regular file, or a directory searched recursively for regular `*.txt` files.
        limit: most bytes to read (default: what the available memory can hold, see `memory_limit`).

    Raises:
        DataError: missing or unreadable path, not a regular file, no .txt files, larger than
            memory, binary or non-UTF-8 content (the message names the file and the reason).
    """
    files, limit = plan(path, limit)
    out = bytearray()
    for i, (f, _) in enumerate(files):
        if i:
            out += b"\n"
        out += _read_one(f, limit - len(out))
    return out


def plan(path: Path, limit: int | None = None, warn: bool = True) -> tuple[list[tuple[Path, int]], int]:
    """The files a text corpus at `path` is read from, with their sizes, and the byte limit; nothing read.

    Raises:
        DataError: as `read_text_corpus`, for everything that stat and a directory listing can tell.
    """
    st = _stat(path)
    if kind := _kind(st.st_mode):
        raise DataError(
            f"data.path: {path} is {kind}, not a regular file; data=text reads a UTF-8 file or a directory "
            f"of .txt files (nothing was read from it)"
        )
    files = _text_files(path, warn) if stat.S_ISDIR(st.st_mode) else [(path, st.st_size)]
    total = sum(size for _, size in files)
    source = "given"
    if limit is None:
        limit, source = memory_limit()
    if total > limit:
        raise DataError(
            f"data.path: {path} holds {total:,} bytes; a run keeps about {COPIES}x that in memory, more than "
            f"this process may use ({source}); nothing was read. Use a smaller corpus (a part of the file, "
            f"or fewer .txt files)"
        )
    return files, limit


def corpus_size(name: str, path: str | None = None) -> int:
    """Bytes the configured corpus will have, from file sizes alone (nothing is read).

    Raises:
        DataError: as `read_text_corpus`, for a path that cannot be a corpus (see `plan`).
    """
    if name != "text" or not path:
        return PYDOCS_BYTES if name == "pydocs" else 0
    files, _ = plan(Path(str(path)).expanduser(), warn=False)
    return sum(size for _, size in files) + len(files) - 1


def _text_files(path: Path, warn: bool = True) -> list[tuple[Path, int]]:
    """The regular `*.txt` files under directory `path` with their sizes; others are named and skipped."""
    found: list[tuple[Path, int]] = []
    skipped: list[str] = []
    for p in sorted(path.rglob("*.txt")):
        try:
            st = p.stat()
        except OSError as err:
            skipped.append(f"{p} ({err.strerror or err})")
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((p, st.st_size))
        elif not stat.S_ISDIR(st.st_mode):
            skipped.append(f"{p} ({_kind(st.st_mode)})")
    if skipped and warn:
        _log.warning(
            "data.path: skipped %d .txt entries that are not readable regular files: %s",
            len(skipped),
            ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""),
        )
    if not found:
        others = sum(1 for p in path.rglob("*") if not p.is_dir())
        why = f"{len(skipped)} .txt entries are not readable regular files" if skipped else "no .txt files"
        raise DataError(
            f"data.path: directory {path} contains no text to read ({why}; {others} file(s) in all); "
            f"data=text reads regular UTF-8 *.txt files"
        )
    return found


def _read_one(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file, checked as UTF-8 text (never opens a FIFO blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise DataError(f"data.path: cannot read {path}: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as f:
        kind = _kind(os.fstat(fd).st_mode)
        if kind:  # replaced since it was listed
            raise DataError(f"data.path: {path} is {kind}, not a regular file (nothing was read from it)")
        try:
            raw = f.read(limit + 1)
        except OSError as err:
            raise DataError(f"data.path: cannot read {path}: {err.strerror or err}") from None
    if len(raw) > limit:
        raise DataError(f"data.path: {path} is larger than the {limit:,} bytes this process can hold (it grew?)")
    if b"\x00" in raw[:65536]:
        raise DataError(f"data.path: {path} looks binary (contains NUL bytes); give UTF-8 text")
    check_utf8(raw, path)
    return raw


def check_utf8(raw: Buffer, path: Path | str) -> None:
    """Raise DataError naming `path` and the byte offset when `raw` is not UTF-8 (checked in chunks)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw)
    for start in range(0, max(len(view), 1), CHUNK):
        try:
            dec.decode(view[start : start + CHUNK], final=start + CHUNK >= len(view))
        except UnicodeDecodeError as err:
            raise DataError(f"data.path: {path} is not UTF-8 text ({err.reason} at byte {start + err.start})") from None


def corpus_bytes(name: str, path: str | None = None) -> tuple[bytes | bytearray, str]:
    """The whole corpus and how to name it.

    Args:
        name: `pydocs` (embedded snapshot) or `text` (read from `path`).
        path: file or directory for `text`.

    Returns:
        (raw bytes, source) where source is `PYDOCS_SOURCE` or the expanded path.
    """
    if name == "pydocs":
        return pydocs_bytes(), PYDOCS_SOURCE
    if not path:
        raise DataError("data.path: data=text needs data.path=FILE_OR_DIR")
    p = Path(str(path)).expanduser()
    return read_text_corpus(p), str(p)


def split_point(n_bytes: int, val_fraction: float) -> int:
    """Bytes in the training split: the first part; the last `int(n * val_fraction)` validate."""
    return n_bytes - int(n_bytes * val_fraction)


def fingerprint(name: str, train: Buffer, val: Buffer) -> dict[str, Any]:
    """The corpus record kept in report.json and checkpoint manifests (key `corpus`).

    Args:
        name: `pydocs`, or the corpus path for `data=text`.
        train: bytes of the training split.
        val: bytes of the validation split.
    """
    return {
        "name": name,
        "train_bytes": len(train),
        "train_sha256": hashlib.sha256(train).hexdigest(),
        "val_bytes": len(val),
        "val_sha256": hashlib.sha256(val).hexdigest(),
    }


def fingerprint_name(name: str, source: str) -> str:
    """`pydocs`, or the absolute path of a `data=text` corpus."""
    return "pydocs" if name == "pydocs" else str(Path(source).resolve())


def corpus_fingerprint(name: str = "pydocs", path: str | None = None, val_fraction: float = 0.1) -> dict[str, Any]:
    """Fingerprint of a configured corpus, exactly as a run records it (no torch needed).

    Args:
        name: `pydocs` or `text`.
        path: file or directory for `text`.
        val_fraction: `data.val_fraction`.
    """
    raw, source = corpus_bytes(name, path)
    cut = split_point(len(raw), val_fraction)
    view = memoryview(raw)  # slices without copies
    return fingerprint(fingerprint_name(name, source), view[:cut], view[cut:])


def describe(fp: dict[str, Any]) -> str:
    """One short line for tables: name, split sizes and the first 12 hex digits of each SHA-256."""
    return (
        f"{fp.get('name')}: train {fp.get('train_bytes', 0):,} bytes (sha256 {str(fp.get('train_sha256'))[:12]}), "
        f"val {fp.get('val_bytes', 0):,} bytes (sha256 {str(fp.get('val_sha256'))[:12]})"
    )
