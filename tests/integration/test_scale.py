"""Scaling out: 2-process DDP (gloo, CPU) equals one process; sweeps survive a failed job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import SHRINK, free_port, qtrain_in_process

pytestmark = pytest.mark.integration
STEPS = ["train.max_steps=8", "train.log_every=1", "train.save_every=4", "train.eval_every=0"]
BASE = [o for o in SHRINK if not o.startswith("train.batch_size")]


def _torchrun(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "qtrain", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_processes_match_one_and_resume_bit_identically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    # the one-process reference runs in this process (no start-up); the DDP runs are real torchrun launches
    res = qtrain_in_process(["mode=qat", "quant=int4", *BASE, *STEPS, "train.batch_size=8", f"hydra.run.dir={one}"])
    assert res == 0, capsys.readouterr().err
    res = _torchrun(["mode=qat", "quant=int4", *BASE, *STEPS, "train.batch_size=4", f"hydra.run.dir={two}"])
    assert res.returncode == 0, res.stderr[-3000:]
    # same global batch (2 x 4 = 8): same loss curve within float tolerance
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4, abs=1e-5)
    # exactly one checkpoint per save step, published by rank 0 only, nothing half-written
    ckpts = two / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000004", "step_0000008"]
    final = load_file(str(ckpts / "step_0000008" / "model.safetensors"))
    # resume the 2-process run from step 4: the result must be bit-identical
    shutil.rmtree(ckpts / "step_0000008")
    (ckpts / "latest").write_text("step_0000004\n")
    res = _torchrun(["mode=qat", "quant=int4", *BASE, *STEPS, "train.batch_size=4", f"hydra.run.dir={two}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continuing from" in res.stdout + res.stderr
    again = load_file(str(ckpts / "step_0000008" / "model.safetensors"))
    assert final.keys() == again.keys()
    assert all((final[k] == again[k]).all() for k in final)


def test_sweep_keeps_going_past_a_failed_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The second job's corpus is too short for the context: it fails when it loads its data, the
    # first succeeds. (A config mistake in any job refuses the whole sweep before it starts.)
    corpus = tmp_path / "data" / "corpus.txt"  # a path value must not nest the job dirs
    corpus.parent.mkdir()
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    short = corpus.parent / "short.txt"
    short.write_text("hello world\n")
    sweep = tmp_path / "sweep"
    code = qtrain_in_process(["-m", "mode=qat", "quant=int8", *SHRINK, "train.max_steps=2",
                              "data=text", f"data.path={corpus},{short}", f"hydra.sweep.dir={sweep}"])
    err = capsys.readouterr().err
    assert code == 2, err
    summary = json.loads((sweep / "sweep_status.json").read_text())
    assert all(Path(j["dir"]).parent == sweep for j in summary["jobs"])
    assert (summary["succeeded"], summary["failed"]) == (1, 1)
    by_data = {next(o for o in j["overrides"] if o.startswith("data.path=")): j for j in summary["jobs"]}
    assert by_data[f"data.path={short}"]["exit_code"] == 2 and by_data[f"data.path={corpus}"]["ok"]
    ok_dir = Path(by_data[f"data.path={corpus}"]["dir"])
    assert json.loads((ok_dir / "status.json").read_text())["ok"]
    assert (ok_dir / "report.json").is_file()
    assert "1 job(s) failed" in err
