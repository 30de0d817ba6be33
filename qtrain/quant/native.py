"""qtrain's own CPU decode kernels (``csrc/qgemv.c``): build once, load, call.

The C source ships with the package. On first use it is compiled with the system C compiler
(``$CC``, else ``cc``/``gcc``/``clang``; ``-O3 -mavx2 -mfma -fopenmp``) into a per-user cache
(``$QTRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/qtrain``, else ``~/.cache/qtrain``) under a name
that hashes the source, flags and compiler, and loaded with :mod:`ctypes`; later processes
just load it. The build takes about a second and is atomic (temporary file + rename, under a
lock file), so concurrent first uses (sweeps) are safe.

A built library is code this process runs, so it is trusted only if it is what qtrain built
(RELIABILITY.md case 40): ``kernels/`` is created owner-only (0o700, tightened if an older
qtrain left it open) and must belong to this user, in a directory others cannot rename
entries of; the SHA-256 of each library is recorded beside it when it is built
(``qgemv-<key>.so.sha256``) and compared with the bytes before they are loaded (opened once,
without following links, hashed and loaded through the same descriptor). A library that does
not match its record, has none, or is not a file only this user may write is rebuilt, with a
warning; a cache directory that is not this user's is not used at all (warning, PyTorch's
kernels). This detects tampering by other users and damage; the user's own account can
always replace both the library and its record.

Nothing is required: without an x86-64 CPU with AVX2 and FMA, without a compiler, or with
``QTRAIN_NATIVE_KERNELS=0``, :func:`library` returns ``None`` (the reason is logged once at
INFO) and the packed layers use PyTorch's kernels instead.

Kernels (few rows, i.e. decode; float32 in and out, weights in the canonical packed layout,
so no repacked copy of the weights exists):

- :func:`int4_linear`: activations quantized to int16 per 32 columns (relative error at most
  2^-16 of each block's largest value, finer than the bf16 activations PyTorch's int4 CPU
  kernel needs), exact int16 x uint4 multiply-adds into int32, float32 scaling.
- :func:`int8_linear`: float32 activations times int8 weights, float32 accumulation.

Threads: each call passes ``torch.get_num_threads()`` to the kernel's OpenMP region, so
``torch.set_num_threads`` (qtrain's ``threads`` key) sets both (:func:`team_size` checks it).
Whether these kernels or PyTorch's run at ``quant.kernel=auto`` is decided per machine by
:mod:`qtrain.quant.autotune`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "qgemv.c"
ABI = 3
"""Must equal ``QT_ABI`` in the C source."""
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
ENV_SWITCH = "QTRAIN_NATIVE_KERNELS"
ROW_BLOCK = 32
"""Columns per activation block; int4 groups and int8 rows must be multiples of it."""

RECORD = ".sha256"
"""Suffix of the file beside each built library that records its SHA-256 (``sha256sum`` format)."""
_SHA_RE = re.compile(r"[0-9a-f]{64}")

_STATE: dict[str, object] = {}


class Untrusted(RuntimeError):
    """The kernel cache, or a file in it, is not one only this user could have written."""


def cache_dir() -> Path:
    """Where built kernels live (see the module docstring)."""
    root = os.environ.get("QTRAIN_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qtrain"


def _compiler() -> str | None:
    for name in [os.environ.get("CC", ""), "cc", "gcc", "clang"]:
        if name and shutil.which(name):
            return name
    return None


def _unavailable_reason() -> str | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"CPU architecture {platform.machine()} (the kernels are AVX2)"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"CPU capability {torch.backends.cpu.get_cpu_capability()} (needs AVX2 + FMA)"
    if not SOURCE.is_file():
        return f"kernel source {SOURCE} missing"
    return None


def kernel_dir() -> Path:
    """The cache's ``kernels/`` directory: created owner-only (0o700), and trusted only when it is ours.

    Raises:
        Untrusted: it is a link or not a directory, belongs to another user, or lies in a
            directory other users may rename entries of (writable by them, not sticky).
    """
    root = cache_dir()
    path = root / "kernels"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)  # the modes apply to what is created here
    with contextlib.suppress(FileExistsError):  # e.g. a dangling link: refused below
        path.mkdir(exist_ok=True, mode=0o700)
    parent = os.stat(root)
    if parent.st_uid not in (os.geteuid(), 0) or (parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX):
        raise Untrusted(
            f"{root} is {_what(parent)}: other users may replace what is in it; "
            f"set QTRAIN_CACHE_DIR to a directory of your own"
        )
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise Untrusted(f"{path} is {_what(st)}, not a directory of yours")
    if st.st_mode & 0o077:  # made by an older qtrain, or loosened: tighten, files are checked one by one
        os.chmod(path, 0o700)
        if st.st_mode & 0o022:
            log.warning("native kernels: %s was writable by other users; now owner-only (0o700)", path)
    return path


def _what(st: os.stat_result) -> str:
    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else stat.filemode(st.st_mode)
    return kind if st.st_uid == os.geteuid() else f"{kind} owned by uid {st.st_uid}"


def _open_own(path: Path, limit: int | None = None) -> tuple[int, bytes]:
    """Open a regular file of ours that no one else may write (no link followed); its fd and bytes.

    Raises:
        Untrusted: anything else (the message says what it is).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise Untrusted(f"{path} is {_what(st)}, not a file only you may write")
        if limit is not None and st.st_size > limit:
            raise Untrusted(f"{path} is {st.st_size} bytes, more than the {limit} expected")
        with os.fdopen(os.dup(fd), "rb") as f:
            return fd, f.read()
    except BaseException:
        os.close(fd)
        raise


def read_private(path: Path, limit: int) -> bytes:
    """The bytes of a small cache file (the kernel choice), read only if it is ours and only we may write it.

    Raises:
        OSError: it cannot be opened (missing, a link).
        Untrusted: not a regular file of ours, writable by others, or over `limit` bytes.
    """
    fd, raw = _open_own(path, limit)
    os.close(fd)
    return raw


def recorded_hash(lib: Path) -> str | None:
    """The SHA-256 recorded when `lib` was built (``<lib>.sha256``, ``sha256sum`` format), or None."""
    try:
        fd, raw = _open_own(lib.with_name(lib.name + RECORD), limit=4096)
    except (OSError, Untrusted):
        return None
    os.close(fd)
    digest = raw.decode("ascii", errors="replace").split(" ", 1)[0].strip()
    return digest if _SHA_RE.fullmatch(digest) else None


def _build(cc: str) -> Path:
    """The built library in the cache: reused when its hash matches the record, else (re)built."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    kdir = kernel_dir()
    out = kdir / f"qgemv-{key}.so"
    _STATE["build"] = out.stem
    lock = os.open(kdir / ".build.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time: the library and its record agree
        why = _stale(out)
        if why is None:
            return out
        if why != "not built yet":
            log.warning("native kernels: %s %s; rebuilding it", out, why)
        _compile(cc, out)
    finally:
        os.close(lock)
    return out


def _stale(out: Path) -> str | None:
    """Why the cached `out` cannot be loaded as it is (None: its hash matches the record)."""
    if not os.path.lexists(out):
        return "not built yet"
    recorded = recorded_hash(out)
    if recorded is None:
        return "has no valid hash record"
    try:
        fd, data = _open_own(out)
    except (OSError, Untrusted) as err:
        return f"cannot be trusted ({err})"
    os.close(fd)
    actual = hashlib.sha256(data).hexdigest()
    return None if actual == recorded else f"does not match its recorded hash ({actual[:16]} vs {recorded[:16]})"


def _compile(cc: str, out: Path) -> None:
    """Compile into a temporary file, record its hash, then rename it into place."""
    temps = [_temp(out.parent, ".so"), _temp(out.parent, RECORD)]
    try:
        proc = subprocess.run(
            [cc, *FLAGS, "-o", temps[0], str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:500]}")
        os.chmod(temps[0], 0o700)  # the linker's mode follows the umask (group-writable under 002)
        digest = hashlib.sha256(Path(temps[0]).read_bytes()).hexdigest()
        Path(temps[1]).write_text(f"{digest}  {out.name}\n")
        os.replace(temps[1], out.with_name(out.name + RECORD))
        os.replace(temps[0], out)
    finally:  # also on a signal: no temporary left in the cache
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _temp(directory: Path, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix, dir=directory)  # owner-only, never an existing file
    os.close(fd)
    return path


def _load(cc: str) -> ctypes.CDLL:
    """Load the cached library, checking its hash against the record first (on the bytes loaded).

    The file is opened once: hashed through that descriptor and loaded from it
    (``/proc/self/fd/N``), so what runs is exactly what was checked.
    """
    out = _build(cc)
    fd, data = _open_own(out)
    try:
        actual, recorded = hashlib.sha256(data).hexdigest(), recorded_hash(out)
        if actual != recorded:
            raise Untrusted(f"{out} changed after it was checked ({actual[:16]} vs {str(recorded)[:16]})")
        proc_path = f"/proc/self/fd/{fd}"
        return ctypes.CDLL(proc_path if os.path.exists(proc_path) else str(out))
    finally:
        os.close(fd)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qt_abi_version.restype = c_int
    lib.qt_omp_team_size.argtypes = [c_int]
    lib.qt_omp_team_size.restype = c_int
    lib.qt_int4_linear.argtypes = [p, i64, i64, p, p, p, i64, i64, p, c_int]
    lib.qt_int4_linear.restype = c_int
    lib.qt_int8_linear.argtypes = [p, i64, i64, p, p, i64, p, c_int]
    lib.qt_int8_linear.restype = c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; ``None`` when unavailable (logged once)."""
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    lib: ctypes.CDLL | None = None
    why = _unavailable_reason()
    cc = _compiler()
    if why is None and cc is None:
        why = "no C compiler (set CC, or install gcc)"
    if why is None and cc is not None:
        try:
            lib = _declare(_load(cc))
            if lib.qt_abi_version() != ABI:
                why, lib = f"kernel ABI {lib.qt_abi_version()} != {ABI}", None
        except Untrusted as err:
            why, lib = f"kernel cache not trusted: {err}", None
            log.warning("native CPU kernels not used: %s; using PyTorch's kernels", why)
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:  # AttributeError: no symbol
            why, lib = f"build/load failed: {str(err).splitlines()[0][:300]}", None
    if why is not None:
        log.info("native CPU kernels unavailable (%s); using PyTorch's kernels", why)
    _STATE["lib"] = lib
    return lib


def build_id() -> str | None:
    """The loaded library's build name (``qgemv-<hash of source, flags, compiler>``), or None."""
    return _STATE.get("build") if library() is not None else None  # type: ignore[return-value]


def team_size(lib: ctypes.CDLL, threads: int) -> int:
    """OpenMP threads a kernel call asked for ``threads`` actually runs with."""
    return int(lib.qt_omp_team_size(threads))


def reset() -> None:
    """Forget the loaded library, so the next :func:`library` call builds or loads it again.

    Public for long-lived processes (notebooks, tests) that change ``QTRAIN_NATIVE_KERNELS``,
    ``CC`` or the cache directory after a first use.
    """
    _STATE.clear()


def int4_supported(in_features: int, group: int) -> bool:
    """Whether :func:`int4_linear` takes this layer (group a multiple of 32 dividing K)."""
    return group % ROW_BLOCK == 0 and in_features % group == 0


def int8_supported(in_features: int) -> bool:
    """Whether :func:`int8_linear` takes this layer (K a multiple of 32)."""
    return in_features % ROW_BLOCK == 0


def int4_linear(
    lib: ctypes.CDLL, x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group: int
) -> Tensor:
    """``(M, K) float32 -> (M, N) float32`` with packed int4 weights (canonical layout).

    Args:
        lib: from :func:`library`.
        x: contiguous float32 ``(M, K)`` on the CPU.
        packed: uint8 ``[N, K/2]``; scales: bf16 ``[N, K/group]``; zeros: uint8 ``[N, K/group]``
            or ``None`` (symmetric, zero 8). All contiguous.
        group: columns per scale group (``int4_supported``).
    """
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    zp = None if zeros is None else zeros.data_ptr()
    rc = lib.qt_int4_linear(
        x.data_ptr(), m, k, packed.data_ptr(), scales.data_ptr(), zp, n, group, y.data_ptr(), torch.get_num_threads()
    )
    if rc != 0:
        raise MemoryError("qt_int4_linear: scratch allocation failed")
    return y


def int8_linear(lib: ctypes.CDLL, x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """``(M, K) float32 -> (M, N) float32`` with int8 weights ``[N, K]`` and bf16 row scales ``[N]``."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    threads = torch.get_num_threads()
    lib.qt_int8_linear(x.data_ptr(), m, k, weight.data_ptr(), scales.data_ptr(), n, y.data_ptr(), threads)
    return y
