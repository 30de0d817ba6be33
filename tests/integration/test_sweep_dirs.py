"""A real sweep with a `hooks=[...]` list: short job dirs that `mode=report 'runs=[DIR]'` takes back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from qtrain.modes.context import RunContext
from qtrain.modes.dispatch import run
from tests.conftest import SHRINK, compose_cfg, qtrain_in_process

pytestmark = pytest.mark.integration
PATTERNS = '"blocks.0.attn.*", ' + ", ".join(f'"blocks.{i}.never_matches_{i}"' for i in range(1, 14))
HOOKS = (
    "hooks=[{_target_: qtrain.quant.hooks.SQNRLogger, every: 1}, "
    f"{{_target_: qtrain.quant.hooks.KeepFullPrecision, patterns: [{PATTERNS}]}}]"
)


def test_sweep_with_a_hook_list_names_jobs_briefly_and_reports_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(HOOKS) > 255  # as a directory name the override alone would pass the filesystem's limit
    sweep = tmp_path / "sweep"
    res = qtrain_in_process(["-m", "mode=qat", "quant=int8", "train.lr=0.001,0.002", *SHRINK, "train.max_steps=2",
                             "eval.prefill_tokens=0", HOOKS, f"hydra.sweep.dir={sweep}"])
    assert res == 0, capsys.readouterr().err
    dirs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(dirs) == 2
    for i, name in enumerate(dirs):
        assert re.fullmatch(r"[A-Za-z0-9._+-]+", name) and len(name) < 80, name
        assert name.startswith(f"{i}_mode-qat+quant-int8+train.lr-") and re.search(r"\+sha-[0-9a-f]{8}$", name)
    status = json.loads((sweep / dirs[1] / "status.json").read_text())
    assert any(o.startswith("hooks=[") and "KeepFullPrecision" in o for o in status["overrides"])
    assert "KeepFullPrecision" in (sweep / dirs[1] / ".hydra" / "overrides.yaml").read_text()
    # mode=report on the sweep and on one job dir, passed exactly as typed on the command line
    for runs, n in ((f"runs=[{sweep}]", 2), (f"runs=[{sweep / dirs[1]}]", 1)):
        cfg = compose_cfg(["mode=report", runs])
        out = run(RunContext(cfg=cfg, run_dir=tmp_path / f"report{n}", device=torch.device("cpu")))
        assert (out["jobs"], out["failed"]) == (n, 0)
        rows = json.loads((tmp_path / f"report{n}" / "report_table.json").read_text())["rows"]
        assert rows[-1]["job"].startswith("train.lr=0.002" if n == 2 else "mode=qat quant=int8 train.lr=0.002")
        assert rows[-1]["model_bytes"] < rows[-1]["checkpoint_bytes"] and rows[-1]["bits_per_weight"] > 8
