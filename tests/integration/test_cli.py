"""The `qtrain` command end to end: outputs, modes, bad configs, the installed script."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from qtrain.cli import main
from tests.conftest import SHRINK, run_qtrain

pytestmark = pytest.mark.integration

REPORT_KEYS = {"mode", "quant", "model", "n_params", "step", "val_loss", "val_ppl", "checkpoint",
               "checkpoint_bytes", "elapsed_s"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run") / "r"
    res = run_qtrain(["mode=train", *SHRINK, "train.max_steps=12", "train.eval_every=6", "train.save_every=4",
                      "train.log_every=2", f"hydra.run.dir={run}"])
    assert res.returncode == 0, res.stderr
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


def test_eval_and_generate_from_a_run_dir(trained: Path, tmp_path: Path) -> None:
    res = run_qtrain(["mode=eval", f"init_from={trained}", "data.val_windows=4", "eval.decode_tokens=8",
                      f"compare_to={trained}", f"hydra.run.dir={tmp_path / 'e'}"])
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "e" / "report.json").read_text())
    train_rep = json.loads((trained / "report.json").read_text())
    assert rep["val_loss"] == pytest.approx(train_rep["val_loss"], rel=1e-6)
    assert rep["decode_tokens_per_s"] > 0 and rep["prefill_tokens_per_s"] > 0
    assert rep["top1_agreement"] == 1.0 and rep["logit_kl"] == pytest.approx(0.0, abs=1e-6)
    res = run_qtrain(["mode=generate", f"init_from={trained}", "generate.max_new_tokens=20", "generate.prompt=ab",
                      f"hydra.run.dir={tmp_path / 'g'}"])
    assert res.returncode == 0, res.stderr
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


def test_cfg_job_prints_config_and_does_no_work(tmp_path: Path) -> None:
    res = run_qtrain(["--cfg", "job", "model=small"], cwd=tmp_path)
    assert res.returncode == 0 and "n_embd: 384" in res.stdout
    assert not (tmp_path / "outputs").exists()


def test_help_lists_groups_and_examples(tmp_path: Path) -> None:
    res = run_qtrain(["--help"], cwd=tmp_path)
    assert res.returncode == 0
    for word in ("mode:", "model:", "quant:", "data:", "Examples", "int8da_int4w"):
        assert word in res.stdout


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
