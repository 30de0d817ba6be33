"""Corpora and batches: byte tokens, a positional train/val split, explicit sampler state.

The training sampler walks epochs of non-overlapping windows in a seeded order; its
position (`epoch`, `cursor`) is plain state saved in checkpoints, so a resumed run sees
exactly the batches an uninterrupted one would.

Example:
    >>> corpus = load_corpus(DataConfig())          # embedded pydocs
    >>> sampler = BatchSampler(corpus.train, block_size=128, batch_size=4, seed=0)
    >>> x, y = sampler.next_batch()                   # (4, 128) int64 each
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qtrain.config import DataConfig


class DataError(ValueError):
    """A corpus that cannot be used (missing, empty, binary or too short)."""


@dataclass
class Corpus:
    """Byte tokens split by position: first part train, last part validation."""

    train: torch.Tensor
    """uint8 tokens of the training split."""
    val: torch.Tensor
    """uint8 tokens of the validation split."""
    source: str
    """Where the text came from."""


def pydocs_text() -> str:
    """The Python documentation topics shipped with CPython (`pydoc_data.topics`)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _read_text_files(path: Path) -> bytes:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data.path: directory {path} contains no .txt files")
        return b"\n".join(_read_one(p) for p in files)
    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist")
    return _read_one(path)


def _read_one(path: Path) -> bytes:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataError(f"data.path: {path} looks binary (contains NUL bytes); give UTF-8 text")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"data.path: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return raw


def load_corpus(cfg: DataConfig, block_size: int = 0) -> Corpus:
    """Load and split the configured corpus.

    Args:
        cfg: data config (`pydocs`, or `text` with `path`).
        block_size: model context; both splits must hold at least one window of it.

    Returns:
        The split corpus.

    Raises:
        DataError: missing, binary, non-UTF-8 or too-short corpus (message names the file).
    """
    if cfg.name == "pydocs":
        raw, source = pydocs_text().encode("utf-8"), "pydocs (pydoc_data.topics)"
    else:
        path = Path(str(cfg.path)).expanduser()
        raw, source = _read_text_files(path), str(path)
    need = block_size + 1
    min_bytes = int(need / min(cfg.val_fraction, 1 - cfg.val_fraction)) + 1
    if not raw:
        raise DataError(f"data.path: corpus {source} is empty; it needs at least {min_bytes} bytes")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n_val = int(len(tokens) * cfg.val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    if len(train) < need or len(val) < need:
        raise DataError(
            f"data.path: corpus {source} has {len(tokens)} bytes; each split needs one window of "
            f"{need} bytes (model.block_size + 1), so the corpus needs at least {min_bytes} bytes"
        )
    return Corpus(train=train, val=val, source=source)


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
