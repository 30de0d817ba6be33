"""Checkpoint format: file names, limits, safetensors dtypes, and the payload types."""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
TRAINER_META = "trainer.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d{7,})$")
TMP_PREFIX = ".tmp-"
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest safetensors header accepted (real ones are a few hundred KB at most)."""
MAX_JSON_BYTES = 64 * 1024 * 1024
"""Largest manifest / trainer.json accepted."""
SAFE_SUFFIXES = (".safetensors", ".json")
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
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
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
