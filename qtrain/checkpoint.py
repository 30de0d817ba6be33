"""Versioned, verified, atomically published checkpoints.

A checkpoint is a directory ``step_NNNNNNN/`` holding ``model.safetensors``,
``trainer.safetensors`` + ``trainer.json`` and, written last, ``manifest.json`` with the
format version, versions, step, resolved config, model shape, quantization scheme per layer
(format 2; `quant` is null for a full-precision model), and the size and SHA-256 of every
file. Nothing is pickled and nothing is ever unpickled: only safetensors and JSON files
listed in the manifest are accepted, anything else in the directory is refused.

Loading reads the manifest, refuses newer formats, runs ``migrate_vN_to_vN1`` steps in
order, verifies sizes and hashes, and checks safetensors headers (lengths, dtypes, shapes,
offsets) before any tensor is allocated. Writing goes to a temporary sibling directory,
fsyncs every file and the directory, renames it into place, then replaces ``latest``
atomically; pruning happens only after that.

Example:
    >>> path = save_checkpoint(run_dir / "checkpoints", 100, payload, keep=3)
    >>> ckpt = load_checkpoint(path)          # verified, migrated
    >>> model = build_model(ckpt)             # GPT with ckpt.model_state loaded
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qtrain import __version__
from qtrain.config import ModelConfig
from qtrain.console import warn
from qtrain.errors import CheckpointError, ConfigError, ResourceError

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


# ---------------------------------------------------------------- low-level writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_new(path: Path) -> IO[bytes]:
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
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"cannot store tensor '{name}' of dtype {t.dtype} in {path.name}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with _open_new(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                f.write(flat.numpy().data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: Any) -> None:
    with _open_new(path) as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, allow_nan=True).encode("utf-8"))
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


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _write_files(tmp: Path, step: int, payload: Payload) -> dict[str, Any]:
    model_state, tied = dedupe_tied(payload.model_state)
    write_safetensors(model_state, tmp / MODEL_FILE, metadata={"format": "qtrain"})
    trainer_tensors: dict[str, torch.Tensor] = dict(payload.trainer_tensors)
    meta = flatten_state(payload.trainer_meta, "meta", trainer_tensors)
    write_safetensors(trainer_tensors, tmp / TRAINER_FILE)
    _write_json(tmp / TRAINER_META, meta)
    files = {
        name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        for name in (MODEL_FILE, TRAINER_FILE, TRAINER_META)
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
    _write_json(tmp / MANIFEST, manifest)  # last: a directory without it is incomplete
    return manifest


def _pid_of_temp(name: str) -> int | None:
    m = re.search(r"-(\d+)$", name)
    return int(m.group(1)) if m else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and deleted after."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.parent / f"{TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
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
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
        if before_publish is not None:
            before_publish(tmp)
        _replace_dir(tmp, final)
        _fsync_dir(final.parent)
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


# ---------------------------------------------------------------- saving and retention


def save_checkpoint(
    root: Path, step: int, payload: Payload, keep: int, before_publish: Callable[[Path], None] | None = None
) -> Path:
    """Write a checkpoint atomically under `root`, point `latest` at it, then prune.

    Args:
        root: the run's `checkpoints/` directory.
        step: optimizer step the state belongs to.
        payload: tensors and metadata to store.
        keep: number of valid checkpoints to retain (the newest valid one is never deleted).
        before_publish: called with the temporary directory just before the rename (tests).

    Returns:
        The published checkpoint directory.

    Raises:
        ResourceError: the disk filled up (temporary directory removed, nothing else touched).
        TypeError: trainer state that cannot be stored, naming its key (nothing else touched).
    """
    final = root / step_dir_name(step)
    need = _tensor_bytes(payload.model_state) + _tensor_bytes(payload.trainer_tensors)
    write_dir_atomically(final, lambda tmp: _write_files(tmp, step, payload), need, before_publish)
    _publish_latest(root, final.name)
    prune(root, keep)
    return final


def _publish_latest(root: Path, name: str) -> None:
    tmp = root / f"{TMP_PREFIX}{LATEST}-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        with _open_new(tmp) as f:
            f.write((name + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / LATEST)
        _fsync_dir(root)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in DISK_FULL:
            raise ResourceError(f"disk full while updating {root / LATEST}; {name} itself was published") from None
        raise


def temp_entries(root: Path) -> list[Path]:
    """Leftovers of interrupted writes under `root` (temporary directories and files)."""
    return sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []


def _remove_stale_temps(root: Path) -> None:
    """Delete temporaries of dead processes (a SIGKILLed save) and of this one."""
    for entry in temp_entries(root):
        pid = _pid_of_temp(entry.name)
        if pid is None or pid == os.getpid() or not _pid_alive(pid):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune(root: Path, keep: int) -> list[Path]:
    """Delete the oldest checkpoints beyond the `keep` newest *valid* ones; never the newest valid.

    Invalid (corrupt, incomplete) directories newer than the cutoff are kept for inspection;
    temporaries left by killed processes are removed.
    """
    _remove_stale_temps(root)
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

    Published directories are tried newest step first (`latest` may lag by one if a save was
    killed between the rename and the pointer update). Temporary directories left by an
    interrupted save are reported as skipped, never loaded.
    """
    skipped: list[tuple[Path, str]] = [
        (d, "incomplete save: temporary directory of an interrupted write") for d in temp_entries(root) if d.is_dir()
    ]
    for d in reversed(list_step_dirs(root)):
        try:
            verify_checkpoint(d)
            return d, skipped
        except CheckpointError as err:
            skipped.append((d, str(err)))
    return None, skipped


def is_checkpoint_dir(p: Path) -> bool:
    """Whether `p` is meant as one checkpoint directory (step name or checkpoint files inside)."""
    return p.is_dir() and (
        bool(STEP_RE.match(p.name)) or any((p / n).exists() for n in (MANIFEST, MODEL_FILE, TRAINER_FILE, TRAINER_META))
    )


def resolve_checkpoint(path: str | Path, key: str = "init_from") -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir or a `checkpoints/` dir.

    A run dir means its newest valid checkpoint; each invalid one skipped is warned about.

    Raises:
        ConfigError: the path does not exist or holds no checkpoint (names `key` and path).
        CheckpointError: a run dir whose checkpoints are all invalid.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}: {p} does not exist")
    if is_checkpoint_dir(p):
        return p
    for root in (p / "checkpoints", p):
        if list_step_dirs(root) or (root / LATEST).exists():
            found, skipped = find_latest_valid(root)
            if found is None:
                reasons = "; ".join(f"{d.name}: {why}" for d, why in skipped)
                raise CheckpointError(f"{key}: no valid checkpoint in {root} ({reasons})")
            for d, why in skipped:
                warn(f"{key}: skipping {d} ({why})")
            return found
    raise ConfigError(f"{key}: {p} is neither a checkpoint directory nor a run directory with checkpoints")


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


# ---------------------------------------------------------------- quantization schemes in manifests

SCHEME_KEYS = ("scheme", "bits", "group_size", "symmetric", "activations")
"""What makes two layers' quantization the same (shapes are checked by strict loading)."""


def quant_layers(quant: Any) -> dict[str, dict[str, Any]]:
    """Per-layer specs of a manifest's `quant` (`{}` for full precision)."""
    layers = quant.get("layers") if isinstance(quant, dict) else None
    return layers if isinstance(layers, dict) else {}


def _one_scheme(spec: dict[str, Any]) -> str:
    text = str(spec.get("scheme"))
    if spec.get("scheme") != "int8":
        gs = spec.get("group_size")
        text += f" group {gs}" if isinstance(gs, int) and gs > 0 else " per channel"
    text += "" if spec.get("symmetric", True) else " asymmetric"
    if spec.get("activations") not in (None, "none") and "da" not in text:
        text += f" + {spec['activations']} activations"
    text += "".join(f" + {k}" for k in ("embeddings", "lm_head") if spec.get(k))
    return text


def describe_scheme(layers: dict[str, dict[str, Any]]) -> str:
    """`full precision`, or the distinct schemes of `layers` (e.g. `int4 group 128`)."""
    kinds: list[str] = []
    for spec in layers.values():
        if (t := _one_scheme(spec)) not in kinds:
            kinds.append(t)
    return " + ".join(kinds) or "full precision"


def scheme_mismatch(stored_quant: Any, current_layers: dict[str, dict[str, Any]]) -> str | None:
    """Why a checkpoint's per-layer scheme differs from a model's (`None` when identical)."""

    def key(layers: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
        return {n: tuple(s.get(k) for k in SCHEME_KEYS) for n, s in layers.items()}

    stored = quant_layers(stored_quant)
    if key(stored) == key(current_layers):
        return None
    return f"holds {describe_scheme(stored)} weights, but this run asks for {describe_scheme(current_layers)}"


def config_scheme_mismatch(stored_quant: Any, requested: dict[str, Any]) -> str | None:
    """Why a checkpoint's quantization config differs from a requested `quant` config (`None` when equal)."""
    stored = stored_quant.get("config") if isinstance(stored_quant, dict) else None
    if not isinstance(stored, dict):
        return (
            None
            if requested.get("scheme", "none") == "none"
            else f"holds full precision weights, but this run asks for {_one_scheme(requested)}"
        )
    keys = ["scheme", "symmetric", "activations", "embeddings", "lm_head"]
    keys += ["group_size"] if stored.get("scheme") != "int8" else []
    if all(stored.get(k) == requested.get(k) for k in keys):
        return None
    return f"holds {_one_scheme(stored)} weights, but this run asks for {_one_scheme(requested)}"


# ---------------------------------------------------------------- upgrading


def check_upgrade_target(src: Path, out: Path) -> None:
    """Refuse an `out` that exists with content, or that lies inside (or is) the source.

    Raises:
        ConfigError: naming `out` and why.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out: {out} already exists and is not an empty directory; upgrade writes a new directory")
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise ConfigError(f"out: {out} is inside the source checkpoint {src}; choose a directory outside it")


def upgrade_checkpoint(src: str | Path, out: str | Path) -> Path:
    """Write a migrated copy of checkpoint `src` at FORMAT_VERSION into the new directory `out`.

    The source is only read. Tensors are re-serialized, the manifest gets fresh sizes and
    hashes plus `upgraded_from` (the source's path and versions); the copy is written to a
    temporary sibling, fsynced and renamed, so `out` is either absent or complete.

    Returns:
        `out`.

    Raises:
        ConfigError: `out` exists and is not empty, or lies inside `src`.
        CheckpointError: the source fails verification.
        ResourceError: the disk filled up.
    """
    src_p, out_p = Path(src), Path(out).expanduser()
    check_upgrade_target(src_p, out_p)
    ckpt = load_checkpoint(src_p, with_trainer=True)
    m = ckpt.manifest
    extras = {k: v for k, v in m.items() if k not in SYSTEM_KEYS and k != "upgraded_from"}
    extras["upgraded_from"] = {
        "path": str(src_p.resolve()),
        "format_version": m.get("migrated_from", FORMAT_VERSION),
        "qtrain_version": m.get("qtrain_version"),
        "torch_version": m.get("torch_version"),
    }
    payload = Payload(
        model_state=ckpt.model_state,
        trainer_tensors=ckpt.trainer_tensors,
        trainer_meta=ckpt.trainer_meta,
        manifest=extras,
    )
    need = _tensor_bytes(ckpt.model_state) + _tensor_bytes(ckpt.trainer_tensors)
    write_dir_atomically(out_p, lambda tmp: _write_files(tmp, m["step"], payload), need)
    return out_p
