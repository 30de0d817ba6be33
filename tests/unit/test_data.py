"""Corpus split, validation windows, deterministic sampler with explicit position."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtrain.config import DataConfig
from qtrain.data import BatchSampler, DataError, load_corpus, pydocs_text, val_starts


def test_pydocs_is_embedded_and_split_by_position() -> None:
    text = pydocs_text().encode()
    assert len(text) > 300_000
    c = load_corpus(DataConfig(), block_size=128)
    assert len(c.train) + len(c.val) == len(text)
    assert bytes(c.val[:50].tolist()) == text[len(c.train) : len(c.train) + 50]
    assert len(c.val) == int(len(text) * 0.1)


def test_text_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "b.txt").write_text("second file " * 100)
    c = load_corpus(DataConfig(name="text", path=str(tmp_path)), block_size=16)
    assert len(c.train) > 0 and c.source == str(tmp_path)
    c2 = load_corpus(DataConfig(name="text", path=str(tmp_path / "a.txt")), block_size=16)
    assert len(c2.train) + len(c2.val) == 1200


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"\x00\x01\x02" * 100, "binary"),
                                             (b"short", "needs at least"), (b"\xff\xfe abc" * 50, "UTF-8")])
def test_bad_corpus_names_file(tmp_path: Path, content: bytes, needle: str) -> None:
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=needle):
        load_corpus(DataConfig(name="text", path=str(f)), block_size=128)


def test_val_windows_fixed_and_seeded() -> None:
    a, b = val_starts(10_000, 128, 20), val_starts(10_000, 128, 20)
    assert torch.equal(a, b) and len(a) == 20
    assert len(val_starts(10_000, 128, -1)) == len(range(0, 10_000 - 128, 128))


def test_sampler_deterministic_and_resumable() -> None:
    tokens = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    s1 = BatchSampler(tokens, 32, 8, seed=3)
    seen = [s1.next_batch()[0] for _ in range(50)]  # crosses several epochs
    s2 = BatchSampler(tokens, 32, 8, seed=3)
    for _ in range(20):
        s2.next_batch()
    state = s2.state_dict()
    s3 = BatchSampler(tokens, 32, 8, seed=3)
    s3.load_state_dict(state)
    for i in range(20, 50):
        assert torch.equal(s3.next_batch()[0], seen[i])


def test_sampler_epoch_has_no_repeats() -> None:
    tokens = torch.arange(3300) % 251
    s = BatchSampler(tokens.to(torch.uint8), 32, 4, seed=0)
    n = len(s._order)
    firsts = [tuple(s.next_batch()[0][:, 0].tolist()) for _ in range(n // 4)]
    starts = torch.cat([s._order[: (n // 4) * 4]])
    assert len(set(starts.tolist())) == len(starts)
    assert len(firsts) == n // 4


def test_sampler_ranks_take_disjoint_slices_of_the_global_batch() -> None:
    tokens = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    whole = BatchSampler(tokens, 32, 8, seed=1).next_batch()[0]
    r0 = BatchSampler(tokens, 32, 4, seed=1, rank=0, world=2).next_batch()[0]
    r1 = BatchSampler(tokens, 32, 4, seed=1, rank=1, world=2).next_batch()[0]
    assert torch.equal(torch.cat([r0, r1]), whole)
