"""Verifying, migrating and loading checkpoints (nothing is read before it is checked)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qtrain import __version__
from qtrain.checkpoint.format import (
    _SHA_RE,
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    MAX_HEADER_BYTES,
    MAX_JSON_BYTES,
    MODEL_FILE,
    SAFE_SUFFIXES,
    TRAINER_FILE,
    TRAINER_META,
    Checkpoint,
    unflatten_state,
)
from qtrain.checkpoint.write import _sha256
from qtrain.config import ModelConfig
from qtrain.errors import CheckpointError

# ---------------------------------------------------------------- verifying and loading


def _json_from_bytes(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{what} is not UTF-8 ({err.reason} at byte {err.start})") from None
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{what} is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None


def _read_json(path: Path) -> Any:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is too large for a checkpoint JSON file (limit {MAX_JSON_BYTES})")
    return _json_from_bytes(path.read_bytes(), str(path))


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Validate a safetensors header without trusting it; return it.

    Checks the length field against the file size (and a hard cap) before reading, then
    that the header is UTF-8 JSON whose tensors have known dtypes, non-negative shapes and
    data offsets that tile the data section exactly, with byte lengths matching their shapes.

    Raises:
        CheckpointError: anything hostile or inconsistent, naming the file.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(
                f"{path}: safetensors header length {n} is impossible for a {size}-byte file (limit {MAX_HEADER_BYTES})"
            )
        raw = f.read(n)
    header = _json_from_bytes(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name != "__metadata__":
            spans.append((*_tensor_span(path, name, info, data_len), name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CheckpointError(
                f"{path}: tensor '{name}' starts at byte {begin}, expected {end} (overlapping or gapped data offsets)"
            )
        end = stop
    if end != data_len:
        raise CheckpointError(f"{path}: tensors cover {end} bytes but the data section has {data_len}")
    return header


def _tensor_span(path: Path, name: str, info: Any, data_len: int) -> tuple[int, int]:
    if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
        dtype = info.get("dtype") if isinstance(info, dict) else None
        raise CheckpointError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
    shape, offs = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: tensor '{name}' has an invalid shape {shape!r}")
    if not (
        isinstance(offs, list)
        and len(offs) == 2
        and all(type(o) is int for o in offs)
        and 0 <= offs[0] <= offs[1] <= data_len
    ):
        raise CheckpointError(f"{path}: tensor '{name}' has data offsets {offs} outside the {data_len}-byte data")
    nbytes = math.prod(shape) * DTYPES[info["dtype"]].itemsize  # Python ints: no overflow
    if nbytes != offs[1] - offs[0]:
        raise CheckpointError(
            f"{path}: tensor '{name}' of shape {shape} needs {nbytes} bytes, its offsets span {offs[1] - offs[0]}"
        )
    return offs[0], offs[1]


def read_manifest(path: Path) -> dict[str, Any]:
    """Read, version-check, migrate and sanity-check a checkpoint's manifest.

    Raises:
        CheckpointError: missing, unreadable or malformed manifest, or a format newer than supported.
    """
    mpath = path / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise CheckpointError(
            f"{path}: incomplete checkpoint, {MANIFEST} is missing (present: {', '.join(present) or 'nothing'})"
        )
    manifest = _read_json(mpath)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{mpath}: unknown format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version} is newer than this qtrain supports "
            f"(format_version {FORMAT_VERSION}, qtrain {__version__}); upgrade qtrain"
        )
    migrated = migrate(manifest)
    _check_manifest(mpath, migrated)
    return migrated


def _check_manifest(mpath: Path, m: dict[str, Any]) -> None:
    files = m.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CheckpointError(f"{mpath}: no file list naming {MODEL_FILE}")
    for name, info in files.items():
        if not (
            name.endswith(SAFE_SUFFIXES)
            and name != MANIFEST
            and "/" not in name
            and "\\" not in name
            and not name.startswith(".")
        ):
            raise CheckpointError(f"{mpath}: lists '{name}', which is not a plain safetensors or JSON file name")
        if not (
            isinstance(info, dict)
            and type(info.get("bytes")) is int
            and info["bytes"] >= 0
            and isinstance(info.get("sha256"), str)
            and _SHA_RE.match(info["sha256"])
        ):
            raise CheckpointError(f"{mpath}: entry for '{name}' needs integer 'bytes' and a hex 'sha256'")
    if type(m.get("step")) is not int or m["step"] < 0:
        raise CheckpointError(f"{mpath}: 'step' must be a non-negative integer (got {m.get('step')!r})")
    tied = m.get("tied", [])
    if not (
        isinstance(tied, list)
        and all(isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in tied)
    ):
        raise CheckpointError(f"{mpath}: 'tied' must be a list of [alias, source] name pairs")
    model = m.get("model")
    if model is not None:
        known = {f.name for f in fields(ModelConfig)}
        if not isinstance(model, dict) or not set(model) <= known:
            extra = sorted(set(model) - known) if isinstance(model, dict) else model
            raise CheckpointError(f"{mpath}: 'model' has unknown entries {extra}; valid: {sorted(known)}")


def migrate_v1_to_v2(manifest: dict[str, Any]) -> dict[str, Any]:
    """v1 (full precision, before quantization existed) -> v2: add empty quantization metadata."""
    out = dict(manifest)
    out["quant"] = None
    out["format_version"] = 2
    return out


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: migrate_v1_to_v2}


def migrate(manifest: dict[str, Any]) -> dict[str, Any]:
    """Run `migrate_vN_to_vN1` steps in order up to FORMAT_VERSION (returns a new dict).

    A migrated manifest records the version it was read as in `migrated_from`.

    Raises:
        CheckpointError: a version with no migration step.
    """
    m = dict(manifest)
    source = m["format_version"]
    while m["format_version"] < FORMAT_VERSION:
        step = MIGRATIONS.get(m["format_version"])
        if step is None:
            raise CheckpointError(f"no migration from checkpoint format_version {m['format_version']}")
        m = step(m)
    if source != FORMAT_VERSION:
        m["migrated_from"] = source
    return m


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check manifest, file list, sizes, SHA-256 and headers; refuse unsafe content.

    Only the files the manifest lists (plus the manifest) may be present; anything else,
    such as a pickled `.pt` file, is refused without being opened.

    Returns:
        The migrated manifest.

    Raises:
        CheckpointError: anything missing, truncated, altered, unsafe or too new, naming the file.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    manifest = read_manifest(path)
    files: dict[str, Any] = manifest["files"]
    for entry in sorted(path.iterdir()):
        if entry.name == MANIFEST:
            continue
        if entry.name not in files:
            kind = (
                "file not listed in the manifest"
                if entry.name.endswith(SAFE_SUFFIXES)
                else "unsafe or unknown file (only safetensors and JSON are allowed; nothing is unpickled)"
            )
            raise CheckpointError(f"{entry}: {kind}; refusing the checkpoint")
        if entry.is_symlink() or not entry.is_file():
            raise CheckpointError(f"{entry}: not a regular file; refusing the checkpoint")
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
            check_safetensors_header(f)
        else:
            _read_json(f)  # JSON, never anything executable
    return manifest


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def load_checkpoint(path: str | Path, with_trainer: bool = True) -> Checkpoint:
    """Verify and read a checkpoint directory (tensors on CPU, whatever device wrote them).

    Raises:
        CheckpointError: see `verify_checkpoint`; also references to tensors that are absent.
    """
    p = Path(path)
    manifest = verify_checkpoint(p)
    model_state = _load_tensors(p / MODEL_FILE)
    for alias, source in manifest.get("tied", []):
        if source not in model_state:
            raise CheckpointError(f"{p / MANIFEST}: tied weight '{alias}' refers to missing '{source}'")
        model_state[alias] = model_state[source]
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    if with_trainer and TRAINER_FILE in manifest["files"]:
        tensors = _load_tensors(p / TRAINER_FILE)
        if TRAINER_META in manifest["files"]:
            try:
                meta = unflatten_state(_read_json(p / TRAINER_META), tensors)
            except KeyError as err:
                raise CheckpointError(
                    f"{p / TRAINER_META}: refers to tensor {err} absent from {TRAINER_FILE}"
                ) from None
    return Checkpoint(path=p, manifest=manifest, model_state=model_state, trainer_tensors=tensors, trainer_meta=meta)
