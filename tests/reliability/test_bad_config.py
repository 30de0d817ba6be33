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


# ---------------------------------------------------------------- issue 12, item 7: every mistake exits 2


@pytest.mark.parametrize(
    "override,needles",
    [
        ("train.lr=abc", ["train.lr=abc: expected a float", "e.g. train.lr="]),
        ("train.max_steps=1.5", ["train.max_steps=1.5: expected an integer"]),
        ("compile=maybe", ["compile=maybe: expected true or false"]),
        ("train=3", ["train=3: train is a group of settings", "e.g. train.max_steps=500"]),
        ("trian.max_steps=5", ["trian.max_steps: unknown config key", "Did you mean train?", "Valid top-level keys"]),
        ("+train.foo=1", ["train.foo: unknown config key", "cannot add keys"]),
        ("~train.lr", ["~train.lr: keys of qtrain's config cannot be deleted"]),
        ("train.lr=1,2", ["train.lr=1,2", "add -m"]),
        ("experiment=qat_int4", ["+experiment=qat_int4"]),
        ("train.lr=[1,", ["train.lr=[1,: cannot parse this override"]),
    ],
)
def test_refused_value_says_why(
    tmp_path: Path, override: str, needles: list[str], no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert qtrain([override, f"hydra.run.dir={run}"]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "Traceback" not in err and "Error merging override" not in err
    assert not run.exists()


def test_every_typo_listed_at_once_without_schema_names(
    tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["train.lr=abc", "trian.max_steps=5", "quant=int3", "mode=trian", f"hydra.run.dir={run}"]
    assert qtrain(args) == 2
    err = capsys.readouterr().err
    assert "4 problems" in err
    for needle in ("train.lr=abc", "trian.max_steps", "quant=int3", "mode=trian", "Did you mean mode=train?"):
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "_schema" not in err  # ConfigStore entries are never offered as choices
    assert not run.exists()


def test_device_cuda_without_cuda_is_a_config_error(
    tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device=cuda is valid here")
    run = tmp_path / "run"
    assert qtrain([*SHRINK, "mode=train", "device=cuda", f"hydra.run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "device=cuda:" in err and "device=cpu" in err and "Traceback" not in err
    assert not run.exists()


def test_hooks_that_cannot_be_built_exit_2_naming_the_entry(
    tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    hooks = (
        "hooks=[{_target_: nope.Nope},{_target_: qtrain.quant.hooks.SQNRLogger, evry: 3},"
        "{_target_: qtrain.quant.hooks.SQNRLoger}]"
    )
    assert qtrain([*SHRINK, hooks, f"hydra.run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err and "Traceback" not in err
    assert "hooks[0]: _target_ nope.Nope cannot be imported" in err
    assert "hooks[1]: qtrain.quant.hooks.SQNRLogger" in err and "'evry'" in err and "it takes: every" in err
    assert "hooks[2]" in err and "Did you mean qtrain.quant.hooks.SQNRLogger?" in err
    assert not run.exists()


def test_hook_failing_inside_a_run_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Past the precheck (library callers, `cli.execute`), a hook that cannot be built is still exit 2."""
    spec = [{"_target_": "qtrain.quant.hooks.KeepFullPrecision", "patterns": ["no.such.layer"]}]
    changes = {"mode.name": "qat", "quant.scheme": "int4", "train.max_steps": 1, "hooks": spec}
    assert execute(changes, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "KeepFullPrecision: no quantized layer matches" in err and "Traceback" not in err
