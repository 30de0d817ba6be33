"""Tokenizers (bytes, bpe, hf), the token-id cache, and the tokenizer a checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qtrain import checkpoint as ck
from qtrain import data as data_mod
from qtrain.config import DataConfig
from qtrain.data import load_corpus, tokenizer_for
from qtrain.errors import CheckpointError
from qtrain.tokenizer import (
    TOKENIZER_FILE,
    Tokenizer,
    byte_tokenizer,
    load_tokenizer_dir,
    tokenizer_from_manifest,
    train_bpe,
)
from tests.conftest import SHARED_DATA

tokenizers = pytest.importorskip("tokenizers", reason="bpe/hf tokenizers need the 'tokenizers' package")

TEXT = "naïve café — ✓ 日本語\n\n  indented   spaces\ttab\r\nend"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 KB of tinyshakespeare (cut at a line end) as a data=text corpus."""
    raw = SHARED_DATA.read_bytes()[:60_000]
    path = tmp_path_factory.mktemp("corpus") / "shake.txt"
    path.write_bytes(raw[: raw.rfind(b"\n") + 1])
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private token cache for each test."""
    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bpe_training_is_deterministic_and_round_trips_text(sample: Path) -> None:
    raw = sample.read_bytes()
    first, second = train_bpe(raw, 300, seed=0), train_bpe(raw, 300, seed=0)
    assert first.hf_json() == second.hf_json()  # byte-identical tokenizer.json
    assert first.vocab_size == 300 and first.kind == "bpe"
    for text in (TEXT, raw.decode()[:5000], ""):
        assert first.decode(first.encode(text)) == text
    assert len(first.encode(raw.decode())) < 0.8 * len(raw)  # 44 merges already compress
    table = first.token_bytes()
    ids = first.encode(TEXT)
    assert sum(table[i] for i in ids) == len(TEXT.encode("utf-8"))  # byte lengths add up to the text's


def test_bytes_tokenizer_is_the_corpus_bytes(sample: Path) -> None:
    cfg = DataConfig(name="text", path=str(sample))
    plain, with_bytes = load_corpus(cfg, 32), load_corpus(cfg, 32, byte_tokenizer())
    raw = sample.read_bytes()
    assert plain.train.dtype == torch.uint8 and bytes(plain.train.numpy()) + bytes(plain.val.numpy()) == raw
    assert torch.equal(plain.val, with_bytes.val)
    tok = byte_tokenizer()
    assert tok.encode(TEXT) == list(TEXT.encode()) and tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.files() == {} and tok.manifest_section()["kind"] == "bytes"
    as_hf = tokenizers.Tokenizer.from_str(tok.hf_json().decode())  # the byte tokenizer as a tokenizer.json
    assert as_hf.encode(TEXT).ids == list(TEXT.encode()) and as_hf.decode(list(TEXT.encode())) == TEXT


def test_hf_tokenizer_dir_and_uint16_ids(sample: Path, tmp_path: Path) -> None:
    bpe = train_bpe(sample.read_bytes(), 280, seed=0)
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / TOKENIZER_FILE).write_bytes(bpe.hf_json())
    (model_dir / "tokenizer_config.json").write_text("{}")
    tok = load_tokenizer_dir(model_dir)
    assert tok.kind == "hf" and tok.sha256 == bpe.sha256
    assert set(tok.files()) == {TOKENIZER_FILE, "tokenizer_config.json"}
    corpus = load_corpus(DataConfig(name="text", path=str(sample), tokenizer="hf", tokenizer_path=str(model_dir)),
                         32, tok)
    assert corpus.train.dtype == torch.uint16 and int(corpus.train.long().max()) < 280
    x, y = data_mod.windows(corpus.val, torch.tensor([0, 5]), 8)
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


def test_second_load_reads_the_cache(sample: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(name="text", path=str(sample), tokenizer="bpe", vocab_size=300)
    tok = tokenizer_for(cfg, seed=3)
    first = load_corpus(cfg, 32, tok)
    assert len(list(cache.iterdir())) == 3  # the tokenizer and the ids of both splits

    def refuse(*_: object) -> None:
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(data_mod, "train_bpe", refuse)
    monkeypatch.setattr(data_mod, "encode_text", refuse)
    again = tokenizer_for(cfg, seed=3)
    assert again.hf_json() == tok.hf_json()
    second = load_corpus(cfg, 32, again)
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)


def test_a_damaged_cache_entry_is_rebuilt(sample: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = DataConfig(name="text", path=str(sample), tokenizer="bpe", vocab_size=300)
    tok = tokenizer_for(cfg)
    good = load_corpus(cfg, 32, tok)
    for entry in cache.glob("*.ids-*"):
        raw = bytearray(entry.read_bytes())
        raw[-3] ^= 0xFF  # one flipped byte in the ids: same length, other hash
        entry.write_bytes(bytes(raw))
    rebuilt = load_corpus(cfg, 32, tok)
    assert torch.equal(good.train, rebuilt.train) and torch.equal(good.val, rebuilt.val)
    assert "damaged" in capsys.readouterr().err
    load_corpus(cfg, 32, tok)  # rewritten: no warning now
    assert "damaged" not in capsys.readouterr().err


def _save(root: Path, tok: Tokenizer) -> Path:
    payload = ck.Payload(model_state={"w": torch.zeros(2)}, manifest={"tokenizer": tok.manifest_section()},
                         extra_files=tok.files())
    return ck.save_checkpoint(root, 1, payload, keep=2)


def test_checkpoint_carries_its_tokenizer_and_refuses_a_tampered_one(sample: Path, tmp_path: Path) -> None:
    tok = train_bpe(sample.read_bytes(), 300, seed=0)
    path = _save(tmp_path / "checkpoints", tok)
    loaded = ck.load_checkpoint(path)
    files = loaded.manifest["files"]
    assert files[TOKENIZER_FILE]["bytes"] == len(tok.hf_json()) and files[TOKENIZER_FILE]["sha256"] == tok.sha256
    assert loaded.extra_files == {TOKENIZER_FILE: tok.hf_json()}
    back = tokenizer_from_manifest(loaded.manifest, path)
    assert back.kind == "bpe" and back.hf_json() == tok.hf_json()
    data = json.loads((path / TOKENIZER_FILE).read_text())
    data["model"]["merges"] = data["model"]["merges"][:-1]
    (path / TOKENIZER_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="tokenizer.json") as err:
        ck.load_checkpoint(path)
    assert err.value.exit_code == 3
    with pytest.raises(CheckpointError, match="SHA-256"):
        tokenizer_from_manifest(loaded.manifest, path)
    with pytest.raises(ValueError, match="plain .json"):
        ck.save_checkpoint(tmp_path / "other", 1, ck.Payload({"w": torch.zeros(1)}, extra_files={"x.bin": b""}), 2)
