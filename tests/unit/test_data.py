"""Corpus split, validation windows, deterministic sampler with explicit position."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtrain import checkpoint as ck
from qtrain.config import DataConfig
from qtrain.corpus import corpus_fingerprint, pydocs_bytes
from qtrain.data import BatchSampler, DataError, load_corpus, pydocs_text, val_starts
from qtrain.modes.context import RunContext
from qtrain.modes.dispatch import run
from tests.conftest import SHRINK, compose_cfg

# The embedded pydocs snapshot: CPython 3.11.7's pydoc_data.topics as qtrain joined it
# (sorted topics, blank-line separated). Every Python must see exactly these bytes.
PYDOCS_BYTES = 466_273
PYDOCS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"


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


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_pydocs_snapshot_bytes_are_fixed() -> None:
    raw = pydocs_bytes()
    assert len(raw) == PYDOCS_BYTES and _sha(raw) == PYDOCS_SHA256
    assert pydocs_text().encode("utf-8") == raw


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the snapshot was taken from CPython 3.11.7")
def test_pydocs_snapshot_equals_the_corpus_of_python_3_11_7() -> None:
    from pydoc_data.topics import topics

    assert "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8") == pydocs_bytes()


def test_corpus_module_imports_neither_torch_nor_hydra() -> None:
    code = (
        "import sys, qtrain.corpus as c\n"
        "c.corpus_fingerprint()\n"
        "print(sorted({'torch', 'hydra', 'omegaconf'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pydocs_fingerprint_is_of_the_split_actually_used() -> None:
    raw = pydocs_bytes()
    c = load_corpus(DataConfig(val_fraction=0.25), block_size=64)
    n_val = int(PYDOCS_BYTES * 0.25)
    assert c.fingerprint == {
        "name": "pydocs",
        "train_bytes": PYDOCS_BYTES - n_val,
        "train_sha256": _sha(raw[:-n_val]),
        "val_bytes": n_val,
        "val_sha256": _sha(raw[-n_val:]),
    }
    assert bytes(c.val.tolist()) == raw[-n_val:]
    assert corpus_fingerprint("pydocs", val_fraction=0.25) == c.fingerprint


def test_text_fingerprint_names_the_resolved_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("first file " * 50)
    (tmp_path / "b.txt").write_text("second file " * 50)
    monkeypatch.chdir(tmp_path)
    c = load_corpus(DataConfig(name="text", path="."), block_size=16)
    joined = (tmp_path / "a.txt").read_bytes() + b"\n" + (tmp_path / "b.txt").read_bytes()
    cut = len(joined) - int(len(joined) * 0.1)
    assert c.fingerprint == {
        "name": str(tmp_path.resolve()),
        "train_bytes": cut,
        "train_sha256": _sha(joined[:cut]),
        "val_bytes": len(joined) - cut,
        "val_sha256": _sha(joined[cut:]),
    }
    (tmp_path / "b.txt").write_text("second file changed " * 50)
    changed = load_corpus(DataConfig(name="text", path="."), block_size=16).fingerprint
    assert changed["name"] == c.fingerprint["name"] and changed["val_sha256"] != c.fingerprint["val_sha256"]


def test_fingerprint_in_report_and_manifest(tmp_path: Path) -> None:
    overrides = ["mode=train", "train.max_steps=2", "train.eval_every=0"]
    cfg = compose_cfg([*SHRINK, *overrides])
    report = run(RunContext(cfg=cfg, run_dir=tmp_path / "train", device=torch.device("cpu"), overrides=overrides))
    expected = corpus_fingerprint("pydocs")
    assert expected["train_bytes"] + expected["val_bytes"] == PYDOCS_BYTES
    assert report["corpus"] == expected
    assert json.loads((tmp_path / "train" / "report.json").read_text())["corpus"] == expected
    assert ck.load_checkpoint(report["checkpoint"], with_trainer=False).manifest["corpus"] == expected

    text = tmp_path / "eval.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    overrides = ["mode=eval", f"init_from={report['checkpoint']}", "data=text", f"data.path={text}",
                 "eval.decode_tokens=0", "eval.prefill_tokens=0"]
    cfg = compose_cfg([*SHRINK, *overrides])
    evaluated = run(RunContext(cfg=cfg, run_dir=tmp_path / "eval", device=torch.device("cpu"), overrides=overrides))
    assert evaluated["corpus"] == corpus_fingerprint("text", str(text))
    assert evaluated["corpus"]["name"] == str(text.resolve())
