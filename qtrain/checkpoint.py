"""Versioned, verified, atomically published checkpoints.

A checkpoint is a directory ``step_NNNNNNN/`` holding ``model.safetensors``,
``trainer.safetensors`` + ``trainer.json`` and, written last, ``manifest.json`` with the
format version, versions, step, resolved config, model shape, quantization scheme per layer
(format 2; `quant` is null for a full-precision model), and the size and SHA-256 of every
file. Nothing is pickled. Loading reads the manifest, refuses newer formats, runs
``migrate_vN_to_vN1`` steps in order, verifies sizes and hashes, and checks safetensors
headers before any tensor is allocated.

Example:
    >>> path = save_checkpoint(run_dir / "checkpoints", 100, payload, keep=3)
    >>> ckpt = load_checkpoint(path)          # verified, migrated
    >>> model = build_model(ckpt)             # GPT with ckpt.model_state loaded
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from qtrain import __version__
from qtrain.errors import CheckpointError, ConfigError, ResourceError

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
TRAINER_META = "trainer.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d{7,})$")
TMP_PREFIX = ".tmp-"
MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFE_SUFFIXES = (".safetensors", ".json")


@dataclass
class Payload:
    """What one checkpoint holds, as plain tensors and JSON-able data."""

    model_state: dict[str, torch.Tensor]
    """Model state dict (tied duplicates are stored once, see `tied`)."""
    trainer_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Optimizer moments, RNG states, QAT tensors."""
    trainer_meta: dict[str, Any] = field(default_factory=dict)
    """Step, schedule, data position and other scalars."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """Extra manifest entries: config, model shape."""


@dataclass
class Checkpoint:
    """A verified, migrated checkpoint read from disk."""

    path: Path
    manifest: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    trainer_tensors: dict[str, torch.Tensor]
    trainer_meta: dict[str, Any]


# ---------------------------------------------------------------- nested state <-> tensors


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors inside a nested dict/list by references, collecting them in `tensors`.

    Raises:
        TypeError: a value that is neither a tensor nor JSON data, naming its key.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot serialize trainer state key '{prefix}': unsupported type {type(obj).__name__}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with path.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())


def dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Drop tensors that share storage with an earlier key; return the kept state and pairs."""
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied: list[list[str]] = []
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else (id(t), 0, ())
        if key in seen:
            tied.append([k, seen[key]])
            continue
        seen[key] = k
        kept[k] = t.detach().cpu().contiguous()
    return kept, tied


def step_dir_name(step: int) -> str:
    """`step_NNNNNNN` for a step number."""
    return f"step_{step:07d}"


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _write_files(tmp: Path, step: int, payload: Payload) -> dict[str, Any]:
    model_state, tied = dedupe_tied(payload.model_state)
    save_file(model_state, str(tmp / MODEL_FILE), metadata={"format": "qtrain"})
    trainer_tensors: dict[str, torch.Tensor] = dict(payload.trainer_tensors)
    meta = flatten_state(payload.trainer_meta, "meta", trainer_tensors)
    save_file({k: v.contiguous() for k, v in trainer_tensors.items()}, str(tmp / TRAINER_FILE))
    _write_json(tmp / TRAINER_META, meta)
    files = {}
    for name in (MODEL_FILE, TRAINER_FILE, TRAINER_META):
        _fsync_file(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "qtrain_version": __version__,
        "torch_version": torch.__version__,
        "step": step,
        "created_unix": time.time(),
        "tied": tied,
        "files": files,
        "quant": None,
        **payload.manifest,
    }
    _write_json(tmp / MANIFEST, manifest)
    return manifest


def save_checkpoint(root: Path, step: int, payload: Payload, keep: int,
                    before_publish: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint atomically under `root`, point `latest` at it, then prune.

    Args:
        root: the run's `checkpoints/` directory.
        step: optimizer step the state belongs to.
        payload: tensors and metadata to store.
        keep: number of valid checkpoints to retain (the newest is never deleted).
        before_publish: called with the temporary directory just before the rename (tests).

    Returns:
        The published checkpoint directory.

    Raises:
        ResourceError: the disk filled up (temporary directory removed, nothing else touched).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, step, payload)
        _fsync_dir(tmp)
        if before_publish is not None:
            before_publish(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            need = _tensor_bytes(payload.model_state) + _tensor_bytes(payload.trainer_tensors)
            free = shutil.disk_usage(root).free
            raise ResourceError(
                f"disk full while writing checkpoint {final.name} in {root}: needs about {need} bytes, "
                f"{free} bytes free; the previous checkpoint is intact"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_latest(root, final.name)
    prune(root, keep)
    return final


def _publish_latest(root: Path, name: str) -> None:
    tmp = root / f"{TMP_PREFIX}{LATEST}-{os.getpid()}"
    tmp.write_text(name + "\n")
    _fsync_file(tmp)
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def prune(root: Path, keep: int) -> list[Path]:
    """Delete the oldest checkpoints beyond the `keep` newest *valid* ones; never the newest valid."""
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


# ---------------------------------------------------------------- finding


def step_of(path: Path) -> int:
    """Step number from a `step_NNNNNNN` directory name."""
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def list_step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest first (published names only)."""
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and STEP_RE.match(d.name)), key=step_of)


def find_latest_valid(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, plus every directory skipped and why.

    `latest` is tried first; if it is missing or invalid, published directories are tried
    newest first. Temporary directories left by an interrupted save are reported as skipped.
    """
    skipped: list[tuple[Path, str]] = []
    if root.is_dir():
        skipped += [(d, "incomplete save (temporary directory)") for d in sorted(root.glob(f"{TMP_PREFIX}step_*"))]
    candidates = list(reversed(list_step_dirs(root)))
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for d in candidates:
        try:
            verify_checkpoint(d)
            return d, skipped
        except CheckpointError as err:
            skipped.append((d, str(err)))
    return None, skipped


def resolve_checkpoint(path: str | Path, key: str = "init_from") -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir or a `checkpoints/` dir.

    Raises:
        ConfigError: the path does not exist or holds no checkpoint (names `key` and path).
        CheckpointError: a run dir whose checkpoints are all invalid.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}: {p} does not exist")
    if (p / MANIFEST).exists() or STEP_RE.match(p.name):
        return p
    for root in (p / "checkpoints", p):
        if list_step_dirs(root) or (root / LATEST).exists():
            found, skipped = find_latest_valid(root)
            if found is None:
                reasons = "; ".join(f"{d.name}: {why}" for d, why in skipped)
                raise CheckpointError(f"{key}: no valid checkpoint in {root} ({reasons})")
            return found
    raise ConfigError(f"{key}: {p} is neither a checkpoint directory nor a run directory with checkpoints")


# ---------------------------------------------------------------- verifying and loading


def _check_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(f"{path}: safetensors header length {n} is impossible for a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: safetensors header is not UTF-8 JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_len):
            raise CheckpointError(f"{path}: tensor '{name}' has data offsets {offs} outside the {data_len}-byte data")


def read_manifest(path: Path) -> dict[str, Any]:
    """Read, version-check and migrate a checkpoint's manifest.

    Raises:
        CheckpointError: missing or unreadable manifest, or a format newer than supported.
    """
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint, {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{mpath}: unreadable manifest ({err})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{mpath}: unknown format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version} is newer than this qtrain supports "
            f"(format_version {FORMAT_VERSION}, qtrain {__version__}); upgrade qtrain"
        )
    return migrate(manifest)


def migrate_v1_to_v2(manifest: dict[str, Any]) -> dict[str, Any]:
    """v1 (full precision, before quantization existed) -> v2: add empty quantization metadata."""
    out = dict(manifest)
    out["quant"] = None
    out["format_version"] = 2
    return out


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: migrate_v1_to_v2}


def migrate(manifest: dict[str, Any]) -> dict[str, Any]:
    """Run `migrate_vN_to_vN1` steps in order up to FORMAT_VERSION (returns a new dict)."""
    m = dict(manifest)
    while m["format_version"] < FORMAT_VERSION:
        m = MIGRATIONS[m["format_version"]](m)
    return m


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check manifest, file list, sizes, SHA-256 and headers; refuse unsafe content.

    Returns:
        The migrated manifest.

    Raises:
        CheckpointError: anything missing, truncated, altered, unsafe or too new.
    """
    manifest = read_manifest(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CheckpointError(f"{path / MANIFEST}: no file list naming {MODEL_FILE}")
    for extra in sorted(p.name for p in path.iterdir()):
        if not extra.endswith(SAFE_SUFFIXES) and extra != MANIFEST:
            raise CheckpointError(f"{path / extra}: unsafe or unknown file in checkpoint (only safetensors and JSON)")
    missing = [n for n in files if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    for name, info in files.items():
        f = path / name
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{f}: size {size} bytes, manifest says {info['bytes']} (truncated or altered)")
        digest = _sha256(f)
        if digest != info["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 mismatch (manifest {info['sha256'][:16]}…, file {digest[:16]}…)")
        if name.endswith(".safetensors"):
            _check_safetensors_header(f)
    return manifest


def load_checkpoint(path: str | Path, with_trainer: bool = True) -> Checkpoint:
    """Verify and read a checkpoint directory (tensors on CPU)."""
    p = Path(path)
    manifest = verify_checkpoint(p)
    model_state = load_file(str(p / MODEL_FILE))
    for alias, source in manifest.get("tied", []):
        model_state[alias] = model_state[source]
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    if with_trainer and TRAINER_FILE in manifest["files"]:
        tensors = load_file(str(p / TRAINER_FILE))
        meta = unflatten_state(json.loads((p / TRAINER_META).read_text()), tensors)
    return Checkpoint(path=p, manifest=manifest, model_state=model_state, trainer_tensors=tensors, trainer_meta=meta)
