"""qtrain's own CPU decode kernels (``csrc/qgemv.c``): build once, load, call.

The C source ships with the package. On first use it is compiled with the system C compiler
(``$CC``, else ``cc``/``gcc``/``clang``; ``-O3 -mavx2 -mfma -fopenmp``) into a per-user cache
(``$QTRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/qtrain``, else ``~/.cache/qtrain``) under a name
that hashes the source, flags and compiler, and loaded with :mod:`ctypes`; later processes
just load it. The build takes about a second and is atomic (temporary file + rename), so
concurrent first uses (sweeps) are safe.

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

import ctypes
import hashlib
import logging
import os
import platform
import shutil
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

_STATE: dict[str, object] = {}


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


def _build(cc: str) -> Path:
    """Compile the source into the cache (if not there yet) and return the library path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"qgemv-{key}.so"
    _STATE["build"] = out.stem
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


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
            lib = _declare(ctypes.CDLL(str(_build(cc))))
            if lib.qt_abi_version() != ABI:
                why, lib = f"kernel ABI {lib.qt_abi_version()} != {ABI}", None
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
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
    """Forget the loaded library (tests: re-evaluate the environment switch)."""
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
