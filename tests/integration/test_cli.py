"""The `qtrain` command end to end: outputs, modes, bad configs, the installed script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qtrain.cli import main
from tests.conftest import SHRINK, qtrain_in_process

pytestmark = pytest.mark.integration

REPORT_KEYS = {"mode", "quant", "model", "n_params", "step", "val_loss", "val_ppl", "checkpoint",
               "checkpoint_bytes", "elapsed_s"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run") / "r"
    code = qtrain_in_process(["mode=train", *SHRINK, "train.max_steps=12", "train.eval_every=6",
                              "train.save_every=4", "train.log_every=2", f"hydra.run.dir={run}"])
    assert code == 0  # the messages: pytest's "Captured stderr setup"
    return run


def test_train_run_leaves_the_documented_outputs(trained: Path) -> None:
    report = json.loads((trained / "report.json").read_text())
    assert set(report) >= REPORT_KEYS and report["step"] == 12 and report["mode"] == "train"
    assert report["val_ppl"] == pytest.approx(2.718281828 ** report["val_loss"], rel=1e-6)
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8, 10, 12]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(lines[0]) and "val_loss" in lines[2]
    assert (trained / ".hydra" / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (trained / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000004", "step_0000008", "step_0000012"]
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step_0000012"


def test_eval_and_generate_from_a_run_dir(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = qtrain_in_process(["mode=eval", f"init_from={trained}", "data.val_windows=4", "eval.decode_tokens=8",
                             f"compare_to={trained}", f"hydra.run.dir={tmp_path / 'e'}"])
    assert res == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "e" / "report.json").read_text())
    train_rep = json.loads((trained / "report.json").read_text())
    assert rep["val_loss"] == pytest.approx(train_rep["val_loss"], rel=1e-6)
    assert rep["decode_tokens_per_s"] > 0 and rep["prefill_tokens_per_s"] > 0
    assert rep["top1_agreement"] == 1.0 and rep["logit_kl"] == pytest.approx(0.0, abs=1e-6)
    res = qtrain_in_process(["mode=generate", f"init_from={trained}", "generate.max_new_tokens=20",
                             "generate.prompt=ab", f"hydra.run.dir={tmp_path / 'g'}"])
    assert res == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "g" / "report.json").read_text())
    assert rep["text"].startswith("ab") and len(rep["text"].encode("utf-8", "replace")) >= 20


@pytest.mark.parametrize("args,needles", [
    (["train.lrr=1"], ["train.lrr", "train.lr"]),
    (["quant=int3"], ["quant=int3", "int4", "int8", "none"]),
    (["train.lr=-1", "train.batch_size=0"], ["train.lr", "train.batch_size", "2 problems"]),
    (["data=text"], ["data.path"]),
    (["mode=ptq"], ["init_from"]),
])
def test_bad_config_exits_2_without_traceback_or_run_dir(
    tmp_path: Path, args: list[str], needles: list[str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # in-process: the same code path as the console script, minus start-up
    with pytest.raises(SystemExit) as exit_:
        main(args)
    out = capsys.readouterr()
    assert exit_.value.code == 2
    assert "Traceback" not in out.err + out.out
    for needle in needles:
        assert needle in out.err
    assert not (tmp_path / "outputs").exists()


def test_cfg_job_prints_config_and_does_no_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    res = qtrain_in_process(["--cfg", "job", "model=small"])
    assert res == 0 and "n_embd: 384" in capsys.readouterr().out
    assert not (tmp_path / "outputs").exists()


def test_help_lists_groups_and_examples(help_run: subprocess.CompletedProcess[str]) -> None:
    assert help_run.returncode == 0
    for word in ("mode:", "model:", "quant:", "data:", "Examples", "int8da_int4w"):
        assert word in help_run.stdout


def test_resume_must_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["mode=train", *SHRINK, "train.max_steps=2", "resume=must", f"hydra.run.dir={tmp_path / 'x'}"])
    assert exit_.value.code == 2 and "no valid checkpoint" in capsys.readouterr().err


def test_console_script_works_from_another_directory(tmp_path: Path) -> None:
    exe = shutil.which("qtrain")
    assert exe is not None, "the qtrain console script is not installed"
    res = subprocess.run([exe, "mode=train", *SHRINK, "train.max_steps=2", "hydra.run.dir=here"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "here" / "report.json").is_file()


# ---------------------------------------------------------------- issue 12: flags, completion, run dirs

_NO_TORCH = """
import sys
from qtrain.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit_:
    assert not exit_.code, exit_.code
assert "torch" not in sys.modules, "torch was imported"
"""


def _flag_run(args: list[str], tmp_path: Path, line: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run qtrain ARGS in a child that fails if torch gets imported; `line` is a completion query's COMP_LINE."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if line is not None:
        env.update(COMP_LINE=line, COMP_POINT=str(len(line)))
    res = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    return res


def test_version_names_qtrain_torch_and_hydra_without_importing_torch(tmp_path: Path) -> None:
    from importlib.metadata import version

    import qtrain

    out = _flag_run(["--version"], tmp_path).stdout
    assert f"qtrain {qtrain.__version__}" in out
    assert f"torch {version('torch')}" in out and f"Hydra {version('hydra-core')}" in out
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def help_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """`qtrain --help`, run once (for two tests) in a child that fails if torch gets imported."""
    return _flag_run(["--help"], tmp_path_factory.mktemp("help"))


def test_help_and_completion_offer_no_schema_names_and_skip_torch(
    tmp_path: Path, help_run: subprocess.CompletedProcess[str]
) -> None:
    helped = help_run.stdout
    assert "quant: int4, int8, int8da_int4w, none" in helped and "+experiment=NAME" in helped
    assert "_schema" not in helped
    for line, expected in (("qtrain quant=", "quant=int4"), ("qtrain mode=", "mode=train"), ("qtrain tra", "train.")):
        out = _flag_run(["-sc", "query=bash"], tmp_path, line).stdout
        assert expected in out.split(), (line, out)
        assert "_schema" not in out, (line, out)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("mode,extra", [
    ("eval", ["data.val_windows=4", "eval.decode_tokens=0", "eval.prefill_tokens=0"]),
    ("generate", ["generate.max_new_tokens=8"]),
    ("verify", []),
])
def test_read_only_modes_leave_no_run_dir_unless_asked(
    trained: Path, tmp_path: Path, mode: str, extra: list[str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tempfile

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    monkeypatch.chdir(tmp_path)
    main([f"mode={mode}", f"init_from={trained}", *extra])
    err = capsys.readouterr().err
    assert f"mode={mode} kept no run directory" in err
    assert not (tmp_path / "outputs").exists() and list(scratch_root.glob("qtrain-*")) == []  # scratch removed
    main([f"mode={mode}", f"init_from={trained}", *extra, "hydra.run.dir=kept"])  # asked: report.json kept
    assert json.loads((tmp_path / "kept" / "report.json").read_text())["mode"] == mode


def test_cfg_with_a_typo_gets_qtrain_message_but_prints_out_of_range_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--cfg", "job", "quant=int3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "quant=int3: no such option" in err and "quant_schema" not in err
    main(["--cfg", "job", "quant.group_size=0"])  # --cfg shows a config even when its values would be refused
    assert "group_size: 0" in capsys.readouterr().out
