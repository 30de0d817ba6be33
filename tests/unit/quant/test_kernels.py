"""The kernel table: which kernels a packed layer may run, per device, bit width and shape."""

from __future__ import annotations

import torch

from qtrain.quant import cuda as qcuda
from qtrain.quant import kernels
from qtrain.quant.packed import Int4Linear, Int8Linear
from qtrain.quant.spec import LayerSpec


def _names(mod: Int4Linear | Int8Linear, device: str) -> list[str] | None:
    notes: list[str] = []
    plan = kernels.plan(mod.packed_weights(), torch.device(device), mod.kernel, notes.append)
    return None if plan is None else [row.name for row in plan.rows]


def test_plan_lists_the_table_rows_that_fit_in_preference_order() -> None:
    int4 = Int4Linear.empty(128, 64, LayerSpec("int4", 4, 32), device="meta")
    int8 = Int8Linear.empty(128, 64, LayerSpec("int8", 8), device="meta")
    assert _names(int4, "cpu") == ["native", "torch"]
    assert _names(int8, "cpu") == ["native", "torch"]
    tri = [] if qcuda.why_unavailable(torch.device("cuda")) else ["prefill"]  # where Triton is installed
    # "decode": the measured row (Triton GEMV | tinygemm or the compiled GEMV), taken without Triton too
    assert _names(int4, "cuda") == ["decode", "tinygemm", *tri, "dequant_bf16"]
    assert _names(int8, "cuda") == ["decode", "gemv", *tri, "dequant_bf16"]  # int_mm only with int8 activations
    act8 = Int8Linear.empty(128, 64, LayerSpec("int8", 8, activations="int8"), device="meta")
    assert _names(act8, "cuda") == ["int_mm", "decode", "gemv", *tri, "dequant_bf16"]
    assert _names(int4, "mps") is None


def test_shapes_no_kernel_takes_get_no_plan_and_say_why() -> None:
    notes: list[str] = []
    odd_k = Int8Linear.empty(12, 16, LayerSpec("int8", 8), device="meta")
    assert kernels.plan(odd_k.packed_weights(), torch.device("cpu"), "auto", notes.append) is None
    assert notes == ["_weight_int8pack_mm needs K % 8 == 0, K=12"]  # the aten kernel would crash the process
    g16 = Int4Linear.empty(64, 32, LayerSpec("int4", 4, 16), device="meta")
    assert _names(g16, "cpu") is None and _names(g16, "cuda") is None  # int4 kernels need a group of 32..256
    per_channel = Int4Linear.empty(96, 32, LayerSpec("int4", 4, -1), device="meta")
    assert per_channel.packed_weights().group == 32  # the largest kernel group dividing K=96


def test_rows_serve_their_row_range_only() -> None:
    mod = Int4Linear.from_float(torch.randn(64, 128), LayerSpec("int4", 4, 32), kernel="torch")
    plan = mod._fast(torch.device("cpu"))
    assert plan is not None
    assert plan(torch.randn(kernels.CPU_KERNEL_MAX_ROWS, 128)) is not None
    assert plan(torch.randn(kernels.CPU_KERNEL_MAX_ROWS + 1, 128)) is None  # the layer's reference path then
