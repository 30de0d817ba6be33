"""Corpora and batches: token streams, a positional train/val split, explicit sampler state.

The training sampler walks epochs of non-overlapping windows in a seeded order; its
position (`epoch`, `cursor`) is plain state saved in checkpoints, so a resumed run sees
exactly the batches an uninterrupted one would. Reading the corpus, the split and the
fingerprint recorded in reports and manifests live in the torch-free `qtrain.corpus`.

The split is by bytes; each split is then tokenized (`data.tokenizer`, see `qtrain.tokenizer`).
Byte tokens are the corpus bytes themselves (uint8, no copy); subword ids are uint16 (vocabularies
up to 65,535) or int32, cached on disk per split and tokenizer (`token_cache_dir`) so a second
run does not tokenize again.

Example:
    >>> corpus = load_corpus(DataConfig())          # embedded pydocs
    >>> sampler = BatchSampler(corpus.train, block_size=128, batch_size=4, seed=0)
    >>> x, y = sampler.next_batch()                   # (4, 128) int64 each
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtrain.config import DataConfig
from qtrain.console import warn
from qtrain.corpus import (
    Buffer,
    DataError,
    corpus_bytes,
    fingerprint,
    fingerprint_name,
    pydocs_bytes,
    split_point,
)
from qtrain.errors import ConfigError
from qtrain.tokenizer import Tokenizer, byte_tokenizer, encode_text, load_tokenizer_dir, train_bpe

__all__ = [
    "BatchSampler",
    "Corpus",
    "DataError",
    "load_corpus",
    "pydocs_text",
    "target_bytes",
    "token_cache_dir",
    "tokenizer_for",
    "val_starts",
    "windows",
]
CACHE_VERSION = 1
"""Part of every cache key: bump when how ids are computed or stored changes."""
_MAGIC = b"QTRAIN-TOKENS\n"


@dataclass
class Corpus:
    """Token streams split by position: first part train, last part validation."""

    train: torch.Tensor
    """Tokens of the training split: uint8 bytes, or uint16/int32 subword ids."""
    val: torch.Tensor
    """Tokens of the validation split (same dtype)."""
    source: str
    """Where the text came from."""
    fingerprint: dict[str, Any]
    """`name`, `train_bytes`, `train_sha256`, `val_bytes`, `val_sha256` (see `qtrain.corpus.fingerprint`)."""
    tokenizer: Tokenizer | None = None
    """The tokenizer of the streams (None: bytes)."""


def pydocs_text() -> str:
    """The embedded `pydocs` corpus as text (a fixed snapshot, the same on every Python)."""
    return pydocs_bytes().decode("utf-8")


def load_corpus(cfg: DataConfig, block_size: int = 0, tokenizer: Tokenizer | None = None) -> Corpus:
    """Load, split and tokenize the configured corpus.

    Args:
        cfg: data config (`pydocs`, or `text` with `path`).
        block_size: model context; both splits must hold at least one window of it.
        tokenizer: the run's tokenizer (None or bytes: the corpus bytes are the tokens).

    Returns:
        The split corpus with its fingerprint (of the bytes, whatever the tokenizer).

    Raises:
        DataError: missing, binary, non-UTF-8 or too-short corpus (message names the file).
    """
    raw, source = corpus_bytes(cfg.name, cfg.path)
    need = block_size + 1
    min_bytes = int(need / min(cfg.val_fraction, 1 - cfg.val_fraction)) + 1
    if not raw:
        raise DataError(f"data.path: corpus {source} is empty; it needs at least {min_bytes} bytes")
    cut = split_point(len(raw), cfg.val_fraction)
    if cut < need or len(raw) - cut < need:
        raise DataError(
            f"data.path: corpus {source} has {len(raw)} bytes; each split needs one window of "
            f"{need} bytes (model.block_size + 1), so the corpus needs at least {min_bytes} bytes"
        )
    buf = raw if isinstance(raw, bytearray) else bytearray(raw)  # a text corpus is read into one: no copy
    view = memoryview(buf)  # the splits' fingerprints without copying them
    fp = fingerprint(fingerprint_name(cfg.name, source), view[:cut], view[cut:])
    if tokenizer is None or tokenizer.kind == "bytes":
        tokens = torch.frombuffer(buf, dtype=torch.uint8)
        return Corpus(train=tokens[:cut], val=tokens[cut:], source=source, fingerprint=fp)
    train = cached_ids(tokenizer, view[:cut], fp["train_sha256"])
    val = cached_ids(tokenizer, view[cut:], fp["val_sha256"])
    for split, ids in (("training", train), ("validation", val)):
        if len(ids) < need:
            raise DataError(
                f"data.path: the {split} split of {source} is {len(ids)} tokens with {tokenizer.describe()}; "
                f"it needs one window of {need} tokens (model.block_size + 1): use a larger corpus"
            )
    return Corpus(train=train, val=val, source=source, fingerprint=fp, tokenizer=tokenizer)


def tokenizer_for(cfg: DataConfig, seed: int = 0) -> Tokenizer:
    """The tokenizer `data.tokenizer` asks for (a bpe is trained on the training split, or read from the cache).

    Raises:
        ConfigError: an unknown kind, or hf without a usable `data.tokenizer_path`.
        DataError: the corpus cannot be read (bpe).
    """
    kind = cfg.tokenizer
    if kind == "bytes":
        return byte_tokenizer()
    if kind == "hf":
        if not cfg.tokenizer_path:
            raise ConfigError(
                "data.tokenizer_path: data.tokenizer=hf needs data.tokenizer_path=DIR (of tokenizer.json)"
            )
        return load_tokenizer_dir(cfg.tokenizer_path)
    if kind != "bpe":
        raise ConfigError(f"data.tokenizer: '{kind}' must be bytes|bpe|hf")
    raw, _ = corpus_bytes(cfg.name, cfg.path)
    train = memoryview(raw)[: split_point(len(raw), cfg.val_fraction)]
    train_sha = hashlib.sha256(train).hexdigest()
    key = _key("bpe", train_sha, str(cfg.vocab_size), str(seed), _tokenizers_version())
    cached = _read_cache(key, "tokenizer.json")
    if cached is not None:
        try:
            return Tokenizer("bpe", cached)
        except ValueError as err:
            warn(f"token cache: {key}: unusable cached tokenizer ({err}); training it again")
    tok = train_bpe(train, cfg.vocab_size, seed)
    _write_cache(key, "tokenizer.json", tok.hf_json())
    return tok


def cached_ids(tok: Tokenizer, text: Buffer, split_sha: str) -> torch.Tensor:
    """Token ids of one split (uint16 for vocabularies up to 65,535, else int32), from the cache when there.

    The cache key is the SHA-256 of the split's bytes and of the tokenizer's `tokenizer.json`;
    a damaged entry (wrong length or hash) is ignored with a warning and rebuilt.
    """
    dtype, code = (torch.uint16, "H") if tok.vocab_size <= 65535 else (torch.int32, "i")
    key = _key("ids", split_sha, str(tok.sha256), code)
    raw = _read_cache(key, f"ids-{code}")
    if raw is None or len(raw) % array.array(code).itemsize:
        ids = array.array(code, encode_text(tok, bytes(text).decode("utf-8")))
        _write_cache(key, f"ids-{code}", ids.tobytes())
    else:
        ids = array.array(code)
        ids.frombytes(raw)
    return torch.frombuffer(ids, dtype=dtype) if len(ids) else torch.zeros(0, dtype=dtype)


def token_cache_dir() -> Path:
    """Where token ids and trained tokenizers are cached: `$QTRAIN_CACHE`, else `<qtrain cache>/tokens`.

    The qtrain cache is `$QTRAIN_CACHE_DIR`, else `$XDG_CACHE_HOME/qtrain`, else `~/.cache/qtrain`.
    """
    if direct := os.environ.get("QTRAIN_CACHE"):
        return Path(direct).expanduser()
    if root := os.environ.get("QTRAIN_CACHE_DIR"):
        return Path(root).expanduser() / "tokens"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qtrain" / "tokens"


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join((f"v{CACHE_VERSION}", *parts)).encode()).hexdigest()


def _tokenizers_version() -> str:
    try:
        import tokenizers
    except ImportError:
        return "none"
    return str(tokenizers.__version__)


def _read_cache(key: str, what: str) -> bytes | None:
    """A cache entry's payload, or None when absent or damaged (damage: a warning, the entry is rebuilt)."""
    path = token_cache_dir() / f"{key}.{what}"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head, _, payload = data[len(_MAGIC) :].partition(b"\n")
    try:
        meta = json.loads(head)
        ok = data.startswith(_MAGIC) and meta["bytes"] == len(payload)
        ok = ok and meta["sha256"] == hashlib.sha256(payload).hexdigest() and meta["what"] == what
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        warn(f"token cache: {path} is damaged (length or SHA-256 does not match); ignoring it and rebuilding it")
        return None
    return payload


def _write_cache(key: str, what: str, payload: bytes) -> None:
    """Store a cache entry atomically (a temporary file renamed); a cache that cannot be written is skipped."""
    root = token_cache_dir()
    meta = {"what": what, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=root)
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + json.dumps(meta, sort_keys=True).encode() + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / f"{key}.{what}")
    except OSError as err:
        warn(f"token cache: cannot write to {root} ({err.strerror or err}); continuing without caching")
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def target_bytes(tokens: torch.Tensor, starts: torch.Tensor, block_size: int, token_bytes: list[int]) -> int:
    """UTF-8 bytes of the target tokens of the windows at `starts` (the denominator of bits per byte)."""
    if not token_bytes or all(b == 1 for b in token_bytes):
        return len(starts) * block_size
    table = torch.tensor(token_bytes, dtype=torch.long)
    total = 0
    for i in range(0, len(starts), 256):
        _, y = windows(tokens, starts[i : i + 256], block_size)
        total += int(table[y].sum())
    return total


def windows(tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (B, T) int64 for windows starting at `starts`."""
    idx = starts[:, None] + torch.arange(block_size + 1)[None, :]  # (B, T+1)
    chunk = tokens[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def val_starts(n_tokens: int, block_size: int, n_windows: int, seed: int = 0) -> torch.Tensor:
    """Fixed validation window starts: non-overlapping, a seeded subset when capped."""
    all_starts = torch.arange(0, n_tokens - block_size, block_size)
    if n_windows < 0 or n_windows >= len(all_starts):
        return all_starts
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(all_starts), generator=gen)[:n_windows]
    return all_starts[pick.sort().values]


class BatchSampler:
    """Deterministic epochs of shuffled non-overlapping training windows.

    Each epoch shifts the window grid by a seeded offset and shuffles it; a batch takes the
    next `batch_size` windows. Under DDP every rank builds the same global batch and keeps
    its own slice (`rank`, `world`), so ranks read disjoint shards.
    """

    def __init__(
        self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        span = len(self.tokens) - self.block_size - 1
        shift = int(torch.randint(0, min(self.block_size, span) + 1, (1,), generator=gen))
        starts = torch.arange(shift, span + 1, self.block_size)
        return starts[torch.randperm(len(starts), generator=gen)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next global batch's slice for this rank: inputs and targets (B, T)."""
        glob = self.batch_size * self.world
        picked: list[torch.Tensor] = []
        need = glob
        while need > 0:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = self._order[self.cursor : self.cursor + need]
            picked.append(take)
            self.cursor += len(take)
            need -= len(take)
        starts = torch.cat(picked)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return windows(self.tokens, starts, self.block_size)

    def state_dict(self) -> dict[str, int]:
        """Sampler position: plain integers."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by `state_dict`."""
        self.seed = int(state["seed"])
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)
