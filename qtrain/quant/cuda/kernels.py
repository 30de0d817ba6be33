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
_HAS_TRITON: list[bool] = []


def _triton_installed() -> bool:
    """Whether Triton can be imported (looked up once: this runs on every kernel call)."""
    if not _HAS_TRITON:
        try:
            _HAS_TRITON.append(importlib.util.find_spec("triton") is not None)
        except ValueError:  # a stand-in module without a spec
            _HAS_TRITON.append(False)
    return _HAS_TRITON[0]


def why_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can).

    Args:
        device: where the tensors live.

    Returns:
        A one-line reason, or None.
    """
    if not _triton_installed():
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
    """Every Triton kernel by name (``_triton_src`` and ``_triton_gemv``), imported once."""
    if not _SRC:
        from qtrain.quant.cuda import _triton_gemv, _triton_src  # imports triton; jit reads TRITON_INTERPRET now

        if os.environ.get("TRITON_INTERPRET") == "1":
            _patch_interpreter()
        kernels = ModuleType("qtrain_triton_kernels")
        for mod in (_triton_src, _triton_gemv):
            kernels.__dict__.update({k: v for k, v in vars(mod).items() if k.endswith("_kernel")})
        _SRC.append(kernels)
    return _SRC[0]


def _patch_interpreter() -> None:
    """Triton's interpreter (3.6) turns a scalar kernel argument into a 1-element numpy array,
    which numpy >= 2.4 refuses to use as an index (``range(0, K, BLOCK)`` in a kernel): give its
    tensors an ``__index__`` that reads the one element. CPU tests only; no effect on CUDA."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_qtrain", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._qtrain = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


AUTOTUNE_CONFIGS = (  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), Hopper-class candidates
    (128, 128, 64, 8, 8, 3),
    (128, 256, 64, 8, 8, 3),
    (64, 128, 128, 8, 4, 4),
    (128, 64, 128, 8, 4, 4),
    (64, 64, 128, 8, 4, 4),
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


def _bench(graph: bool) -> Any:
    """The autotuner's timer: CUDA-graph replays for microsecond kernels (a plain timer would
    measure the launch overhead, the same for every config), short event timing otherwise."""
    import triton.testing

    if graph:
        return lambda call, quantiles: triton.testing.do_bench_cudagraph(call, rep=10, quantiles=quantiles)
    return lambda call, quantiles: triton.testing.do_bench(call, warmup=5, rep=20, quantiles=quantiles)


def _tuned(
    name: str, configs: tuple[tuple[int, ...], ...], names: tuple[str, ...], key: list[str], graph: bool = False
) -> Any:
    """The autotuned (CUDA) version of kernel ``name`` over ``configs`` (values of ``names``,
    then ``num_warps, num_stages``), keyed on ``key``; built once. ``graph``: time the configs
    as CUDA-graph replays (decode GEMVs)."""
    attr = f"tuned_{name}"
    src = _src()
    if not hasattr(src, attr):
        import triton

        tconfigs = [
            triton.Config(dict(zip(names, c[: len(names)], strict=True)), num_warps=c[-2], num_stages=c[-1])
            for c in configs
        ]
        tuned = triton.autotune(configs=tconfigs, key=key, do_bench=_bench(graph))(getattr(src, name))
        setattr(src, attr, tuned)
    return getattr(src, attr)


def autotune_on(device: torch.device) -> bool:
    """Whether launches on ``device`` autotune (CUDA, unless ``QTRAIN_TRITON_AUTOTUNE=0``)."""
    return device.type == "cuda" and os.environ.get("QTRAIN_TRITON_AUTOTUNE", "1") != "0"


def launch(kernel: Any, grid: Any, device: torch.device, args: tuple[Any, ...], meta: dict[str, Any]) -> None:
    """``kernel[grid](*args, **meta)`` on ``device`` (switching the current CUDA device only when needed)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _run(name: str, m: int, n: int, args: tuple[Any, ...], meta: dict[str, Any]) -> None:
    """Launch GEMM kernel ``name``: autotuned on CUDA, :func:`tile_config` elsewhere (or when disabled)."""
    dev = args[0].device
    args = (*args, m_bucket(m))
    if autotune_on(dev):
        kernel = _tuned(name, AUTOTUNE_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), ["m_bucket", "N", "K"])

        def grid(meta_: dict[str, Any]) -> tuple[int]:
            return (triton_cdiv(m, meta_["BLOCK_M"]) * triton_cdiv(n, meta_["BLOCK_N"]),)

        launch(kernel, grid, dev, args, {**meta, "DOT_F32": False})
        return
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    cfg = tile_config(m, n, sms)
    fixed_grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]),)
    launch(getattr(_src(), name), fixed_grid, dev, args, {**meta, **cfg})


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


def group_bytes(group: int, k: int) -> int:
    """Packed bytes per scale group (the kernels' ``GROUP_B``): ``group / 2``; per channel
    (``group == K``) a power of two above any tile, so every tile lies inside the one group."""
    return 1 << 30 if group == k else group // 2


def _bias(bias: Tensor | None, n: int, name: str, like: Tensor) -> Tensor:
    """The ``[N]`` bias (contiguous), or ``like`` as a never-read placeholder when there is none."""
    if bias is None:
        return like
    if bias.numel() != n:
        raise ValueError(f"{name}: bias of {bias.numel()} values for N={n} output features")
    return bias.reshape(-1).contiguous()


def int4_gemm(
    x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ W^T (+ bias)`` for an int4 weight, dequantized tile by tile inside the GEMM (prefill).

    Args:
        x: ``[..., K]`` activations (cast to bf16).
        packed: ``uint8 [N, K/2]`` codes 0..15, low nibble = even column.
        scales: ``[N, G]`` scales (bf16 values), ``G = K / group_size``.
        zeros: ``uint8 [N, G]`` zero points, or None for the implicit 8 (symmetric).
        group_size: columns per group, or -1 for one group per row.
        bias: optional ``[N]`` bias, added in float32 after the product.

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
    b = _bias(bias, n, name, s)
    args = (x2, p, s, z, b, y, m, n, k, s.shape[1], x2.stride(0), p.stride(0), s.stride(0), y.stride(0))
    meta = {
        "GROUP_B": group_bytes(group, k),
        "HAS_ZERO": zeros is not None,
        "ZERO": INT4_ZERO,
        "HAS_BIAS": bias is not None,
    }
    _run("int4_gemm_kernel", m, n, args, meta)
    return y.reshape(*x.shape[:-1], n)


def int8_gemm(x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(x @ codes^T) * scale (+ bias)`` for an int8 weight-only layer, dequantized inside the GEMM.

    Args:
        x: ``[..., K]`` activations (cast to bf16).
        w: ``int8 [N, K]`` codes.
        scales: ``[N, 1]`` (or ``[N]``) per-channel scales.
        bias: optional ``[N]`` bias, added in float32 after the product.

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
    b = _bias(bias, n, name, s)
    args = (x2, wc, s, b, y, m, n, k, x2.stride(0), wc.stride(0), y.stride(0))
    _run("int8_gemm_kernel", m, n, args, {"HAS_BIAS": bias is not None})
    return y.reshape(*x.shape[:-1], n)


DEQUANT_BLOCK = (64, 128)
"""(rows, stored columns) per program of the dequantize kernels: 8-16 KiB read, 16-32 KiB written."""


def _launch(kernel_name: str, device: torch.device, grid: tuple[int, int], *args: Any, **meta: Any) -> None:
    launch(getattr(_src(), kernel_name), grid, device, args, meta)


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
