"""The console summary of report.json, the number format of every table, and report fields."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from qtrain.modes.context import RunContext
from qtrain.modes.dispatch import run
from qtrain.modes.results import summary_table
from qtrain.report_format import fmt_number
from tests.conftest import compose_cfg


def test_summary_counts_per_layer_specs_instead_of_listing_them() -> None:
    layers = {f"blocks.{i}.attn.qkv": {"scheme": "int4", "bits": 4} for i in range(24)}
    report = {"mode": "eval", "quant": {"config": {"scheme": "int4", "group_size": 32}, "state": "packed",
                                        "layers": layers}, "val_ppl": 6.44449}
    console = Console(width=200, record=True)
    console.print(summary_table(report))
    text = console.export_text()
    assert "layers=24 layers" in text and "config=(scheme=int4, group_size=32)" in text
    assert "blocks.3.attn.qkv" not in text and "6.4445" in text


def test_one_number_format_small_numbers_in_scientific_notation() -> None:
    assert fmt_number(2.345678e-5) == "2.3457e-05"  # a KL, never 0.0000
    assert (fmt_number(0.0), fmt_number(None), fmt_number(2_974_838)) == ("0", "", "2,974,838")
    assert (fmt_number(4.65612), fmt_number(11.83), fmt_number(143.5232)) == ("4.6561", "11.830", "143.52")
    assert fmt_number(12_345.6) == "12,346"
    assert (fmt_number(1246.3, digits=3), fmt_number(142.63, digits=3), fmt_number(0.0083212, digits=3)) == (
        "1,246", "143", "0.00832")
    assert (fmt_number(0.25, sign=True, digits=3), fmt_number(-1.3624, sign=True, digits=3)) == ("+0.250", "-1.36")
    assert fmt_number(float("nan")) == "nan"
    console = Console(width=200, record=True)
    console.print(summary_table({"mode": "eval", "logit_kl": 2.345678e-5, "top1_agreement": 0.99951,
                                 "checkpoint_bytes": 232_456, "elapsed_s": 3.5}))
    text = console.export_text()
    assert "2.3457e-05" in text and "0.0000" not in text and "0.99951" in text and "232,456" in text


def test_eval_report_model_size_apart_from_checkpoint_and_bench_time_inside_elapsed(tmp_path: Path) -> None:
    fixture = Path(__file__).resolve().parents[2] / "fixtures" / "v2_int4"
    cfg = compose_cfg(["mode=eval", f"init_from={fixture}", "data.val_windows=2", "eval.decode_tokens=4",
                       "eval.decode_repeats=1", "eval.prefill_tokens=8"])
    report = run(RunContext(cfg=cfg, run_dir=tmp_path / "e", device=torch.device("cpu")))
    assert report["model_bytes"] == (fixture / "model.safetensors").stat().st_size
    assert report["checkpoint_bytes"] > report["model_bytes"]  # the fixture also holds trainer state
    assert 0 < report["bench_s"] <= report["elapsed_s"]
    assert report["decode_tokens_per_s"] > 0 and report["prefill_tokens_per_s"] > 0
    assert json.loads((tmp_path / "e" / "report.json").read_text())["elapsed_s"] == report["elapsed_s"]
