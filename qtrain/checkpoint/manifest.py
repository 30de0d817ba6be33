"""Reading a manifest: size cap, JSON, version, seal, migration, then every value checked.

The manifest is the root of trust: it names every file with its size and SHA-256 and says
what model the tensors are. Format 3 seals it with `manifest_sha256`, the SHA-256 of the
canonical manifest (sorted keys, no whitespace) without that entry, and the file must be
byte for byte what qtrain writes for that content, so a change of any bit is refused before
any entry is used. The seal detects damage and accidental edits; it does not stop a
deliberate forger, who can rewrite the files, the hashes and the seal together.

Formats 1 and 2 carry no seal: `migrate` computes one when they are read, and
`mode=upgrade` writes a sealed copy of the current format. Format 4 adds the model's
attention and rotary fields and the `tokenizer` section; `migrate_v3_to_v4` fills them with
what a format 3 model was (full multi-head attention, byte tokens) and seals the result again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtrain import __version__
from qtrain.checkpoint.format import (
    _SHA_RE,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_HASH,
    MAX_JSON_BYTES,
    MODEL_FILE,
    SAFE_SUFFIXES,
    STEP_LIKE_RE,
    STEP_RE,
    json_depth_error,
    json_file_bytes,
    manifest_digest,
    seal_manifest,
)
from qtrain.checkpoint.schema import validate_values
from qtrain.errors import CheckpointError

SEALED_SINCE = 3
"""First format version whose manifest carries `manifest_sha256`."""


def json_from_bytes(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{what} is not UTF-8 ({err.reason} at byte {err.start})") from None
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{what} is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None


def _read_bytes(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is too large for a checkpoint JSON file (limit {MAX_JSON_BYTES})")
    return path.read_bytes()


def read_json(path: Path) -> Any:
    data = json_from_bytes(_read_bytes(path), str(path))
    if (where := json_depth_error(data)) is not None:
        raise CheckpointError(f"{path}: nested deeper than the checkpoint limit at '{where[:200]}'")
    return data


def read_manifest(path: Path) -> dict[str, Any]:
    """Read, version-check, unseal, migrate and validate a checkpoint's manifest.

    Raises:
        CheckpointError: missing, unreadable, damaged or edited (seal mismatch), a format
            newer than supported, or any value of the wrong type, out of range or
            inconsistent (the message names the field).
    """
    mpath = path / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise CheckpointError(
            f"{path}: incomplete checkpoint, {MANIFEST} is missing (present: {', '.join(present) or 'nothing'})"
        )
    return parse_manifest(mpath, _read_bytes(mpath))


def parse_manifest(mpath: Path, raw: bytes) -> dict[str, Any]:
    """`read_manifest` on the bytes of `mpath`: JSON, version, seal, migration, values.

    Raises:
        CheckpointError: as `read_manifest`.
    """
    path = mpath.parent
    manifest = json_from_bytes(raw, str(mpath))
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath}: not a JSON object")
    if (where := json_depth_error(manifest)) is not None:
        raise CheckpointError(f"{mpath}: nested deeper than the checkpoint limit at '{where[:200]}'")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{mpath}: unknown format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version} is newer than this qtrain supports "
            f"(format_version {FORMAT_VERSION}, qtrain {__version__}); upgrade qtrain"
        )
    check_seal(mpath, raw, manifest)
    if "migrated_from" in manifest:
        raise CheckpointError(f"{mpath}: 'migrated_from' is set when a checkpoint is read, never stored")
    migrated = migrate(manifest)
    check_structure(mpath, migrated)
    validate_values(mpath, migrated)
    return migrated


def check_seal(mpath: Path, raw: bytes, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose seal is absent (format 3 on), malformed or not its content's.

    A manifest that carries a seal is checked whatever version it claims, so changing the
    version cannot bypass it. The file must also be exactly the bytes qtrain writes for the
    parsed content: that catches the changes JSON parsing forgets (whitespace, `e`/`E` in
    a number, the case of a `\\u` escape, a duplicated key).

    Raises:
        CheckpointError: naming the manifest, both hashes, and what that means.
    """
    stored = manifest.get(MANIFEST_HASH)
    if stored is None and manifest["format_version"] < SEALED_SINCE:
        return
    if not (isinstance(stored, str) and _SHA_RE.match(stored)):
        raise CheckpointError(
            f"{mpath}: '{MANIFEST_HASH}' is missing or malformed (got {str(stored)[:80]!r}); a format "
            f"{manifest['format_version']} manifest is sealed by it, so this one was damaged or edited"
        )
    digest = manifest_digest(manifest)
    if digest != stored:
        raise CheckpointError(
            f"{mpath}: manifest hash mismatch ({MANIFEST_HASH} {stored[:16]}…, content {digest[:16]}…): "
            f"the manifest was damaged or edited after it was written; refusing the checkpoint"
        )
    if raw != json_file_bytes(manifest):
        raise CheckpointError(
            f"{mpath}: manifest hash mismatch: the file is not byte for byte what qtrain wrote for its sealed "
            f"content (damaged or edited: whitespace, number or escape spelling, duplicated keys); refusing it"
        )


def check_structure(mpath: Path, m: dict[str, Any]) -> None:
    """The entries every other check relies on: file list, step, tied pairs.

    Raises:
        CheckpointError: naming the field.
    """
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


def check_step_name(path: Path, manifest: dict[str, Any]) -> None:
    """A directory named like a step directory must be `step_` + ASCII digits and hold that step.

    Other names (a copy in `upgraded/`, a fixture) are not step directories and are not checked.

    Raises:
        CheckpointError: the name is not ASCII digits, or claims another step than the manifest.
    """
    if not STEP_LIKE_RE.match(path.name):
        return
    m = STEP_RE.match(path.name)
    if m is None:
        raise CheckpointError(f"{path}: step directory names use ASCII digits only (step_0001234); refusing it")
    if int(m.group(1)) != manifest["step"]:
        raise CheckpointError(
            f"{path}: the directory name says step {int(m.group(1))} but its manifest holds step "
            f"{manifest['step']}; refusing it"
        )


def migrate_v1_to_v2(manifest: dict[str, Any]) -> dict[str, Any]:
    """v1 (full precision, before quantization existed) -> v2: add empty quantization metadata."""
    out = dict(manifest)
    out["quant"] = None
    out["format_version"] = 2
    return out


def migrate_v2_to_v3(manifest: dict[str, Any]) -> dict[str, Any]:
    """v2 -> v3: seal the manifest (`manifest_sha256` of its canonical content).

    The seal computed here protects nothing on disk (the v2 file had none); `mode=upgrade`
    writes a v3 copy whose manifest carries it.
    """
    out = {k: v for k, v in manifest.items() if k != MANIFEST_HASH}
    out["format_version"] = 3
    return seal_manifest(out)


V4_MODEL_FIELDS: dict[str, Any] = {
    "n_kv_head": None,
    "head_dim": None,
    "attn_bias": False,
    "qk_norm": False,
    "rope_scaling": "none",
    "rope_factor": 8.0,
    "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0,
    "rope_original_context": 8192,
}
"""The `model` fields format 4 added, with what every format 3 model was: one key/value head per
query head and `n_embd // n_head` wide heads (None: derived, as a new run with the defaults
writes them), no biases, no q/k norms, unscaled rotary."""
BYTE_TOKENIZER: dict[str, Any] = {"kind": "bytes", "vocab_size": 256, "file": None, "sha256": None}
"""The `tokenizer` section of a model trained before format 4 (byte tokens, no file)."""


def migrate_v3_to_v4(manifest: dict[str, Any]) -> dict[str, Any]:
    """v3 -> v4: the new `model` fields (see `V4_MODEL_FIELDS`) and the byte `tokenizer` section.

    The manifest is sealed again over its new content, as `migrate_v2_to_v3` does; `mode=upgrade`
    writes a v4 copy whose manifest carries that seal.
    """
    out = {k: v for k, v in manifest.items() if k != MANIFEST_HASH}
    if isinstance(out.get("model"), dict):
        out["model"] = {**V4_MODEL_FIELDS, **out["model"]}
    if "tokenizer" not in out:
        out["tokenizer"] = dict(BYTE_TOKENIZER)
    out["format_version"] = 4
    return seal_manifest(out)


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: migrate_v1_to_v2,
    2: migrate_v2_to_v3,
    3: migrate_v3_to_v4,
}


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
