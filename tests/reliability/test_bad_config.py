"""RELIABILITY.md, bad configuration: cases 24-27 (case 28 is in test_quant_cases.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qtrain.config import DataConfig
from qtrain.data import load_corpus
from qtrain.model import GPT
from tests.reliability.conftest import SHRINK, execute, qtrain


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any model is built (bad configs are refused before any work)."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a model was built for a bad configuration")

    monkeypatch.setattr(GPT, "__init__", refuse)


@pytest.mark.parametrize(
    "override,needles",
    [
        (
            "train.lrr=1e-3",
            ["train.lrr", "unknown config key", "Did you mean train.lr", "Valid keys of train", "max_steps"],
        ),
        ("quant=int3", ["quant=int3", "valid choices", "int4", "int8", "int8da_int4w", "none"]),
        ("mode=trian", ["mode=trian", "valid choices", "train", "qat", "verify", "upgrade"]),
    ],
)
def test_case_24_typo_in_key_or_option(
    tmp_path: Path, override: str, needles: list[str], no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = qtrain([override, f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert code != 0 and code == 2
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "Traceback" not in err
    assert not run.exists()


def test_case_25_out_of_range_values_all_listed_at_once(
    tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = qtrain(
        [
            "train.lr=-1",
            "train.batch_size=0",
            "quant=int4",
            "quant.group_size=0",
            "train.keep=1",
            f"hydra.run.dir={run}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "4 problems" in err
    for key, value in (("train.lr", "-1"), ("train.batch_size", "0"), ("quant.group_size", "0"), ("train.keep", "1")):
        assert re.search(rf"{re.escape(key)}: .*{re.escape(value)}", err), f"{key} not listed:\n{err}"
    assert not run.exists()

    # A group size that does not divide a layer's input size (tiny: n_embd 96).
    code = qtrain(["model=tiny", "quant=int4", "quant.group_size=64", f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and "quant.group_size" in err and "does not divide" in err and "96" in err
    assert not run.exists()


def test_case_26_required_value_missing(tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert qtrain(["data=text", f"hydra.run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "required" in err
    assert not run.exists()


def _min_bytes(err: str) -> int:
    m = re.search(r"at least (\d+) bytes", err)
    assert m, f"no minimum size in:\n{err}"
    return int(m.group(1))


def test_case_27_empty_binary_or_too_short_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {"empty": b"", "binary": b"\x00\x01\x02 binary \x00" * 200, "too short": b"hello world\n"}
    for kind, content in files.items():
        path = tmp_path / f"{kind.replace(' ', '_')}.txt"
        path.write_bytes(content)
        run = tmp_path / f"run-{path.stem}"
        assert execute({"data.name": "text", "data.path": str(path)}, run) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err
        if kind != "binary":
            need = _min_bytes(err)
            # The stated minimum is truthful: a corpus of exactly that size is accepted.
            ok = tmp_path / f"ok-{path.stem}.txt"
            ok.write_bytes(b"x" * need)
            load_corpus(DataConfig(name="text", path=str(ok)), block_size=32)
        else:
            assert "binary" in err
    # The command line gives the same answer (no run dir left behind).
    run = tmp_path / "cli"
    assert qtrain([*SHRINK, "data=text", f"data.path={tmp_path / 'too_short.txt'}", f"hydra.run.dir={run}"]) == 2
    assert str(tmp_path / "too_short.txt") in capsys.readouterr().err
    assert not run.exists()
