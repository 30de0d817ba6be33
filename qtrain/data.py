"""Corpora and batches: byte tokens, a positional train/val split, explicit sampler state.

The training sampler walks epochs of non-overlapping windows in a seeded order; its
position (`epoch`, `cursor`) is plain state saved in checkpoints, so a resumed run sees
exactly the batches an uninterrupted one would. Reading the corpus, the split and the
fingerprint recorded in reports and manifests live in the torch-free `qtrain.corpus`.

Example:
    >>> corpus = load_corpus(DataConfig())          # embedded pydocs
    >>> sampler = BatchSampler(corpus.train, block_size=128, batch_size=4, seed=0)
    >>> x, y = sampler.next_batch()                   # (4, 128) int64 each
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qtrain.config import DataConfig
from qtrain.corpus import DataError, corpus_bytes, fingerprint, fingerprint_name, pydocs_bytes, split_point

__all__ = ["BatchSampler", "Corpus", "DataError", "load_corpus", "pydocs_text", "val_starts", "windows"]


@dataclass
class Corpus:
    """Byte tokens split by position: first part train, last part validation."""

    train: torch.Tensor
    """uint8 tokens of the training split."""
    val: torch.Tensor
    """uint8 tokens of the validation split."""
    source: str
    """Where the text came from."""
    fingerprint: dict[str, Any]
    """`name`, `train_bytes`, `train_sha256`, `val_bytes`, `val_sha256` (see `qtrain.corpus.fingerprint`)."""


def pydocs_text() -> str:
    """The embedded `pydocs` corpus as text (a fixed snapshot, the same on every Python)."""
    return pydocs_bytes().decode("utf-8")


def load_corpus(cfg: DataConfig, block_size: int = 0) -> Corpus:
    """Load and split the configured corpus.

    Args:
        cfg: data config (`pydocs`, or `text` with `path`).
        block_size: model context; both splits must hold at least one window of it.

    Returns:
        The split corpus with its fingerprint.

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
    tokens = torch.frombuffer(buf, dtype=torch.uint8)
    view = memoryview(buf)  # the splits' fingerprints without copying them
    return Corpus(
        train=tokens[:cut],
        val=tokens[cut:],
        source=source,
        fingerprint=fingerprint(fingerprint_name(cfg.name, source), view[:cut], view[cut:]),
    )


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
