"""Decode GEMVs (1..8 rows) over the canonical packed buffers: Triton, one kernel per layer call.

A decode step at ``model=1b`` reads ~1 GB of bf16 weights (~0.25 GB int4 g32) per token, a
few MB per layer: on an H200 (~4.8 TB/s) a layer is a few microseconds of memory traffic, so
what counts is reading each weight byte once, at full width, from every SM at once. These
kernels give each program ``BLOCK_N`` output rows (a 2048-row layer: 128-512 programs), stream
their bytes over K with coalesced loads, dequantize in registers and accumulate in float32;
the activation rows (at most :data:`GEMV_MAX_ROWS`) are re-read from L1/L2. No tensor cores,
no split-K (each program finishes its rows: one kernel, no atomics, no second pass).

Tiles are autotuned on CUDA per (row bucket, N, K) over :data:`GEMV_CONFIGS`
(``QTRAIN_TRITON_AUTOTUNE=0``: :data:`GEMV_DEFAULT`); under ``TRITON_INTERPRET=1`` they run on
CPU tensors (tests).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qtrain.quant.cuda import kernels as K

GEMV_MAX_ROWS = 8
"""Rows the GEMV kernels take (one accumulator row each)."""

GEMV_CONFIGS = (  # (BLOCK_N, BLOCK_B: packed bytes (int4) / codes (int8) per row per step, num_warps, num_stages)
    (4, 512, 4, 2),
    (8, 256, 4, 2),
    (8, 512, 4, 2),
    (16, 256, 8, 2),
    (2, 1024, 4, 2),
)
"""Candidate tiles: 2-16 output rows per program, 2-8 KiB of weight per step."""

GEMV_DEFAULT = {"BLOCK_N": 16, "BLOCK_B": 128, "num_warps": 4}
"""Tile without autotuning (and under the interpreter)."""


def _rows(x: Tensor, k: int, name: str) -> Tensor:
    x2 = K._prepare_x(x, k, name)
    if x2.shape[0] > GEMV_MAX_ROWS:
        raise ValueError(f"{name}: {x2.shape[0]} rows, the GEMV takes at most {GEMV_MAX_ROWS}")
    return x2


def _launch_gemv(name: str, n: int, k_key: int, m: int, args: tuple[Any, ...], meta: dict[str, Any]) -> None:
    """Launch GEMV kernel ``name`` (autotuned on CUDA) over ``cdiv(N, BLOCK_N)`` programs."""
    dev = args[0].device
    block_m = 1 << max(m - 1, 0).bit_length()
    args = (*args, block_m)  # m_bucket: the autotune key of the row count
    block = "BLOCK_B" if name.startswith("int4") else "BLOCK_K"
    if K.autotune_on(dev):
        configs = GEMV_CONFIGS
        key = ["m_bucket", "N", "KB" if block == "BLOCK_B" else "K"]
        kernel = K._tuned(name, configs, ("BLOCK_N", block), key, graph=True)

        def grid(meta_: dict[str, Any]) -> tuple[int]:
            return (K.triton_cdiv(n, meta_["BLOCK_N"]),)

        K.launch(kernel, grid, dev, args, {**meta, "BLOCK_M": block_m})
        return
    cfg = {"BLOCK_N": GEMV_DEFAULT["BLOCK_N"], block: GEMV_DEFAULT["BLOCK_B"], "num_warps": GEMV_DEFAULT["num_warps"]}
    grid_ = (K.triton_cdiv(n, cfg["BLOCK_N"]),)
    K.launch(getattr(K._src(), name), grid_, dev, args, {**meta, **cfg, "BLOCK_M": block_m})


def int4_gemv(
    x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ W^T (+ bias)`` for at most :data:`GEMV_MAX_ROWS` rows and an int4 weight (decode).

    Args:
        x: ``[..., K]`` activations (cast to bf16), at most 8 rows in all.
        packed: ``uint8 [N, K/2]`` codes 0..15, low nibble = even column.
        scales: ``[N, G]`` scales, ``G = K / group_size``.
        zeros: ``uint8 [N, G]`` zero points, or None for the implicit 8 (symmetric).
        group_size: columns per group, or -1 for one group per row.
        bias: optional ``[N]`` bias, added in float32 after the product.

    Returns:
        bf16 ``[..., N]``.

    Raises:
        ValueError: shapes that do not fit together, or too many rows.
        RuntimeError: no Triton on this device.
    """
    name = "int4_gemv"
    K._check(x.device, name)
    n, k, group = K._int4_shape(name, packed, scales, zeros, group_size)
    x2 = _rows(x, k, name)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    p, s = packed.contiguous(), scales.contiguous()
    z = s if zeros is None else zeros.contiguous()
    b = K._bias(bias, n, name, s)
    args = (x2, p, s, z, b, y, m, n, k // 2, s.shape[1], x2.stride(0), p.stride(0), s.stride(0), y.stride(0))
    meta = {
        "GROUP_B": K.group_bytes(group, k),
        "HAS_ZERO": zeros is not None,
        "ZERO": K.INT4_ZERO,
        "HAS_BIAS": bias is not None,
    }
    _launch_gemv("int4_gemv_kernel", n, k // 2, m, args, meta)
    return y.reshape(*x.shape[:-1], n)


def int8_gemv(x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(x @ codes^T) * scale (+ bias)`` for at most :data:`GEMV_MAX_ROWS` rows (int8 weight-only decode).

    Args:
        x: ``[..., K]`` activations (cast to bf16), at most 8 rows in all.
        w: ``int8 [N, K]`` codes.
        scales: ``[N, 1]`` (or ``[N]``) per-channel scales.
        bias: optional ``[N]`` bias.

    Returns:
        bf16 ``[..., N]``.

    Raises:
        ValueError: shapes that do not fit together, or too many rows.
        RuntimeError: no Triton on this device.
    """
    name = "int8_gemv"
    K._check(x.device, name)
    n, k = w.shape
    if scales.numel() != n:
        raise ValueError(f"{name}: {scales.numel()} scales for N={n} output features")
    x2 = _rows(x, k, name)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    wc, s = w.contiguous(), scales.reshape(-1).contiguous()
    b = K._bias(bias, n, name, s)
    args = (x2, wc, s, b, y, m, n, k, x2.stride(0), wc.stride(0), y.stride(0))
    _launch_gemv("int8_gemv_kernel", n, k, m, args, {"HAS_BIAS": bias is not None})
    return y.reshape(*x.shape[:-1], n)
