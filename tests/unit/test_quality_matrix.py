"""scripts/quality_matrix.py without qtrain runs: the pystdlib corpus, the metrics, resume and skip."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

# Made-up val ppl per arm for the fake runner; recoveries and shares below follow from these.
PPL = {"fp": 4.0, "ptq_int8": 4.004, "ptq_int4_g32_rtn": 4.2, "ptq_int4_g32_mse": 4.15, "ptq_int4_g32_gptq": 4.1,
       "ptq_int8da_int4w_rtn": 4.22, "ptq_int8da_int4w_gptq": 4.11, "control_fp": 3.9, "control_ptq_int4": 4.1,
       "control_ptq_int8da_int4w": 4.12, "qat_int4_default": 3.95, "qat_int8da_int4w_default": 4.01,
       "ptq_int4_g32_gptq_noact": 4.15, "ptq_int8da_int4w_gptq_noact": 4.2,
       "control_fp_floor10": 3.92, "control_ptq_int4_floor10": 4.12, "control_ptq_int8da_int4w_floor10": 4.14,
       "qat_int4_floor10": 4.02, "qat_int8da_int4w_floor10": 4.03}


@pytest.fixture(scope="module")
def qm():
    sys.path.insert(0, str(SCRIPTS))  # scripts/ is not a package
    try:
        return importlib.import_module("quality_matrix")
    finally:
        sys.path.remove(str(SCRIPTS))


class FakeQtrain:
    """Stands in for `subprocess.run` of `python -m qtrain`: writes report.json into hydra.run.dir."""

    def __init__(self, fail: dict[str, int] | None = None):
        self.calls: list[list[str]] = []
        self.fail = fail or {}

    def __call__(self, cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        self.calls.append(cmd)
        run_dir = Path(next(a for a in cmd if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        if run_dir.name in self.fail:
            return subprocess.CompletedProcess(cmd, self.fail[run_dir.name], "", "boom")
        quant = next((a.split("=", 1)[1] for a in cmd if a.startswith("quant=")), "none")
        run_dir.mkdir(parents=True, exist_ok=True)
        report = {"val_ppl": PPL[run_dir.name], "quant": {"scheme": quant}, "elapsed_s": 1.0}
        (run_dir / "report.json").write_text(json.dumps(report))
        return subprocess.CompletedProcess(cmd, 0, "", "")


def make_matrix(qm, out: Path, runner: FakeQtrain):
    proto = qm.protocol(quick=True)
    arms = qm.plan(proto, qm.qat_variants([], []))
    return qm.Matrix(out, proto, arms, {"pydocs": ["data=pydocs"]}, run=runner)


def ran(runner: FakeQtrain) -> list[str]:
    return [Path(c[-1].split("=", 1)[1]).name for c in runner.calls]


def test_stdlib_corpus_is_sorted_filtered_capped_and_built_once(qm, tmp_path):
    root = tmp_path / "lib"
    files = {"b.py": "b = 2\n", "a/x.py": "x = 1", "a/test/t.py": "t", "tests/u.py": "u",
             "site-packages/s.py": "s", "a/__pycache__/y.py": "y", "c.txt": "c"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "z.py").write_bytes(b"\xff\xfe not utf-8\n")
    dest = tmp_path / "out" / "corpora" / "pystdlib.txt"
    meta = qm.build_stdlib_corpus(dest, root=root)
    text = "# file: a/x.py\nx = 1\n# file: b.py\nb = 2\n"
    assert dest.read_text() == text
    assert meta["sha256"] == hashlib.sha256(text.encode()).hexdigest() and meta["bytes"] == len(text)
    assert meta["files"] == 2 and meta["skipped_not_utf8"] == ["z.py"] and meta["python"]
    (root / "b.py").write_text("changed\n")  # built once: a second call reuses the file
    assert qm.build_stdlib_corpus(dest, root=root) == meta and dest.read_text() == text
    dest.write_text(text + "edited\n")
    with pytest.raises(qm.UsageError, match="does not match"):
        qm.build_stdlib_corpus(dest, root=root)
    small = qm.build_stdlib_corpus(tmp_path / "small" / "pystdlib.txt", root=root, cap=22)
    assert (tmp_path / "small" / "pystdlib.txt").read_text() == "# file: a/x.py\nx = 1\n"  # cut at a line end
    assert small["files"] == 1 and small["last_file"] == "a/x.py"


def test_stdlib_files_of_this_python_leave_out_tests_and_site_packages(qm):
    rels = qm.stdlib_files(Path(sysconfig.get_paths()["stdlib"]))
    assert "os.py" in rels and "json/decoder.py" in rels and rels == sorted(rels)
    parts = {p for rel in rels for p in rel.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}


def test_metrics_recovery_and_aggregates(qm):
    arms = {k: {"ppl": v} for k, v in PPL.items()}
    m = qm.cell_metrics(arms, {"qat_int4_default": "int4", "qat_int8da_int4w_default": "int8da_int4w"})
    approx = pytest.approx  # plain float arithmetic on the values above: rounding only
    assert m["int8_ratio"] == approx(1.001) and m["int4_rtn_gap"] == approx(0.05)
    assert m["int4_mse_closed"] == approx(0.25) and m["int4_gptq_closed"] == approx(0.5)
    assert m["w4a8_gptq_closed"] == approx(0.5)
    assert m["int4_gptq_noact_closed"] == approx(0.25) and m["w4a8_gptq_noact_closed"] == approx(1 / 11)
    assert m["recovery_int4_default"] == approx(0.75)  # (4.1 - 3.95) / (4.1 - 3.9)
    assert m["recovery_int8da_int4w_default"] == approx(0.5)  # (4.12 - 4.01) / (4.12 - 3.9)
    del arms["control_fp"]
    arms["ptq_int4_g32_gptq"] = {"failed": "exit 4"}
    m = qm.cell_metrics(arms, {"qat_int4_default": "int4"})
    assert m["recovery_int4_default"] == "missing" and m["int4_gptq_closed"] == "failed"
    assert qm.closed(4.0, 3.9, 4.0) == "n/a"  # no gap to close
    a = qm.aggregate([0.8, "missing", 0.9, 0.7], "share")
    assert a["n"] == 3 and a["of"] == 4 and a["mean"] == approx(0.8) and a["sd"] == approx(0.1)
    assert a["worst"] == 0.7 and qm.aggregate([0.01, 0.03], "gap")["worst"] == 0.03
    assert qm.aggregate(["failed"], "share") == {"n": 0, "of": 1, "mean": None, "sd": None, "worst": None}


def test_matched_variant_has_its_own_control(qm, tmp_path):
    runner = FakeQtrain()
    proto = qm.protocol(quick=True)
    arms = qm.plan(proto, qm.qat_variants([], []), "all", qm.matched(["floor10=train.min_lr_ratio=0.1"]))
    m = qm.Matrix(tmp_path, proto, arms, {"pydocs": ["data=pydocs"]}, run=runner)
    m.cell("pydocs", 3)
    assert set(ran(runner)) == set(PPL)
    for name in ("control_fp_floor10", "qat_int4_floor10", "qat_int8da_int4w_floor10"):
        call = next(c for c in runner.calls if c[-1].endswith(name))
        assert call[-3] == "train.min_lr_ratio=0.1" and f"init_from={tmp_path / 'pydocs' / 'seed3' / 'fp'}" in call
    ctl = next(c for c in runner.calls if c[-1].endswith("control_ptq_int4_floor10"))
    assert f"init_from={tmp_path / 'pydocs' / 'seed3' / 'control_fp_floor10'}" in ctl
    s = qm.summarize(tmp_path, [("pydocs", 3)], {})
    got = s["cells"][0]["metrics"]
    assert got["recovery_int4_floor10"] == pytest.approx(0.5)  # (4.12 - 4.02) / (4.12 - 3.92): its own control
    assert got["recovery_int4_default"] == pytest.approx(0.75)  # the default control
    with pytest.raises(qm.UsageError, match="--variant"):
        qm.matched(["default=x"])


def test_matrix_runs_each_arm_once_and_resumes(qm, tmp_path):
    runner = FakeQtrain()
    m = make_matrix(qm, tmp_path, runner)
    m.cell("pydocs", 7)
    cell = tmp_path / "pydocs" / "seed7"
    assert ran(runner) == [name for name, _, _ in m.arms] and set(ran(runner)) == set(PPL) - {
        n for n in PPL if n.endswith("floor10")}
    qat = next(c for c in runner.calls if c[-1].endswith("qat_int4_default"))
    assert f"init_from={cell / 'fp'}" in qat and "seed=7" in qat and "data=pydocs" in qat
    assert "train.max_steps=20" in qat and "data.val_windows=8" in qat
    runner.calls.clear()
    m.cell("pydocs", 7)
    assert runner.calls == []  # every report exists: nothing runs again
    (cell / "ptq_int4_g32_gptq" / "report.json").unlink()
    (cell / "ptq_int4_g32_gptq" / "checkpoints").mkdir()  # a PTQ cut short before its report
    m.cell("pydocs", 7)
    assert ran(runner) == ["ptq_int4_g32_gptq"] and "overwrite=true" in runner.calls[0]


def test_failed_arm_is_logged_and_blocks_what_starts_from_it(qm, tmp_path):
    runner = FakeQtrain(fail={"control_fp": 4})
    m = make_matrix(qm, tmp_path, runner)
    m.cell("pydocs", 1)
    cell = tmp_path / "pydocs" / "seed1"
    assert "control_ptq_int4" not in ran(runner) and "qat_int4_default" in ran(runner)
    assert (cell / "control_fp.failed.log").read_text().startswith("exit 4\n")
    assert m.failed == [str(cell / "control_fp")]
    runner.fail.clear()
    m.cell("pydocs", 1)
    assert not (cell / "control_fp.failed.log").exists() and "control_ptq_int4" in ran(runner)
    runner.fail["fp"] = 130
    with pytest.raises(SystemExit, match="resume"):
        m.cell("pydocs", 2)


def test_summary_shows_every_run_and_missing_cells(qm, tmp_path):
    m = make_matrix(qm, tmp_path, FakeQtrain(fail={"qat_int4_default": 4}))
    m.cell("pydocs", 1)
    lsq = tmp_path / "pydocs" / "seed1" / "qat_int4_lsq"  # an arm an earlier command made
    lsq.mkdir()
    (lsq / "report.json").write_text(json.dumps({"val_ppl": 3.92, "quant": {"scheme": "int4"}}))
    s = qm.summarize(tmp_path, [("pydocs", 1), ("pydocs", 2)], {"qat_int4_default": "int4"})
    cells = {(c["corpus"], c["seed"]): c["metrics"] for c in s["cells"]}
    assert cells["pydocs", 1]["recovery_int4_lsq"] == pytest.approx(0.9)  # (4.1 - 3.92) / (4.1 - 3.9)
    assert cells["pydocs", 1]["recovery_int4_default"] == "failed" and cells["pydocs", 2]["fp_ppl"] == "missing"
    assert s["aggregate"]["all"]["int4_gptq_closed"]["n"] == 1 and s["aggregate"]["all"]["fp_ppl"]["of"] == 2
    qm.render(tmp_path, s)
    md = (tmp_path / "matrix.md").read_text()
    assert "| QAT recovery, int4_lsq | 90.0% | missing |" in md and "| QAT recovery, int4_default | failed |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["cells"][1]["metrics"]["fp_ppl"] == "missing"


def test_presets_protocol_and_usage_errors(qm, tmp_path):
    v = qm.qat_variants(["qat_int8da_int4w_distill"], ["lsq=qat.learn_scales=true"])
    assert v["qat_preset_qat_int8da_int4w_distill"] == ("int8da_int4w", ["+experiment=qat_int8da_int4w_distill"])
    assert v["qat_int4_lsq"] == ("int4", ["mode=qat", "quant=int4", "qat.learn_scales=true"])
    for bad in ("ptq_int8", "nope"):
        with pytest.raises(qm.UsageError, match=f"--preset {bad}"):
            qm.preset_scheme(bad)
    with pytest.raises(qm.UsageError, match="--qat-extra"):
        qm.qat_variants([], ["bad name=x"])
    one = qm.qat_variants([], ["int4:kd=qat.distill_weight=1.0 qat.distill_schedule=linear"])
    assert one["qat_int4_kd"] == ("int4", ["mode=qat", "quant=int4", "qat.distill_weight=1.0",
                                           "qat.distill_schedule=linear"])
    assert "qat_int8da_int4w_kd" not in one  # SCHEME:NAME: that scheme's arm only
    lr = dict((a, o) for a, _, o in qm.plan(qm.protocol(quick=False), qm.qat_variants([], ["int4:lr=train.lr=1e-3"])))
    assert lr["qat_int4_lr"][-1] == "train.lr=1e-3" and "train.lr=5e-4" in lr["qat_int4_lr"]  # the arm's key wins
    with pytest.raises(qm.UsageError, match="SCHEME one of"):
        qm.qat_variants([], ["int3:kd=qat.distill=true"])
    full = qm.protocol(quick=False)
    assert "train.max_steps=3000" in full["fp"] and "data.val_windows=-1" in full["common"]
    qm.check_protocol(tmp_path, {"quick": True, "corpora": {"pydocs": None}})
    qm.check_protocol(tmp_path, {"quick": True, "corpora": {"pystdlib": "ab"}})  # a corpus added later
    assert json.loads((tmp_path / "protocol.json").read_text())["corpora"] == {"pydocs": None, "pystdlib": "ab"}
    for other in ({"quick": False, "corpora": {}}, {"quick": True, "corpora": {"pystdlib": "cd"}}):
        with pytest.raises(qm.UsageError, match="another protocol"):
            qm.check_protocol(tmp_path, other)
    assert qm.main(["--corpora", "pydocs,bogus", "--out", str(tmp_path)]) == 2
    assert qm.main(["--corpora", "tinyshakespeare", "--shakespeare", str(tmp_path / "no.txt")]) == 2
    assert qm.main(["--report-only", "--corpora", "pydocs", "--out", str(tmp_path / "r")]) == 0
    assert "| full precision, val ppl | missing | missing | missing |" in (tmp_path / "r" / "matrix.md").read_text()
    (tmp_path / "h" / "pydocs" / "seed1340").mkdir(parents=True)  # an OUT of one held-out seed
    assert qm.main(["--report-only", "--corpora", "pydocs", "--out", str(tmp_path / "h")]) == 0
    assert [c["seed"] for c in json.loads((tmp_path / "h" / "summary.json").read_text())["cells"]] == [1340]
