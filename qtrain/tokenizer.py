"""Tokenizers: bytes (the default), a byte-level BPE trained on the training split, or a model's own.

One :class:`Tokenizer` class covers the three kinds (``data.tokenizer``):

- ``bytes``: ids are the UTF-8 bytes (256 ids); nothing to store, today's behaviour.
- ``bpe``: a byte-level BPE trained with the `tokenizers` library on the training split only,
  ``data.vocab_size`` ids. Training is deterministic: the trainer runs single-threaded, and its
  merges depend only on the text and the vocabulary size (ties are broken by the pair itself),
  so the same corpus, vocabulary size and seed give a byte-identical ``tokenizer.json``.
- ``hf``: the ``tokenizer.json`` of a model directory (``data.tokenizer_path``).

A subword tokenizer travels with every checkpoint as its ``tokenizer.json`` (:meth:`Tokenizer.files`,
listed and hashed in the manifest) and is described by the manifest's ``tokenizer`` section
(:meth:`Tokenizer.manifest_section`); :func:`tokenizer_from_manifest` reads it back, checking
the file against the recorded SHA-256.

This module is torch-free; `tokenizers` is imported only for ``bpe`` and ``hf``.

Example:
    >>> tok = train_bpe(b"to be or not to be " * 200, vocab_size=300, seed=0)
    >>> tok.decode(tok.encode("to be")) == "to be"
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from qtrain.errors import CheckpointError, ConfigError

KINDS = ("bytes", "bpe", "hf")
"""The `data.tokenizer` values."""
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
BYTES_SECTION: dict[str, Any] = {"kind": "bytes", "vocab_size": 256, "file": None, "sha256": None}
"""The manifest `tokenizer` section of a byte-level model (and of checkpoints written before tokenizers)."""
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
Buffer = bytes | bytearray | memoryview


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def _tokenizers() -> Any:
    """The `tokenizers` module (exit 2 naming the package when it is not installed)."""
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "data.tokenizer: bpe and hf tokenizers need the 'tokenizers' package (pip install tokenizers)"
        ) from None
    return tokenizers


class Tokenizer:
    """Text <-> token ids for one of the kinds `bytes`, `bpe`, `hf` (see the module docstring).

    Args:
        kind: `bytes`, `bpe` or `hf`.
        json_bytes: the `tokenizer.json` (None for bytes).
        extra: other files that came with it (`tokenizer_config.json` of an hf model).
    """

    def __init__(self, kind: str, json_bytes: bytes | None = None, extra: dict[str, bytes] | None = None) -> None:
        self.kind = kind
        self._json = json_bytes
        self._extra = dict(extra or {})
        self._hf: Any = None
        self._lengths: list[int] | None = None
        if kind == "bytes":
            self.vocab_size = 256
            return
        if json_bytes is None:
            raise ValueError(f"a {kind} tokenizer needs its tokenizer.json")
        try:
            self._hf = _tokenizers().Tokenizer.from_str(json_bytes.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exception
            raise ValueError(f"not a usable tokenizer.json ({str(err)[:200]})") from None
        self.vocab_size = int(self._hf.get_vocab_size(with_added_tokens=True))

    @property
    def sha256(self) -> str | None:
        """SHA-256 of `tokenizer.json` (None for bytes): the tokenizer's identity."""
        return hashlib.sha256(self._json).hexdigest() if self._json is not None else None

    def describe(self) -> str:
        """`bytes`, or `bpe (vocab 512, sha256 0123456789ab)`: for messages naming a tokenizer."""
        if self.kind == "bytes":
            return "bytes (vocab 256)"
        return f"{self.kind} (vocab {self.vocab_size}, sha256 {str(self.sha256)[:12]})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        if self._hf is None:
            return list(text.encode("utf-8"))
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of several texts (in parallel for bpe/hf)."""
        if self._hf is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (invalid UTF-8 replaced, special tokens kept)."""
        if self._hf is None:
            return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")
        return str(self._hf.decode([int(i) for i in ids], skip_special_tokens=False))

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each token id (0 for special tokens): the denominator of bits per byte."""
        if self._hf is None:
            return [1] * 256
        if self._lengths is None:  # computed once per tokenizer (a 150k vocabulary takes a moment)
            self._lengths = _token_bytes(self._hf, json.loads(self._json or b"{}"))
        return list(self._lengths)

    def files(self) -> dict[str, bytes]:
        """Files stored with a checkpoint or export: `tokenizer.json` (+ `tokenizer_config.json`); {} for bytes."""
        if self._json is None:
            return {}
        return {TOKENIZER_FILE: self._json, **self._extra}

    def manifest_section(self) -> dict[str, Any]:
        """The manifest's `tokenizer` section: kind, vocab_size, file, sha256."""
        if self.kind == "bytes":
            return dict(BYTES_SECTION)
        return {"kind": self.kind, "vocab_size": self.vocab_size, "file": TOKENIZER_FILE, "sha256": self.sha256}

    def hf_json(self) -> bytes:
        """A `tokenizer.json` for any kind (bytes: a byte-level BPE without merges, ids = byte values)."""
        if self._json is not None:
            return self._json
        return byte_level_json()


def byte_level_json() -> bytes:
    """`tokenizer.json` of the byte tokenizer: byte-level BPE, no merges, id of each byte = its value."""
    vocab = {ch: b for b, ch in sorted(byte_to_unicode().items())}
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    data: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": level,
        "post_processor": None,
        "decoder": level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }  # fmt: skip
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _is_byte_level(decoder: Any) -> bool:
    """Whether a tokenizer.json decoder (or one of a Sequence's) is ByteLevel."""
    if not isinstance(decoder, dict):
        return False
    return decoder.get("type") == "ByteLevel" or any(_is_byte_level(d) for d in decoder.get("decoders") or [])


def _token_bytes(hf: Any, data: dict[str, Any]) -> list[int]:
    """Byte length of every id of an hf/bpe tokenizer (byte-level, byte-fallback or plain pieces)."""
    special = {int(t["id"]) for t in data.get("added_tokens") or [] if t.get("special")}
    byte_level = _is_byte_level(data.get("decoder"))
    alphabet = set(byte_to_unicode().values())
    out: list[int] = []
    for i in range(int(hf.get_vocab_size(with_added_tokens=True))):
        piece = hf.id_to_token(i)
        if piece is None or i in special:
            out.append(0)
        elif byte_level:
            out.append(sum(1 if ch in alphabet else len(ch.encode("utf-8")) for ch in piece))
        elif _BYTE_PIECE.match(piece):
            out.append(1)
        else:
            out.append(len(piece.replace("\u2581", " ").encode("utf-8")))
    return out


def byte_tokenizer() -> Tokenizer:
    """The byte tokenizer: ids 0..255 are the UTF-8 bytes."""
    return Tokenizer("bytes")


def train_bpe(train_bytes: Buffer, vocab_size: int, seed: int) -> Tokenizer:
    """Train a byte-level BPE on the training split (deterministic for text, vocab size and seed).

    The BPE trainer draws no random numbers: `seed` is accepted so the contract names every
    input, and the trainer runs single-threaded (`TOKENIZERS_PARALLELISM=false` while it runs)
    so that nothing depends on the number of threads.

    Args:
        train_bytes: UTF-8 text of the training split.
        vocab_size: ids wanted (>= 256; a small text may give fewer).
        seed: recorded with the cached tokenizer; training itself is seed-free.

    Raises:
        ConfigError: `vocab_size` below 256, or `tokenizers` missing.
    """
    del seed  # the trainer is deterministic; the seed is part of the cache key only
    if vocab_size < 256:
        raise ConfigError(f"data.vocab_size: a byte-level BPE needs at least 256 ids (got {vocab_size})")
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    text = bytes(train_bytes).decode("utf-8")
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok.train_from_iterator(_lines(text), trainer=trainer)
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    return Tokenizer("bpe", tok.to_str().encode("utf-8"))


def _lines(text: str, chunk: int = 1 << 20) -> list[str]:
    """`text` cut after newlines into pieces of about `chunk` characters (joined, they are `text`)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + chunk)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of a whole corpus split: encoded in pieces cut after newlines (the same cut every time)."""
    ids: list[int] = []
    for piece in tok.encode_batch(_lines(text, 1 << 16)):
        ids.extend(piece)
    return ids


def load_tokenizer_dir(path: str | Path) -> Tokenizer:
    """The `hf` tokenizer of a directory holding `tokenizer.json` (+ `tokenizer_config.json` if present).

    Raises:
        ConfigError: no readable, usable `tokenizer.json` there (the message names the path).
    """
    d = Path(str(path)).expanduser()
    file = d / TOKENIZER_FILE
    if not file.is_file():
        raise ConfigError(f"data.tokenizer_path: {d} holds no {TOKENIZER_FILE} (data.tokenizer=hf reads one)")
    try:
        raw = file.read_bytes()
        extra = {TOKENIZER_CONFIG: (d / TOKENIZER_CONFIG).read_bytes()} if (d / TOKENIZER_CONFIG).is_file() else {}
        return Tokenizer("hf", raw, extra)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer_path: cannot use {file}: {err}") from None


def tokenizer_from_manifest(manifest: dict[str, Any], ckpt_dir: Path) -> Tokenizer:
    """The tokenizer a checkpoint (or imported model) records, its file checked against the manifest.

    A manifest without a `tokenizer` section is a byte-level model.

    Raises:
        CheckpointError: the file is missing, differs from the recorded SHA-256 or vocab size, or is unusable.
    """
    section = manifest.get("tokenizer") or BYTES_SECTION
    kind = section.get("kind")
    if kind == "bytes":
        return byte_tokenizer()
    if kind not in KINDS or not isinstance(section.get("file"), str):
        raise CheckpointError(f"{ckpt_dir}: manifest 'tokenizer' section names no usable tokenizer ({section})")
    file = Path(ckpt_dir) / section["file"]
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read the checkpoint's tokenizer ({err.strerror or err})") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != section.get("sha256"):
        raise CheckpointError(
            f"{file}: SHA-256 mismatch (manifest tokenizer {str(section.get('sha256'))[:16]}…, file {digest[:16]}…); "
            f"refusing the checkpoint"
        )
    config = Path(ckpt_dir) / TOKENIZER_CONFIG
    listed = TOKENIZER_CONFIG in (manifest.get("files") or {}) or kind == "hf"
    extra = {TOKENIZER_CONFIG: config.read_bytes()} if listed and config.is_file() else {}
    try:
        tok = Tokenizer(str(kind), raw, extra)
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from None
    if tok.vocab_size != section.get("vocab_size"):
        raise CheckpointError(
            f"{file}: has {tok.vocab_size} ids, the manifest's tokenizer section says {section.get('vocab_size')}"
        )
    return tok
