"""Modes with a subword tokenizer: val_bpb everywhere, the checkpoint's tokenizer reused, another one refused."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qtrain import checkpoint as ck
from qtrain.errors import ConfigError
from qtrain.modes import resume_check
from qtrain.modes.context import RunContext
from qtrain.modes.dispatch import run
from tests.conftest import SHARED_DATA, SHRINK, compose_cfg

pytest.importorskip("tokenizers", reason="data.tokenizer=bpe needs the 'tokenizers' package")

BPE = ["data.tokenizer=bpe", "data.vocab_size=300"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """60 KB of tinyshakespeare, and a private token cache for the module."""
    tmp = tmp_path_factory.mktemp("tok")
    raw = SHARED_DATA.read_bytes()[:60_000]
    path = tmp / "shake.txt"
    path.write_bytes(raw[: raw.rfind(b"\n") + 1])
    before = os.environ.get("QTRAIN_CACHE")
    os.environ["QTRAIN_CACHE"] = str(tmp / "cache")
    yield path
    if before is None:
        os.environ.pop("QTRAIN_CACHE", None)
    else:
        os.environ["QTRAIN_CACHE"] = before


def _run(run_dir: Path, corpus: Path, overrides: list[str]) -> dict:
    overrides = ["data=text", f"data.path={corpus}", *overrides]
    cfg = compose_cfg([*SHRINK, *overrides])
    return run(RunContext(cfg=cfg, run_dir=run_dir, device=torch.device("cpu"), overrides=overrides))


@pytest.fixture(scope="module")
def bpe_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("bpe") / "train"
    report = _run(run_dir, corpus, ["mode=train", *BPE, "train.max_steps=6", "train.eval_every=3",
                                    "train.save_every=3", "train.lr=1e-2"])
    return run_dir, report


def test_bpe_train_reports_bits_per_byte_and_stores_its_tokenizer(bpe_run: tuple[Path, dict]) -> None:
    run_dir, report = bpe_run
    assert report["tokenizer"]["kind"] == "bpe" and report["tokenizer"]["vocab_size"] == 300
    # fewer tokens than bytes: each token's loss is spread over more than one byte
    assert 0 < report["val_bpb"] < report["val_loss"] / math.log(2)
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(r["val_bpb"] > 0 for r in evals)
    loaded = ck.load_checkpoint(report["checkpoint"])
    section = loaded.manifest["tokenizer"]
    assert section["kind"] == "bpe" and section["file"] == "tokenizer.json"
    assert loaded.manifest["files"]["tokenizer.json"]["sha256"] == section["sha256"]
    assert loaded.manifest["model"]["vocab_size"] == 300  # model.vocab_size followed the tokenizer


def test_mode_report_shows_bits_per_byte(bpe_run: tuple[Path, dict], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, trained = bpe_run
    cfg = compose_cfg(["mode=report", f"runs=[{run_dir}]"])
    run(RunContext(cfg=cfg, run_dir=tmp_path / "report", device=torch.device("cpu")))
    rows = json.loads((tmp_path / "report" / "report_table.json").read_text())["rows"]
    assert rows[0]["val_bpb"] == trained["val_bpb"] and "val bpb" in capsys.readouterr().out


def test_eval_and_generate_take_the_checkpoints_tokenizer(bpe_run: tuple[Path, dict], corpus: Path,
                                                          tmp_path: Path) -> None:
    run_dir, trained = bpe_run
    report = _run(tmp_path / "eval", corpus, ["mode=eval", f"init_from={run_dir}", "eval.decode_tokens=0",
                                              "eval.prefill_tokens=0"])
    assert report["tokenizer"]["sha256"] == trained["tokenizer"]["sha256"]
    # the same model on the same fixed windows; only the summation order may differ (float32 sums)
    assert report["val_bpb"] == pytest.approx(trained["val_bpb"], rel=1e-5)
    gen = _run(tmp_path / "gen", corpus, ["mode=generate", f"init_from={run_dir}", "generate.prompt=First",
                                          "generate.max_new_tokens=6"])
    assert gen["text"].startswith("First") and len(gen["text"]) > len("First")


def test_another_tokenizer_is_refused_naming_both(bpe_run: tuple[Path, dict], corpus: Path, tmp_path: Path) -> None:
    run_dir, _ = bpe_run
    with pytest.raises(ConfigError, match=r"bpe \(vocab 300.*bytes") as err:
        _run(tmp_path / "ptq", corpus, ["mode=ptq", f"init_from={run_dir}", "quant=int8", "data.tokenizer=bytes"])
    assert err.value.exit_code == 2
    quantized = _run(tmp_path / "ptq_ok", corpus, ["mode=ptq", f"init_from={run_dir}", "quant=int8"])
    assert quantized["tokenizer"]["kind"] == "bpe" and quantized["val_bpb"] > 0
    per_byte = quantized["val_bpb"] / quantized["val_loss"]  # one tokens-per-byte factor for both models
    assert quantized["reference_val_bpb"] == pytest.approx(quantized["reference_val_loss"] * per_byte, rel=1e-9)
    with pytest.raises(ConfigError, match=r"vocab 300.*vocab 320"):
        _run(tmp_path / "ft", corpus, ["mode=finetune", f"init_from={tmp_path / 'ptq_ok'}", "data.tokenizer=bpe",
                                       "data.vocab_size=320", "train.max_steps=2"])
    with pytest.raises(ConfigError, match=r"300.*320"):  # resuming the bpe run with another vocabulary
        _run(run_dir, corpus, ["mode=train", "data.tokenizer=bpe", "data.vocab_size=320", "train.max_steps=8"])


def test_resume_check_accepts_the_vocab_size_the_tokenizer_set(bpe_run: tuple[Path, dict], corpus: Path) -> None:
    run_dir, _ = bpe_run  # the command leaves model.vocab_size at its default; the checkpoint recorded 300
    cfg = compose_cfg([*SHRINK, "data=text", f"data.path={corpus}", "mode=train", *BPE, "train.max_steps=6",
                       "train.eval_every=3", "train.save_every=3", "train.lr=1e-2"])
    assert resume_check.check_run_dir(cfg, run_dir) == []
    cfg.data.vocab_size = 320
    assert "data.vocab_size=300 (this run: 320)" in resume_check.check_run_dir(cfg, run_dir)[0]


def test_bytes_val_bpb_is_val_loss_over_ln2(corpus: Path, tmp_path: Path) -> None:
    report = _run(tmp_path / "bytes", corpus, ["mode=train", "train.max_steps=2", "train.eval_every=2"])
    assert report["tokenizer"] == {"kind": "bytes", "vocab_size": 256, "file": None, "sha256": None}
    assert report["val_bpb"] == pytest.approx(report["val_loss"] / math.log(2), rel=1e-12)  # the same division
    record = json.loads((tmp_path / "bytes" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_bpb"] == pytest.approx(record["val_loss"] / math.log(2), rel=1e-12)
    assert "tokenizer.json" not in ck.load_checkpoint(report["checkpoint"]).manifest["files"]
