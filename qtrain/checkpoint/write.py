"""Low-level writing: fsynced files, safetensors and JSON, and atomic directory publishing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from qtrain import __version__, rundir
from qtrain.checkpoint.format import (
    CORE_FILES,
    DISK_FULL,
    DTYPE_NAMES,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    SYSTEM_KEYS,
    TMP_PREFIX,
    TRAINER_FILE,
    TRAINER_META,
    Payload,
    flatten_state,
    json_file_bytes,
    seal_manifest,
)
from qtrain.errors import ResourceError

# ---------------------------------------------------------------- low-level writing


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_new(path: Path) -> IO[bytes]:
    """Create `path` for writing (never truncating an existing file). Every checkpoint byte goes through here."""
    return path.open("xb")


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as a safetensors file, one tensor at a time, then fsync.

    Written with plain Python file I/O (not the Rust writer) so that a full disk raises
    `OSError(ENOSPC)` like every other write, and without building the whole file in memory.
    Tensors are laid out largest element size first, so every offset is naturally aligned.

    Raises:
        TypeError: a dtype safetensors cannot store, naming the tensor.
        OSError: the write failed (disk full, I/O error).
    """
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {}
    offset = 0
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"cannot store tensor '{name}' of dtype {t.dtype} in {path.name}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open_new(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                f.write(flat.numpy().data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: Any) -> None:
    with open_new(path) as f:
        f.write(json_file_bytes(data))
        f.flush()
        os.fsync(f.fileno())


def check_extra_name(name: str) -> str:
    """`name` if it can be an extra checkpoint file: a plain `.json` name, not one qtrain's own files use.

    Raises:
        ValueError: any other name (a path, a hidden file, a safetensors file, a core file's name).
    """
    plain = name.endswith(".json") and "/" not in name and "\\" not in name and not name.startswith(".")
    if not plain or name in (*CORE_FILES, MANIFEST):
        raise ValueError(f"cannot store '{name}' in a checkpoint: extra files are plain .json names")
    return name


def _write_extra(path: Path, data: bytes) -> None:
    with open_new(path) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Drop tensors that share storage with an earlier key; return the kept state and pairs."""
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}
    tied: list[list[str]] = []
    for k, t in state.items():
        key: tuple[Any, ...] = (
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else (id(t), 0, ())
        )
        if key in seen:
            tied.append([k, seen[key]])
            continue
        seen[key] = k
        kept[k] = t.detach().cpu().contiguous()
    return kept, tied


def step_dir_name(step: int) -> str:
    """`step_NNNNNNN` for a step number."""
    return f"step_{step:07d}"


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_files(tmp: Path, step: int, payload: Payload) -> dict[str, Any]:
    model_state, tied = dedupe_tied(payload.model_state)
    write_safetensors(model_state, tmp / MODEL_FILE, metadata={"format": "qtrain"})
    trainer_tensors: dict[str, torch.Tensor] = dict(payload.trainer_tensors)
    meta = flatten_state(payload.trainer_meta, "meta", trainer_tensors)
    write_safetensors(trainer_tensors, tmp / TRAINER_FILE)
    _write_json(tmp / TRAINER_META, meta)
    for name, data in sorted(payload.extra_files.items()):
        _write_extra(tmp / check_extra_name(name), data)
    files = {
        name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)}
        for name in (*CORE_FILES, *sorted(payload.extra_files))
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "qtrain_version": __version__,
        "torch_version": torch.__version__,
        "step": step,
        "created_unix": time.time(),
        "tied": tied,
        "files": files,
        "quant": None,
        **{k: v for k, v in payload.manifest.items() if k not in SYSTEM_KEYS},
    }
    manifest = seal_manifest(manifest)  # the hash covers every entry, so nothing in it is trusted unchecked
    _write_json(tmp / MANIFEST, manifest)  # last: a directory without it is incomplete
    return manifest


def pid_of_temp(name: str) -> int | None:
    m = re.search(r"-(\d+)$", name)
    return int(m.group(1)) if m else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and deleted after."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.parent / f"{TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
    rundir.check_dir(old)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_dir_atomically(
    final: Path, write: Callable[[Path], Any], need_bytes: int, before_publish: Callable[[Path], None] | None = None
) -> Path:
    """Fill a temporary sibling of `final` with `write(tmp)`, fsync it, then rename it to `final`.

    On any failure the temporary directory is removed and `final` is untouched.

    Raises:
        ResourceError: the disk (or quota) filled up; the message gives needed vs free bytes.
    """
    rundir.make_dirs(final.parent, own=False)  # a file on the way: exit 2 naming it
    rundir.check_dir(final)  # a planted link where the directory goes: refused, never replaced through
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    rundir.check_dir(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        fsync_dir(tmp)
        if before_publish is not None:
            before_publish(tmp)
        _replace_dir(tmp, final)
        fsync_dir(final.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            free = shutil.disk_usage(final.parent).free
            raise ResourceError(
                f"disk full while writing {final.name} in {final.parent}: needs about {need_bytes} bytes, "
                f"{free} bytes free; the temporary directory was removed and earlier checkpoints are intact"
            ) from None
        raise
    return final
