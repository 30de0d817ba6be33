"""scripts/gpu_check.py: the parts that run without a GPU (kernel checks, static decode step, no-CUDA exit)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qtrain import quant as api
from qtrain.config import QuantConfig

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def gc_triton_ok() -> bool:
    """Whether qtrain's Triton kernels run here (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    from qtrain.quant.cuda import kernels

    return kernels.available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_kernel_checks_pass_on_cpu_and_flag_a_broken_kernel(gc, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = gc.check_kernels(torch.device("cpu"), [(40, 128)], [1, 65])
    assert {r["kernel"] for r in rows} == set(gc.KERNEL_SPECS)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert all(r["fast"] for r in rows)  # the CPU kernels accept this shape
    real = gc.Int4Linear.reference_forward
    monkeypatch.setattr(gc.Int4Linear, "reference_forward", lambda self, x: real(self, x) * 1.1)
    bad = gc.check_kernels(torch.device("cpu"), [(40, 128)], [1], {"int4 g32": gc.KERNEL_SPECS["int4 g32"]})
    assert not bad[0]["ok"]


@pytest.mark.parametrize("scheme", [None, "int4"])
def test_static_decode_step_matches_the_cached_forward(gc, scheme: str | None) -> None:
    model = gc.random_model(gc.MODEL_DRY, torch.device("cpu"), torch.float32)
    if scheme:
        api.convert(model, QuantConfig(scheme=scheme, group_size=32))
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert gc.static_logit_error(model, prompt, 4) < 1e-5
        dec = gc.StaticDecoder(model, prompt, use_graph=False)
        toks = [int(dec.step()) for _ in range(3)]
    assert int(dec.pos) == 5 + 3 and len(toks) == 3
    assert gc.weight_bytes(model) > 0


def test_without_cuda_it_exits_cleanly(gc, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gc.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_a_slow_or_failing_qat_arm_is_reported_not_raised(gc, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    with pytest.raises(gc.ArmTimeout), gc.time_limit(0.05):
        time.sleep(2)

    def broken(*args, **kwargs):
        raise RuntimeError("compile failed\nwith details")

    monkeypatch.setattr(gc, "qat_trainer", broken)
    rows = gc.bench_qat(gc.MODEL_DRY, torch.device("cpu"), 1, 1, [False, True], arm_limit_s=5)
    assert len(rows) == 4 and all(r["error"] == "RuntimeError: compile failed" for r in rows)
    late = gc.bench_qat(gc.MODEL_DRY, torch.device("cpu"), 1, 1, [False], deadline=time.perf_counter())
    assert [r["error"] for r in late] == ["skipped: over the time budget"] * 2


def test_dry_run_measures_decode_and_qat_with_kernel_profiles(gc, tmp_path) -> None:
    out = tmp_path / "gpu.json"
    assert gc.main(["--device", "cpu", "--sections", "decode,qat-8b", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["decode"]["rows"]
    assert [r["scheme"] for r in rows] == ["bf16", "int8", "int4 g32", "int8da_int4w g32", "int4 g32 inductor"]
    assert all("error" not in r and "static_error" not in r and r["static_logit_error"] < 1e-4 for r in rows)
    # one decode step profiled: on the CPU the aten ops (on CUDA the kernels of one graph replay)
    assert all(r["profile"]["kernels"] > 0 and len(r["profile"]["top"]) <= 10 for r in rows), rows
    by_arm = {r["arm"]: r for r in result["qat"]}
    assert list(by_arm) == ["fp", "int4 g32", "int8da_int4w g32"]
    assert all("error" not in r and r["step_ms"] > 0 and r["profile"]["kernels"] > 0 for r in by_arm.values())
    assert by_arm["fp"]["ratio_vs_fp"] == 1.0
    # the fake-quant arms run more ops per step than fp (quantize-dequantize of every block weight)
    assert by_arm["int4 g32"]["profile"]["kernels"] > by_arm["fp"]["profile"]["kernels"]


def test_an_eager_qat_arm_is_not_starved_by_the_compiled_ones(gc) -> None:
    import time

    arms = [(c, n) for c in (False, "regional", "model-cudagraphs") for n in ("fp", "int4 g32", "int8da_int4w g32")]
    deadline = time.perf_counter() + 60
    # bare shares: 60 s / 27 weights = 2.2 s for an eager arm, under the 5 s skip line of bench_qat
    assert gc._arm_limit(arms, 0, 75.0, deadline) >= gc.EAGER_ARM_FLOOR_S - 1
    assert 4 * 60 / 24 - 1 < gc._arm_limit(arms, 3, 75.0, deadline) <= 4 * 60 / 24  # compiled: its share
    assert gc._arm_limit(arms, 0, 75.0, time.perf_counter() + 3) <= 3  # never past the deadline


def test_triton_decode_rows_follow_their_schemes_on_cuda(gc) -> None:
    cuda = torch.device("cuda")
    listed = gc.with_triton_rows(["bf16", "int8", "int4 g32 inductor"], cuda)
    if gc.K.available(cuda):
        assert listed == ["bf16", "int8 triton", "int8", "int4 g32 inductor"]  # no "inductor triton" scheme
        two = gc.with_triton_rows(["bf16", "int8", "int4 g32"], cuda)
        assert two == ["bf16", "int8 triton", "int4 g32 triton", "int8", "int4 g32"]  # new paths before the budget cuts
    else:
        assert listed == ["bf16", "int8", "int4 g32 inductor"]
    assert gc.with_triton_rows(["int8"], torch.device("cpu")) == ["int8"]  # dry runs: not under the interpreter
    assert [gc.decode_kernel(s) for s in ("int8", "int4 g32 triton", "int4 g32 inductor")] == [
        "tinygemm",
        "triton",
        "inductor",
    ]


@pytest.mark.skipif(not gc_triton_ok(), reason="needs Triton on CUDA or TRITON_INTERPRET=1")
def test_triton_decode_row_runs_fastdecoder_with_the_triton_gemv(gc) -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = gc.random_model(gc.MODEL_DRY, dev, torch.float32)
    row = gc.decode_one(base, "int4 g32 triton", 2, False, 10.0)
    assert row["decode_kernel"] == "triton" and "eager_tokens_per_s" not in row  # eager: the plain row's
    assert "static_error" not in row and row["static_tokens_per_s"] > 0, row
    # bf16 activations and weights in the GEMV against the float32 eager path: 2^-5 of the largest logit
    assert row["static_logit_error"] < 2**-5


@pytest.mark.skipif(not gc_triton_ok(), reason="needs Triton on CUDA or TRITON_INTERPRET=1")
def test_layer_times_put_every_candidate_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    from qtrain.quant import kernels as table
    from qtrain.quant.cuda import bench

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls: list[int] = []

    def once(fn, device, reps=20, *args):  # noqa: ANN001, ANN202 - one call, a stand-in clock
        fn()
        calls.append(1)
        return 2.0

    monkeypatch.setattr(bench, "graph_us", once)
    monkeypatch.setattr(bench, "wall_us", once)

    def no_compiler(w):  # noqa: ANN001, ANN202 - a failing candidate is reported, not raised
        raise RuntimeError("no compiler here\ndetails")

    monkeypatch.setattr(table, "int8_gemv_cuda", no_compiler)
    w = (torch.randn(24, 64, generator=torch.Generator().manual_seed(0)) * 0.05).to(dev, torch.bfloat16)
    r = bench.layer_times(w, dev, prefill_rows=9)
    assert r["errors"]["decode int8 compiled_gemv"] == "RuntimeError: no compiler here"
    for name in ("decode bf16", "decode int4 triton_gemv", "decode int8 triton_gemv", "prefill int4 triton_gemm"):
        assert r["us"][name] == 2.0, name
    assert "prefill int8 triton_dequant" in r["us"] and "prefill bf16" in r["us"]
    # GB/s of the int4 GEMV: packed bytes (N*K/2) + bf16 scales (N*K/32*2) over 2 us
    assert r["gbs"]["decode int4 triton_gemv"] == pytest.approx((24 * 32 + 24 * 2 * 2) / 2.0 / 1e3)
    assert list(r["wall_us"]) == [
        f"{m} {what}" for m in ("1 row", "9 rows") for what in ("bf16", "int8 layer", "int4 layer")
    ]
    assert r["chosen"]["int4"] and r["chosen"]["int8"]  # the table rows the layers ran
