"""Verifying, migrating and loading checkpoints (nothing is read before it is checked)."""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qtrain.checkpoint import consistency as cons
from qtrain.checkpoint.format import (
    CORE_FILES,
    DTYPES,
    MANIFEST,
    MAX_HEADER_BYTES,
    MODEL_FILE,
    SAFE_SUFFIXES,
    TRAINER_FILE,
    TRAINER_META,
    Checkpoint,
    is_os_stray,
    unflatten_state,
)
from qtrain.checkpoint.manifest import check_step_name, json_from_bytes, read_json, read_manifest
from qtrain.checkpoint.trainer_state import validate_trainer_state
from qtrain.checkpoint.write import sha256_of
from qtrain.console import warn
from qtrain.errors import CheckpointError
from qtrain.model import GPT

# ---------------------------------------------------------------- verifying and loading


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
    header = json_from_bytes(raw, f"{path}: safetensors header")
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


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Everything `load_checkpoint` checks, without reading the tensors (the one validation path).

    In order: the manifest (seal, version, every value), the directory name against its step,
    the file list (only listed files; operating-system strays are warned about and ignored,
    anything else unlisted is refused unopened), sizes and SHA-256, safetensors headers and
    JSON files, then the tensors against the model the manifest describes (built on the meta
    device: nothing allocated), quantization parameters, and the trainer state.

    Returns:
        The migrated manifest.

    Raises:
        CheckpointError: the first problem, naming the file and the field.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    manifest = read_manifest(path)
    check_step_name(path, manifest)
    files: dict[str, Any] = manifest["files"]
    _check_listing(path, files)
    parsed: dict[str, Any] = {}
    for name, info in files.items():
        f = path / name
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{f}: size {size} bytes, manifest says {info['bytes']} (truncated or altered)")
        digest = sha256_of(f)
        if digest != info["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 mismatch (manifest {info['sha256'][:16]}…, file {digest[:16]}…)")
        parsed[name] = check_safetensors_header(f) if name.endswith(".safetensors") else read_json(f)
    if isinstance(manifest.get("model"), dict):
        _check_against_model(path, manifest, parsed)
    elif TRAINER_META in parsed:  # no model to check shapes against (not a qtrain run's checkpoint)
        tinfo = _infos(parsed.get(TRAINER_FILE))
        validate_trainer_state(path / TRAINER_META, parsed[TRAINER_META], tinfo, manifest["step"], None)
    return manifest


_WARNED: set[Path] = set()


def _check_listing(path: Path, files: dict[str, Any]) -> None:
    for entry in sorted(path.iterdir()):
        if entry.name == MANIFEST:
            continue
        if entry.name not in files:
            if is_os_stray(entry.name) and not entry.is_symlink() and entry.is_file():
                if entry not in _WARNED:
                    _WARNED.add(entry)
                    warn(f"{entry}: operating-system file not listed in the manifest; ignored (never opened)")
                continue
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


def _infos(header: dict[str, Any] | None) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: (tuple(i["shape"]), i["dtype"]) for n, i in (header or {}).items() if n != "__metadata__"}


def _check_against_model(path: Path, manifest: dict[str, Any], parsed: dict[str, Any]) -> None:
    """Header shapes vs block count, then vs the meta-device model; qparams; trainer state."""
    stored = cons.stored_shapes(path, manifest, parsed[MODEL_FILE])
    cons.check_sizes(path, manifest["model"], stored, manifest["files"][MODEL_FILE]["bytes"])
    with torch.device("meta"):
        model = cons.build_skeleton(manifest)
    cons.check_layer_specs(path, manifest, model)
    cons.compare_state(path, cons.meta_shapes(model), stored)
    cons.check_qparams(path, model, manifest)
    if TRAINER_META in parsed:
        groups = cons.param_group_shapes(model)
        meta = parsed[TRAINER_META]
        validate_trainer_state(path / TRAINER_META, meta, _infos(parsed.get(TRAINER_FILE)), manifest["step"], groups)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def load_checkpoint(path: str | Path, with_trainer: bool = True) -> Checkpoint:
    """Verify (`verify_checkpoint`) and read a checkpoint directory (tensors on CPU, whatever device wrote them).

    Raises:
        CheckpointError: see `verify_checkpoint`.
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
                meta = unflatten_state(read_json(p / TRAINER_META), tensors)
            except KeyError as err:
                raise CheckpointError(
                    f"{p / TRAINER_META}: refers to tensor {err} absent from {TRAINER_FILE}"
                ) from None
    extra = read_extra_files(p, manifest)
    return Checkpoint(p, manifest, model_state, tensors, meta, extra_files=extra)


def read_extra_files(path: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """The listed files besides the core ones (`tokenizer.json`), each checked again against its size and SHA-256.

    Raises:
        CheckpointError: a file changed since it was verified.
    """
    out: dict[str, bytes] = {}
    for name, info in manifest["files"].items():
        if name in CORE_FILES:
            continue
        data = (path / name).read_bytes()
        if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise CheckpointError(f"{path / name}: changed after it was verified (size or SHA-256 differs)")
        out[name] = data
    return out


def build_model(ckpt: Checkpoint, device: torch.device, kernel: str = "auto") -> GPT:
    """The model a loaded checkpoint describes, with its weights (strict), on `device`.

    Built like the meta-device model `verify_checkpoint` compared the tensors with, so
    this allocates only what the tensors, already read, justify.

    Raises:
        CheckpointError: no model in the manifest, or the state does not load strictly.
    """
    if not isinstance(ckpt.manifest.get("model"), dict):
        raise CheckpointError(f"{ckpt.path / MANIFEST}: no model shape ('model'), so no model can be built")
    model = cons.build_skeleton(ckpt.manifest, kernel)
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt.path}: tensors do not match the manifest's model: {err}") from None
    return model.to(device)
