"""mode=report over synthetic run and sweep dirs (no training: hand-written report.json files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qtrain.errors import ConfigError
from qtrain.modes import report as sr
from qtrain.modes.context import RunContext
from qtrain.modes.dispatch import MODES, run
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
    ptq, qat = rows["mode=ptq quant=int4"], rows["mode=qat quant=int4"]
    assert (ptq.scheme, ptq.method, ptq.ppl_vs_reference) == ("int4 g32", "ptq rtn", 1.25)
    assert ptq.recovered_pct is None
    assert qat.method == "qat"
    assert qat.ppl_vs_reference == pytest.approx(4.25 / 4.0)
    assert qat.recovered_pct == pytest.approx(75.0)  # (5.0 - 4.25) / (5.0 - 4.0)
    ev = rows["mode=eval quant=int4"]
    assert (ev.scheme, ev.method, ev.decode_tokens_per_s) == ("int4 g32 asym", "eval (qat)", 123.4)
    assert ev.bits_per_weight == pytest.approx(4 + 16 / 32 + 8 / 32)
    assert (rows["mode=train"].scheme, rows["mode=train"].bits_per_weight) == ("fp32", 32.0)
    failed = rows["mode=qat quant=int8"]
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
    assert [r["job"] for r in table["rows"]][:2] == ["mode=ptq quant=int4", "mode=qat quant=int4"]
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


# ---------------------------------------------------------------- labels, sizes, times, corpora, plot

HOOKS = "hooks=[{_target_:qtrain.quant.hooks.SQNRLogger,every:5}]"
CORPUS_A = {"name": "pydocs", "train_bytes": 10, "train_sha256": "t" * 64, "val_bytes": 5, "val_sha256": "a" * 64}
CORPUS_B = {**CORPUS_A, "val_bytes": 6, "val_sha256": "b" * 64}


def _rep(mode: str, ppl: float, **extra: object) -> dict:
    quant = None if mode == "train" else {**INT4, "method": "rtn" if mode == "ptq" else "qat"}
    return {"mode": mode, "model": "tiny", "quant": quant, "val_ppl": ppl, **extra}


@pytest.fixture
def new_sweep(tmp_path: Path) -> Path:
    """A sweep as qtrain now names it, with sizes, times and corpus fingerprints."""
    root = tmp_path / "new"
    common = ["init_from=/x", "train.max_steps=10", HOOKS]
    _job(root, "0_mode-ptq+quant-int4+sha-0a0a0a0a",
         _rep("ptq", 5.0, reference_val_ppl=4.0, model_bytes=200_000, checkpoint_bytes=210_000, elapsed_s=12.5,
              bench_s=4.25, bits_per_weight=4.5, corpus=CORPUS_A), _ok("mode=ptq", "quant=int4", *common))
    _job(root, "1_mode-qat+quant-int4+sha-1b1b1b1b",
         _rep("qat", 4.5, reference_val_ppl=4.0, model_bytes=200_000, checkpoint_bytes=210_000, elapsed_s=30.0,
              bench_s=4.0, bits_per_weight=4.5, corpus=CORPUS_A), _ok("mode=qat", "quant=int4", *common), losses=3)
    _job(root, "2_mode-qat+quant-int8+sha-2c2c2c2c",
         _rep("qat", 4.4, model_bytes=300_000, checkpoint_bytes=310_000, bits_per_weight=8.0, corpus=CORPUS_B),
         _ok("mode=qat", "quant=int8", *common), losses=3)
    _job(root, "3_mode-train+sha-3d3d3d3d", _rep("train", 4.0), _ok("mode=train", *common), losses=12)
    return root


def test_labels_come_from_the_overrides_and_are_unique(new_sweep: Path, tmp_path: Path) -> None:
    jobs = [sr.read_job(p) for p in sr.find_job_dirs([str(new_sweep)])]
    assert [r.job for r in sr.build_rows(jobs)] == ["mode=ptq quant=int4", "mode=qat quant=int4",
                                                    "mode=qat quant=int8", "mode=train"]
    one = sr.build_rows([sr.read_job(new_sweep / "1_mode-qat+quant-int4+sha-1b1b1b1b")])[0]
    assert one.job == "mode=qat quant=int4 train.max_steps=10 hooks=[SQNRLogger]"  # no path, hooks by class
    copy = tmp_path / "again"
    _job(copy, "0_mode-ptq+quant-int4+sha-0a0a0a0a", _rep("ptq", 5.0), _ok("mode=ptq", "quant=int4"))
    _job(copy, "1_mode-qat+quant-int8+sha-1b1b1b1b", _rep("qat", 4.0), _ok("mode=qat", "quant=int8"))
    rows = sr.build_rows([sr.read_job(p) for p in sr.find_job_dirs([str(new_sweep), str(copy)])])
    labels = [r.job for r in rows]
    assert len(set(labels)) == len(labels)
    assert "mode=ptq quant=int4 (new/0)" in labels and "mode=ptq quant=int4 (again/0)" in labels


def test_model_size_checkpoint_size_and_benchmark_time_are_separate_columns(
    new_sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # an older report without model_bytes: the size comes from the checkpoint's model file
    ckpt = tmp_path / "old_run" / "checkpoints" / "step_0000010"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"x" * 1234)
    _job(tmp_path, "old_run", _rep("train", 4.0, checkpoint=str(ckpt), checkpoint_bytes=3_700), None)
    rows = sr.build_rows([sr.read_job(p) for p in sr.find_job_dirs([str(new_sweep), str(tmp_path / "old_run")])])
    ptq = rows[0]
    assert (ptq.model_bytes, ptq.checkpoint_bytes, ptq.elapsed_s, ptq.bench_s) == (200_000, 210_000, 12.5, 4.25)
    assert (rows[-1].model_bytes, rows[-1].checkpoint_bytes) == (1234, 3_700)
    out = run(_ctx(tmp_path, [str(new_sweep)]))
    text = capsys.readouterr().out
    for header in ("model MB", "ckpt MB", "time s", "bench s"):
        assert header in text
    line = next(t for t in text.splitlines() if "mode=ptq quant=int4" in t)
    cells = [c.strip() for c in line.split("│")[1:-1]]
    assert cells[3:] == ["5.0000", "", "+25.0%", "", "0.200", "0.210", "4.50", "", "12.5", "4.25", "ok"]
    assert out["jobs"] == 4


def test_rows_on_another_validation_corpus_are_flagged(
    new_sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = sr.build_rows([sr.read_job(p) for p in sr.find_job_dirs([str(new_sweep)])])
    assert [r.corpus_differs for r in rows] == [False, False, True, False]  # the run without a fingerprint: not
    out = run(_ctx(tmp_path, [str(new_sweep)]))
    captured = capsys.readouterr()
    assert out["other_val_corpus"] == 1
    assert "4.4000*" in captured.out and "5.0000*" not in captured.out
    assert "another corpus" in captured.err and "mode=qat quant=int8" in captured.err
    table = json.loads((tmp_path / "report_run" / sr.TABLE_FILE).read_text())
    assert [r["corpus_differs"] for r in table["rows"]] == [False, False, True, False]


def test_plot_one_colour_per_run_reference_line_and_legend_outside(new_sweep: Path) -> None:
    pytest.importorskip("matplotlib")
    from qtrain.modes import sweep_plot

    jobs = [sr.read_job(p) for p in sr.find_job_dirs([str(new_sweep)])]
    rows = sr.build_rows(jobs)
    fig = sweep_plot.figure(rows, jobs)
    ax_q, ax_l = fig.axes
    points = [tuple(c.get_facecolor()[0]) for c in ax_q.collections]  # one scatter per run, in row order
    curves = [ln for ln in ax_l.lines if ln.get_linestyle() == "-"]  # training curves (runs with losses)
    assert len(set(points)) == len(points) == 4
    assert [tuple(ln.get_color()) for ln in curves] == [points[1], points[2], points[3]]
    refs = [ln for ln in ax_q.lines if ln.get_linestyle() == "--"]
    assert [ln.get_ydata()[0] for ln in refs] == [4.0]  # the full-precision reference, once
    assert len(curves[0].get_xdata()) == 3 and curves[0].get_marker() == "."  # a short run shows its points
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(set(labels)) == len(labels) == 5 and labels[-1].startswith("full-precision reference")
    assert [("other validation corpus" in t) for t in labels[:4]] == [False, False, True, False]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


def test_garbled_new_fields_give_blank_cells_not_a_crash(tmp_path: Path) -> None:
    bad = {"mode": "ptq", "model": "tiny", "quant": {**INT4, "method": "rtn"}, "val_ppl": 5.0,
           "model_bytes": "big", "checkpoint_bytes": float("inf"), "elapsed_s": [1], "bench_s": True,
           "checkpoint": "a\x00b", "corpus": "pydocs"}
    d = _job(tmp_path / "s", "0_mode-ptq", bad, {"exit_code": 0, "ok": True, "overrides": "mode=ptq"})
    (d / ".hydra" / "overrides.yaml").write_text("- mode=ptq\n")
    (d / "metrics.jsonl").write_text('{"step": "one", "loss": 1.0}\n{"step": 2, "loss": "x"}\n{"step": 3, "loss": 2}\n')
    job = sr.read_job(d)
    row = sr.build_rows([job])[0]
    assert (row.model_bytes, row.checkpoint_bytes, row.elapsed_s, row.bench_s) == (None, None, None, None)
    assert (row.val_corpus_sha256, row.corpus_differs, row.ok) == (None, False, True)
    assert job.overrides == ["mode=ptq"] and job.losses == [(3, 2.0)]  # status.json's were not a list
    assert run(_ctx(tmp_path, [str(d)]))["jobs"] == 1
