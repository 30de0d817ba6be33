"""Python entry points of the Triton kernels: argument checks, tile choice, launch.

Every function takes the canonical packed buffers as they are stored (no repacked copy) and
returns bf16. They run on CUDA tensors where Triton is installed, and on CPU tensors under
``TRITON_INTERPRET=1`` (slow; small shapes only, for tests).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from qtrain.quant.spec import implicit_zero

INT4_ZERO = implicit_zero(4)
"""The int4 codes' implicit zero point (unsigned codes, symmetric weights), from the bit-width table."""

_SRC: list[ModuleType] = []


def why_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can).

    Args:
        device: where the tensors live.

    Returns:
        A one-line reason, or None.
    """
    try:
        missing = importlib.util.find_spec("triton") is None
    except ValueError:  # a stand-in module without a spec
        missing = True
    if missing:
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"no Triton kernels on {device.type} (CUDA, or CPU with TRITON_INTERPRET=1)"


def available(device: torch.device) -> bool:
    """Whether :func:`int4_gemm` and :func:`int8_gemm` run on ``device``."""
    return why_unavailable(device) is None


def _src() -> ModuleType:
    if not _SRC:
        from qtrain.quant.cuda import _triton_src  # imports triton; jit reads TRITON_INTERPRET now

        _SRC.append(_triton_src)
    return _SRC[0]


AUTOTUNE_CONFIGS = (  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), Hopper-class candidates
    (128, 128, 64, 8, 3),
    (64, 128, 128, 4, 4),
    (128, 64, 128, 4, 4),
    (64, 64, 128, 4, 4),
)
"""Tile configs tried on CUDA per (row bucket, N, K) (``QTRAIN_TRITON_AUTOTUNE=0``: :func:`tile_config` only)."""


def tile_config(m: int, n: int, sms: int = 132) -> dict[str, Any]:
    """Tile sizes and launch options for an ``[m, K] x [K, n]`` product without autotuning.

    Largest tiles first, smaller ones while the grid would leave streaming multiprocessors idle.

    Args:
        m: rows (tokens).
        n: output features.
        sms: streaming multiprocessors of the device.

    Returns:
        ``BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages`` and ``DOT_F32`` (the
        interpreter: bf16 operands dotted in float32, its bf16 dot being wrong).
    """
    block_m, block_n = 128, 128
    while block_m > 16 and (block_m // 2 >= m or 4 * triton_cdiv(m, block_m) * triton_cdiv(n, block_n) < 3 * sms):
        block_m //= 2
    if block_m <= 32 and n <= 64:
        block_n = 64
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": 64 if block_m >= 128 else 128,
        "GROUP_M": 8,
        "num_warps": warps,
        "num_stages": 3,
        "DOT_F32": os.environ.get("TRITON_INTERPRET") == "1",
    }


def m_bucket(m: int) -> int:
    """Power of two >= m (at most 4096): the autotuning key of the row count."""
    return min(1 << max(m - 1, 0).bit_length(), 4096)


def _tuned(name: str) -> Any:
    """The autotuned (CUDA) version of kernel ``name``, built once."""
    key = f"tuned_{name}"
    src = _src()
    if not hasattr(src, key):
        import triton

        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in AUTOTUNE_CONFIGS
        ]
        setattr(src, key, triton.autotune(configs=configs, key=["m_bucket", "N", "K"])(getattr(src, name)))
    return getattr(src, key)


def _run(name: str, m: int, n: int, args: tuple[Any, ...], meta: dict[str, Any]) -> None:
    """Launch kernel ``name``: autotuned on CUDA, :func:`tile_config` elsewhere (or when disabled)."""
    dev = args[0].device
    args = (*args, m_bucket(m))
    if dev.type == "cuda" and os.environ.get("QTRAIN_TRITON_AUTOTUNE", "1") != "0":
        kernel = _tuned(name)

        def grid(meta_: dict[str, Any]) -> tuple[int]:
            return (triton_cdiv(m, meta_["BLOCK_M"]) * triton_cdiv(n, meta_["BLOCK_N"]),)

        with torch.cuda.device(dev):
            kernel[grid](*args, **meta, DOT_F32=False)
        return
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    cfg = tile_config(m, n, sms)
    fixed_grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]),)
    kernel = getattr(_src(), name)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            kernel[fixed_grid](*args, **meta, **cfg)
    else:
        kernel[fixed_grid](*args, **meta, **cfg)


def _prepare_x(x: Tensor, k: int, name: str) -> Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"{name}: x has {x.shape[-1]} input features, the weight {k}")
    x2 = x.reshape(-1, k)
    return x2.to(torch.bfloat16).contiguous()


def _check(device: torch.device, name: str) -> None:
    why = why_unavailable(device)
    if why is not None:
        raise RuntimeError(f"{name}: {why}")


def _int4_shape(
    name: str, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int
) -> tuple[int, int, int]:
    """``(N, K, group)`` of an int4 layer's buffers; ValueError naming ``name`` when they do not fit."""
    n, k = packed.shape[0], packed.shape[1] * 2
    group = k if group_size == -1 else group_size
    if group % 2 or k % group or tuple(scales.shape) != (n, k // group):
        raise ValueError(f"{name}: scales {tuple(scales.shape)} do not fit N={n}, K={k}, group_size={group_size}")
    if zeros is not None and zeros.shape != scales.shape:
        raise ValueError(f"{name}: zeros {tuple(zeros.shape)} != scales {tuple(scales.shape)}")
    return n, k, group


def int4_gemm(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int) -> Tensor:
    """``x @ W^T`` for an int4 weight, dequantized tile by tile inside the GEMM.

    Args:
        x: ``[..., K]`` activations (cast to bf16).
        packed: ``uint8 [N, K/2]`` codes 0..15, low nibble = even column.
        scales: ``[N, G]`` scales (bf16 values), ``G = K / group_size``.
        zeros: ``uint8 [N, G]`` zero points, or None for the implicit 8 (symmetric).
        group_size: columns per group, or -1 for one group per row.

    Returns:
        bf16 ``[..., N]``.

    Raises:
        ValueError: shapes that do not fit together.
        RuntimeError: no Triton on this device (see :func:`why_unavailable`).
    """
    name = "int4_gemm"
    _check(x.device, name)
    n, k, group = _int4_shape(name, packed, scales, zeros, group_size)
    x2 = _prepare_x(x, k, name)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    p, s = packed.contiguous(), scales.contiguous()
    z = s if zeros is None else zeros.contiguous()
    _run(
        "int4_gemm_kernel",
        m,
        n,
        (x2, p, s, z, y, m, n, k, x2.stride(0), p.stride(0), s.stride(0), y.stride(0)),
        {"GROUP": group, "HAS_ZERO": zeros is not None, "ZERO": INT4_ZERO},
    )
    return y.reshape(*x.shape[:-1], n)


def int8_gemm(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """``(x @ codes^T) * scale`` for an int8 weight-only layer, dequantized inside the GEMM.

    Args:
        x: ``[..., K]`` activations (cast to bf16).
        w: ``int8 [N, K]`` codes.
        scales: ``[N, 1]`` (or ``[N]``) per-channel scales.

    Returns:
        bf16 ``[..., N]``.

    Raises:
        ValueError: shapes that do not fit together.
        RuntimeError: no Triton on this device.
    """
    name = "int8_gemm"
    _check(x.device, name)
    n, k = w.shape
    if scales.numel() != n:
        raise ValueError(f"{name}: {scales.numel()} scales for N={n} output features")
    x2 = _prepare_x(x, k, name)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    wc, s = w.contiguous(), scales.reshape(-1).contiguous()
    _run("int8_gemm_kernel", m, n, (x2, wc, s, y, m, n, k, x2.stride(0), wc.stride(0), y.stride(0)), {})
    return y.reshape(*x.shape[:-1], n)


DEQUANT_BLOCK = (64, 128)
"""(rows, stored columns) per program of the dequantize kernels: 8-16 KiB read, 16-32 KiB written."""


def _launch(kernel_name: str, device: torch.device, grid: tuple[int, int], *args: Any, **meta: Any) -> None:
    kernel = getattr(_src(), kernel_name)
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def dequant_int4(packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int) -> Tensor:
    """bf16 ``[N, K]`` weight of an int4 layer in one kernel (one read of the codes, one write).

    Bit-exact to ``primitives.dequantize(unpack_int4(packed), scales, zeros, 4, group_size)``
    rounded to bf16 (the product is exact in float32; one rounding). Followed by cuBLAS
    ``F.linear`` this is the many-row (prefill) path of CUDA int4 layers.

    Args:
        packed: ``uint8 [N, K/2]`` codes 0..15, low nibble = even column.
        scales: ``[N, G]`` scales (bf16 values).
        zeros: ``uint8 [N, G]`` zero points, or None for the implicit 8.
        group_size: columns per group, or -1 for one group per row.

    Returns:
        bf16 ``[N, K]``.

    Raises:
        ValueError: shapes that do not fit together.
        RuntimeError: no Triton on this device.
    """
    name = "dequant_int4"
    _check(packed.device, name)
    n, k, group = _int4_shape(name, packed, scales, zeros, group_size)
    kb = k // 2
    w = torch.empty(n, k, dtype=torch.bfloat16, device=packed.device)
    if n == 0 or k == 0:
        return w
    p, s = packed.contiguous(), scales.contiguous()
    z = s if zeros is None else zeros.contiguous()
    bn, bb = DEQUANT_BLOCK
    grid = (triton_cdiv(n, bn), triton_cdiv(kb, bb))
    meta = {"GROUP": group, "HAS_ZERO": zeros is not None, "ZERO": INT4_ZERO, "BLOCK_N": bn, "BLOCK_B": bb}
    _launch("dequant_int4_kernel", packed.device, grid, p, s, z, w, n, kb, p.stride(0), s.stride(0), k, **meta)
    return w


def dequant_int8(codes: Tensor, scales: Tensor) -> Tensor:
    """bf16 ``[N, K]`` weight ``code * scale`` of an int8 layer in one kernel (bit-exact, see :func:`dequant_int4`).

    Args:
        codes: ``int8 [N, K]``.
        scales: ``[N, 1]`` (or ``[N]``) per-channel scales.

    Returns:
        bf16 ``[N, K]``.

    Raises:
        ValueError: the scales do not fit.
        RuntimeError: no Triton on this device.
    """
    name = "dequant_int8"
    _check(codes.device, name)
    n, k = codes.shape
    if scales.numel() != n:
        raise ValueError(f"{name}: {scales.numel()} scales for N={n} output features")
    w = torch.empty(n, k, dtype=torch.bfloat16, device=codes.device)
    if n == 0 or k == 0:
        return w
    c, s = codes.contiguous(), scales.reshape(-1).contiguous()
    bn, bk = DEQUANT_BLOCK[0], 2 * DEQUANT_BLOCK[1]
    grid = (triton_cdiv(n, bn), triton_cdiv(k, bk))
    _launch("dequant_int8_kernel", codes.device, grid, c, s, w, n, k, c.stride(0), k, BLOCK_N=bn, BLOCK_K=bk)
    return w


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)
