"""The console summary of report.json."""

from __future__ import annotations

from rich.console import Console

from qtrain.report import summary_table


def test_summary_counts_per_layer_specs_instead_of_listing_them() -> None:
    layers = {f"blocks.{i}.attn.qkv": {"scheme": "int4", "bits": 4} for i in range(24)}
    report = {"mode": "eval", "quant": {"config": {"scheme": "int4", "group_size": 32}, "state": "packed",
                                        "layers": layers}, "val_ppl": 6.44449}
    console = Console(width=200, record=True)
    console.print(summary_table(report))
    text = console.export_text()
    assert "layers=24 layers" in text and "config=(scheme=int4, group_size=32)" in text
    assert "blocks.3.attn.qkv" not in text and "6.4445" in text
