"""Checkpoint format: file names, limits, safetensors dtypes, and the payload types."""

from __future__ import annotations

import errno
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 4
"""1: full precision; 2: + quantization metadata; 3: + `manifest_sha256` sealing the manifest;
4: + the model's attention and rotary fields (grouped-query heads, head size, q/k/v biases,
q/k norms, rope scaling) and the `tokenizer` section."""
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
TRAINER_META = "trainer.json"
CORE_FILES = (MODEL_FILE, TRAINER_FILE, TRAINER_META)
"""The files every checkpoint qtrain writes holds (besides the manifest); others are `extra_files`."""
LATEST = "latest"
MANIFEST_HASH = "manifest_sha256"
"""Manifest entry holding the SHA-256 of the canonical manifest without this entry (format 3)."""
STEP_RE = re.compile(r"^step_([0-9]{7,})$")
"""A published step directory: `step_` and at least 7 ASCII digits."""
STEP_LIKE_RE = re.compile(r"^step_\d+$")
"""Names that look like step directories to `int()` (any Unicode digits): they must match STEP_RE."""
TMP_PREFIX = ".tmp-"
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest safetensors header accepted (real ones are a few hundred KB at most)."""
MAX_JSON_BYTES = 64 * 1024 * 1024
"""Largest manifest / trainer.json accepted."""
SAFE_SUFFIXES = (".safetensors", ".json")
OS_STRAYS = (".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini")
"""Files operating systems drop into folders (compared lower-case); ignored with a warning, never opened."""
MAX_JSON_DEPTH = 64
"""Deepest nesting accepted in a manifest or trainer.json (qtrain writes at most 8 levels)."""
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SYSTEM_KEYS = (
    "format_version",
    "qtrain_version",
    "torch_version",
    "step",
    "created_unix",
    "tied",
    "files",
    "migrated_from",
    MANIFEST_HASH,
)
"""Manifest entries written by this module itself (everything else comes from `Payload.manifest`)."""
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
"""safetensors dtype names we read and write."""
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


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
    extra_files: dict[str, bytes] = field(default_factory=dict)
    """Other files stored next to the model (`tokenizer.json`): listed with size and SHA-256 in the
    manifest's `files` and verified on load like the others (plain `.json` names only)."""


@dataclass
class Checkpoint:
    """A verified, migrated checkpoint read from disk."""

    path: Path
    manifest: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    trainer_tensors: dict[str, torch.Tensor]
    trainer_meta: dict[str, Any]
    extra_files: dict[str, bytes] = field(default_factory=dict)
    """The verified bytes of the files besides model, trainer state and manifest (`tokenizer.json`)."""


# ---------------------------------------------------------------- JSON files and the manifest seal


def json_file_bytes(data: Any) -> bytes:
    """The exact bytes of a checkpoint JSON file (indented, sorted keys): written and re-checked."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=True).encode("utf-8")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical manifest (sorted keys, no whitespace) without `manifest_sha256`."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_HASH}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A copy of `manifest` with its `manifest_sha256` (recomputed)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_HASH}
    return {**body, MANIFEST_HASH: manifest_digest(body)}


def is_os_stray(name: str) -> bool:
    """Whether `name` is an operating system's stray file (`.DS_Store`, `Thumbs.db`, `._x`, `desktop.ini`)."""
    return name.lower() in OS_STRAYS or name.startswith("._")


def json_depth_error(obj: Any, limit: int = MAX_JSON_DEPTH) -> str | None:
    """The dotted path where `obj` nests deeper than `limit`, or None (iterative: no recursion)."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > limit:
            return where or "(top level)"
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in items)
    return None


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
    """Inverse of `flatten_state`.

    Raises:
        KeyError: a reference to a tensor that `tensors` lacks.
    """
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj
