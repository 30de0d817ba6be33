"""mode=report over synthetic run and sweep dirs (no training: hand-written report.json files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qtrain import sweep_report as sr
from qtrain.errors import ConfigError
from qtrain.modes import MODES, run
from qtrain.runner import RunContext
from tests.conftest import compose_cfg

INT4 = {"scheme": "int4", "group_size": 32, "symmetric": True, "activations": "none", "embeddings": False,
        "lm_head": False, "kernel": "auto"}


def _job(root: Path, name: str, report: dict | None, status: dict | None = None, losses: int = 0) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    overrides = (status or {}).get("overrides", [])
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if report is not None:
        (d / "report.json").write_text(json.dumps(report))
    if status is not None:
        (d / "status.json").write_text(json.dumps(status))
    if losses:
        lines = [json.dumps({"step": s, "loss": 5.0 - s / 10, **({"val_loss": 4.9} if s == losses else {})})
                 for s in range(1, losses + 1)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 99, \"lo")  # torn last line
    return d


def _ok(*overrides: str) -> dict:
    return {"exit_code": 0, "ok": True, "overrides": list(overrides)}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    _job(root, "0_mode=ptq", {"mode": "ptq", "model": "tiny", "quant": {**INT4, "method": "rtn"}, "val_ppl": 5.0,
                              "reference_val_ppl": 4.0, "ppl_vs_reference": 1.25, "checkpoint_bytes": 1_000_000,
                              "bits_per_weight": 4.5}, _ok("mode=ptq", "quant=int4"))
    _job(root, "1_mode=qat", {"mode": "qat", "model": "tiny", "quant": {**INT4, "method": "qat"}, "val_ppl": 4.25,
                              "reference_val_ppl": 4.0, "checkpoint_bytes": 1_000_000, "bits_per_weight": 4.5},
         _ok("mode=qat", "quant=int4"), losses=20)
    layers = {"blocks.0.mlp.down": {"scheme": "int4", "bits": 4, "group_size": 32, "symmetric": False,
                                    "activations": "none", "kind": "linear", "in_features": 64, "out_features": 8,
                                    "tied_to": None}}
    _job(root, "2_mode=eval", {"mode": "eval", "model": "tiny", "val_ppl": 4.3, "decode_tokens_per_s": 123.4,
                               "quant": {"config": {**INT4, "symmetric": False}, "state": "packed",
                                         "method": "qat", "layers": layers}}, _ok("mode=eval", "quant=int4"))
    _job(root, "3_mode=train", {"mode": "train", "model": "tiny", "quant": None, "val_ppl": 4.0}, _ok("mode=train"))
    _job(root, "10_mode=qat", None, {"exit_code": 2, "ok": False, "overrides": ["mode=qat", "quant=int8"]})
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_rows_scheme_method_recovery_bits_and_failures(sweep: Path) -> None:
    jobs = [sr.read_job(p) for p in sr.find_job_dirs([str(sweep)])]
    assert [j.path.name for j in jobs] == ["0_mode=ptq", "1_mode=qat", "2_mode=eval", "3_mode=train", "10_mode=qat"]
    rows = {r.job: r for r in sr.build_rows(jobs)}
    ptq, qat = rows["mode=ptq,quant=int4"], rows["mode=qat,quant=int4"]
    assert (ptq.scheme, ptq.method, ptq.ppl_vs_reference) == ("int4 g32", "ptq rtn", 1.25)
    assert ptq.recovered_pct is None
    assert qat.method == "qat"
    assert qat.ppl_vs_reference == pytest.approx(4.25 / 4.0)
    assert qat.recovered_pct == pytest.approx(75.0)  # (5.0 - 4.25) / (5.0 - 4.0)
    ev = rows["mode=eval,quant=int4"]
    assert (ev.scheme, ev.method, ev.decode_tokens_per_s) == ("int4 g32 asym", "eval (qat)", 123.4)
    assert ev.bits_per_weight == pytest.approx(4 + 16 / 32 + 8 / 32)
    assert (rows["mode=train"].scheme, rows["mode=train"].bits_per_weight) == ("fp32", 32.0)
    failed = rows["mode=qat,quant=int8"]
    assert not failed.ok and failed.status == "failed (exit 2)" and failed.val_ppl is None
    assert jobs[1].losses[-1] == (20, 3.0) and jobs[1].val_losses == [(20, 4.9)]  # torn line skipped


def test_recovery_needs_the_same_scheme(sweep: Path) -> None:
    report = json.loads((sweep / "1_mode=qat" / "report.json").read_text())
    report["quant"]["group_size"] = 128
    (sweep / "1_mode=qat" / "report.json").write_text(json.dumps(report))
    rows = sr.build_rows([sr.read_job(p) for p in sr.find_job_dirs([str(sweep)])])
    assert all(r.recovered_pct is None for r in rows)


def test_run_dirs_sweeps_and_duplicates(sweep: Path) -> None:
    one = sweep / "1_mode=qat"
    dirs = sr.find_job_dirs([str(one), str(sweep), str(one)])
    assert len(dirs) == 5 and dirs[0] == one
    with pytest.raises(ConfigError, match="not a directory"):
        sr.find_job_dirs([str(sweep / "nope")])
    empty = sweep.parent / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no run"):
        sr.find_job_dirs([str(empty)])


def _ctx(tmp: Path, runs: list[str]) -> RunContext:
    cfg = compose_cfg(["mode=report", f"runs=[{','.join(runs)}]"])
    return RunContext(cfg=cfg, run_dir=tmp / "report_run", device=torch.device("cpu"))


def test_mode_report_writes_table_and_notes_missing_matplotlib(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert MODES["report"] is sr.run_report
    monkeypatch.setattr(sr, "plot_available", lambda: False)
    out = run(_ctx(tmp_path, [str(sweep)]))
    assert (out["jobs"], out["failed"], out["plot"]) == (5, 1, None)
    table = json.loads((tmp_path / "report_run" / sr.TABLE_FILE).read_text())
    assert [r["job"] for r in table["rows"]][:2] == ["mode=ptq,quant=int4", "mode=qat,quant=int4"]
    assert json.loads((tmp_path / "report_run" / "report.json").read_text())["mode"] == "report"
    text = capsys.readouterr().out
    assert "matplotlib is not installed" in text and "75.0%" in text
    assert not (tmp_path / "report_run" / sr.PLOT_FILE).exists()
    # a second report over the first report's dir skips it (it is not a run)
    again = run(_ctx(tmp_path / "b", [str(sweep), str(tmp_path / "report_run")]))
    assert again["jobs"] == 5


def test_plot_is_a_png(sweep: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = run(_ctx(tmp_path, [str(sweep)]))
    png = Path(out["plot"])
    assert png.name == sr.PLOT_FILE and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recovery_is_blank_when_ptq_barely_moved(sweep: Path) -> None:
    report = json.loads((sweep / "0_mode=ptq" / "report.json").read_text())
    report["val_ppl"] = 4.01  # 0.25% above the reference: a ratio of noise
    (sweep / "0_mode=ptq" / "report.json").write_text(json.dumps(report))
    rows = sr.build_rows([sr.read_job(p) for p in sr.find_job_dirs([str(sweep)])])
    assert all(r.recovered_pct is None for r in rows)
