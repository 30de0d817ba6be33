"""RELIABILITY.md case 41: text from a checkpoint, a config, a path or the model never reaches
the terminal as rich markup or control sequences: markup is printed as written, control
characters other than newline and tab are shown escaped, and ``[/x]`` in a path does not
crash the error printer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qtrain.console import printable
from tests.reliability.conftest import copy_run, execute, qtrain

HOSTILE = "[/x][bold red]\x1b[2J\x1b]0;pwned\x07\x9b31m\u202eevil\r"
"""Markup (a stray closing tag, a style), a clear-screen, an OSC title change ended by BEL, an
8-bit CSI, a right-to-left override, a carriage return."""
RAW = ("\x1b[2J", "\x1b]0;", "\x07", "\x9b", "\u202e", "\r")
"""What must never reach the terminal raw."""


def _assert_safe(text: str) -> None:
    for seq in RAW:
        assert seq not in text, repr(seq)
    assert "Traceback" not in text and "MarkupError" not in text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[31m", "\\x1b[31m"),
        ("a\x00b\x7f", "a\\x00b\\x7f"),
        ("\x9b2J", "\\x9b2J"),  # C1: a CSI on 8-bit terminals
        ("\u202edcba", "\\u202edcba"),  # bidi override
        ("tab\tand\nnewline", "tab\tand\nnewline"),  # kept
    ],
)
def test_case_41_printable_escapes_control_characters(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_case_41_error_printer_with_markup_and_controls_in_a_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / f"gone{HOSTILE}"
    assert execute({"mode.name": "eval", "init_from": str(missing)}, tmp_path / "run") == 2
    err = capsys.readouterr().err
    _assert_safe(err)
    assert "[/x][bold red]" in err and "\\x1b[2J" in err and "\\u202eevil" in err


def test_case_41_precheck_failure_prints_the_path_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "gone[/x]" / "[red]ckpt"
    assert qtrain(["mode=eval", f"init_from='{missing}'", f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    _assert_safe(err)
    assert f"{missing} does not exist" in err


def test_case_41_verify_tables_and_errors_from_a_hostile_run_dir(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / f"run{HOSTILE}")
    weights = run / "checkpoints" / "step_0000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # a damaged checkpoint: its error (naming the path) goes into the status table
    weights.write_bytes(bytes(data))
    assert execute({"mode.name": "verify", "init_from": str(run)}, tmp_path / "out") == 3
    captured = capsys.readouterr()
    for text in (captured.out, captured.err):
        _assert_safe(text)
    assert "[/x][bold red]" in captured.out and "\\x1b]0;pwned\\x07" in captured.out
    assert "sha-256 mismatch" in captured.err.lower() and "\\u202eevil" in captured.err


def test_case_41_generated_text_and_summary_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(HOSTILE.replace("\r", "\n") * 400)  # a model trained on escape sequences emits them
    run = tmp_path / "run"
    assert execute({"data.name": "text", "data.path": str(corpus), "train.max_steps": 8, "train.lr": 0.01}, run) == 0
    capsys.readouterr()
    prompt = "[/x]\x1b[2J"
    changes = {"mode.name": "generate", "init_from": str(run), "generate.prompt": prompt, "generate.max_new_tokens": 64}
    assert execute(changes, tmp_path / "gen") == 0
    out = capsys.readouterr().out
    _assert_safe(out)
    assert "[/x]\\x1b[2J" in out  # the text, and the prompt in the summary table, as written
    report = json.loads((tmp_path / "gen" / "report.json").read_text())
    assert report["text"].startswith(prompt)  # report.json keeps the real text (JSON escapes it)


def test_case_41_report_of_runs_with_hostile_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / f"job{HOSTILE}".replace("/", "_")
    run.mkdir()
    (run / "report.json").write_text(
        json.dumps({"mode": f"train{HOSTILE}", "model": f"tiny{HOSTILE}", "val_loss": 1.0, "step": 1})
    )
    (run / "status.json").write_text(json.dumps({"exit_code": 0, "ok": True, "overrides": [f"seed={HOSTILE}"]}))
    out_dir = tmp_path / "report"
    assert execute({"mode.name": "report", "runs": [str(run)]}, out_dir) == 0
    captured = capsys.readouterr()
    for text in (captured.out, captured.err):
        _assert_safe(text)
    assert "\\x1b[2J" in captured.out
    shutil.rmtree(out_dir)
