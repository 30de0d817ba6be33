"""Progress output: the plain line, the banner, the live display, phases, plain logging, a real pipe."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
from rich.console import Console

from qtrain import progress
from qtrain.console import PIPE_WIDTH, QConsole, plain_logging
from qtrain.progress import Hub, TrainProgress, TrainStats, format_banner, format_duration, format_train_line, phase
from qtrain.quant.recipe import QuantRecipe
from tests.conftest import SHRINK, run_qtrain

FIELDS = ("step", "loss", "lr", "tok/s", "val_loss", "elapsed", "eta")
LINE = re.compile(r"^step (\d+)/(\d+)  loss (\S+)  lr (\S+)  (\S+) tok/s  val_loss (\S+)  elapsed (\S+)  eta (\S+)$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain_hub() -> tuple[Hub, io.StringIO]:
    out = io.StringIO()
    return Hub(Console(file=out, width=60, highlight=False, soft_wrap=True), interactive=False), out


def live_hub() -> tuple[Hub, io.StringIO]:
    out = io.StringIO()
    return Hub(Console(file=out, force_terminal=True, width=160, highlight=False), interactive=True), out


def test_format_train_line_has_every_field_on_one_line() -> None:
    line = format_train_line(TrainStats(120, 200, 3.12345, 2.1e-3, 9874.2, 3.0123, 75.0, 3725.0))
    assert line == ("step 120/200  loss 3.1235  lr 2.10e-03  9,874 tok/s  val_loss 3.0123  elapsed 1m15s  eta 1h02m")
    unknown = format_train_line(TrainStats(1, 200, float("nan"), None, None, None, 0.5, None))
    assert LINE.match(unknown) and "val_loss -" in unknown and "eta ?" in unknown and "loss nan" in unknown


@pytest.mark.parametrize("seconds,text", [(0.04, "0.0s"), (8.26, "8.3s"), (65, "1m05s"), (7380, "2h03m"), (None, "?")])
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_banner_and_scheme_label() -> None:
    text = format_banner({"mode": "ptq", "model": "tiny (246,240 params)", "steps": None, "run dir": "/r"})
    assert text == "qtrain ptq | model tiny (246,240 params) | run dir /r"
    # the banner's scheme text (`qtrain.modes.context.announce`) is the recipe's banner label
    assert QuantRecipe.from_config(None).banner_label == "full precision"
    assert QuantRecipe.from_config({"scheme": "int4", "group_size": 32, "symmetric": False}).banner_label == (
        "int4 (group 32, asymmetric)"
    )
    assert QuantRecipe.from_config({"scheme": "int8", "group_size": 32}).banner_label == "int8"


def _train(p: TrainProgress, upto: int, max_steps: int = 10, val_at: int = 5) -> None:
    p.start(0, max_steps, tokens_per_step=1000, log_every=3)
    for step in range(1, upto + 1):
        p.update(step, 5.0 - step / 10, 1e-3, 4.5 if step >= val_at else None, step_s=0.01)
    p.close()


def test_plain_lines_every_log_every_and_the_last_step() -> None:
    hub, out = plain_hub()
    _train(TrainProgress(owner=hub), upto=10)
    lines = out.getvalue().splitlines()
    assert [int(LINE.match(x).group(1)) for x in lines] == [3, 6, 9, 10]  # type: ignore[union-attr]
    assert all(len(x) > 60 for x in lines)  # longer than the console's width, still one line each
    m = LINE.match(lines[-1])
    assert m is not None
    assert m.group(5) == "100,000" and m.group(6) == "4.5000" and m.group(8) == "0.0s"  # 1000 tokens / 0.01 s


def test_a_stopped_run_ends_with_its_last_step() -> None:
    hub, out = plain_hub()
    _train(TrainProgress(owner=hub), upto=7)
    assert [int(LINE.match(x).group(1)) for x in out.getvalue().splitlines()] == [3, 6, 7]  # type: ignore[union-attr]
    assert hub.training is None and hub.users == 0


def test_live_display_shows_every_field_and_leaves_one_clean_final_line() -> None:
    hub, out = live_hub()
    p = TrainProgress(owner=hub)
    p.start(0, 10, tokens_per_step=1000, log_every=3)
    assert hub.live is not None and hub.live.is_started
    for step in range(1, 7):
        p.update(step, 4.0, 1e-3, 4.5, step_s=0.01)
    shot = Console(width=160, record=True, file=io.StringIO())
    shot.print(hub.render())
    screen = shot.export_text()
    assert all(f in screen for f in FIELDS) and "step 6/10" in screen and "val_loss 4.5000" in screen
    p.close()
    assert hub.live is None and hub.training is None
    lines = [x for x in ANSI.sub("", out.getvalue()).splitlines() if x.strip()]
    assert LINE.match(lines[-1].strip()) and lines[-1].strip().startswith("step 6/10")


def test_phase_on_a_terminal_is_a_transient_bar_inside_the_training_display() -> None:
    hub, _ = live_hub()
    p = TrainProgress(owner=hub)
    p.start(0, 10, tokens_per_step=1000, log_every=3)
    with phase("validation", total=8, unit="windows", owner=hub) as bar:
        bar.advance(4)
        assert len(hub.bars.tasks) == 1 and hub.bars.tasks[0].completed == 4
        shot = Console(width=160, record=True, file=io.StringIO())
        shot.print(hub.render())
        text = shot.export_text()
        assert "validation" in text and "4/8 windows" in text and "step 0/10" in text
    assert not hub.bars.tasks and hub.live is not None  # the bar went, training's display stays
    p.close()
    assert hub.live is None


def test_phase_off_a_terminal_prints_a_few_lines_only_when_long(monkeypatch: pytest.MonkeyPatch) -> None:
    hub, out = plain_hub()
    monkeypatch.setattr(progress, "PLAIN_FIRST_AFTER_S", 1e9)  # a quick phase: nothing at all
    with phase("GPTQ", total=5, unit="layers", owner=hub) as bar:
        for _ in range(5):
            bar.advance()
    assert out.getvalue() == ""
    monkeypatch.setattr(progress, "PLAIN_FIRST_AFTER_S", 0.0)  # a long phase: one line, then one per interval
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 1e9)
    with phase("GPTQ", total=50, unit="layers", owner=hub) as bar:
        for i in range(50):
            bar.advance(note=f"block {i // 10 + 1}/5")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("GPTQ: 1/50 layers (block 1/5), ")
    assert lines[1].startswith("GPTQ: done, 50/50 layers in ")


def test_phase_is_quiet_off_a_terminal_while_training_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    hub, out = plain_hub()
    monkeypatch.setattr(progress, "PLAIN_FIRST_AFTER_S", 0.0)
    p = TrainProgress(owner=hub)
    p.start(0, 10, tokens_per_step=1000, log_every=5)
    with phase("validation", total=4, unit="windows", owner=hub) as bar:
        bar.advance(2)
    p.close()
    assert out.getvalue() == ""  # the training line carries val_loss


def test_console_off_a_terminal_does_not_wrap_tables() -> None:
    from rich.table import Table

    out = io.StringIO()
    con = QConsole(file=out, highlight=False, soft_wrap=True)
    assert con.width == PIPE_WIDTH
    path = "/tmp/" + "a-long-run-directory-name/" * 8 + "checkpoints/step_0000200"
    table = Table()
    table.add_column("key")
    table.add_column("value")
    table.add_row("checkpoint", path)
    con.print(table)
    assert any(path in line for line in out.getvalue().splitlines())


def test_plain_logging_bypasses_the_root_handler(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    tagged = io.StringIO()
    handler = logging.StreamHandler(tagged)  # what Hydra's default hydra_logging installs
    handler.setFormatter(logging.Formatter("[%(asctime)s][HYDRA] %(message)s"))
    root.addHandler(handler)
    try:
        with plain_logging():
            logging.getLogger("qtrain.quant.native").info("native CPU kernels unavailable (x)")
        assert tagged.getvalue() == ""
        assert "note: native CPU kernels unavailable (x)" in capsys.readouterr().err
        assert logging.getLogger("qtrain").propagate  # restored: caplog and library users see records
    finally:
        root.removeHandler(handler)


@pytest.mark.integration
def test_a_run_piped_starts_with_the_banner_and_prints_unwrapped_plain_lines(tmp_path: Path) -> None:
    run = tmp_path / ("a-run-directory-with-a-long-name-" * 3) / "r"  # longer than 80 columns
    res = run_qtrain(
        ["mode=train", *SHRINK, "train.max_steps=6", "train.log_every=2", "train.eval_every=3", f"hydra.run.dir={run}"]
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("qtrain train | model tiny (") and " params) | " in lines[0]
    assert "quant full precision" in lines[0] and "data pydocs" in lines[0] and lines[0].endswith(f"run dir {run}")
    steps = [LINE.match(x) for x in lines if x.startswith("step ")]
    assert [int(m.group(1)) for m in steps if m] == [2, 4, 6] and all(steps)
    assert all(m.group(6) != "-" for m in steps[1:] if m)  # validation at step 3 shows from step 4 on
    assert any(f"{run}/checkpoints/step_0000006" in x and "│" in x for x in lines)  # table cell not wrapped
    assert "[HYDRA]" not in res.stdout + res.stderr and "\x1b[" not in res.stdout


def test_messages_print_brackets_as_written_and_escape_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    from qtrain.console import info

    info("checkpoint: multirun/x/0_hooks=[a,b]/checkpoints \x1b[2J[/x]\x07 end")
    assert capsys.readouterr().out == "checkpoint: multirun/x/0_hooks=[a,b]/checkpoints \\x1b[2J[/x]\\x07 end\n"
