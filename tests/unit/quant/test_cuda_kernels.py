"""qtrain.quant.cuda: the Triton dequantize-in-GEMM kernels against the reference.

On CUDA they run on the GPU; without one, on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, small shapes). Skipped where Triton is not installed (the CPU CI).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qtrain.quant import primitives as P
from qtrain.quant.cuda import gemv as G
from qtrain.quant.cuda import kernels as K

pytest.importorskip("triton", reason="Triton is not installed (the CUDA kernels are optional)")


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_backend = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRETED),
    reason="runs on CUDA, or on the CPU in test_the_kernels_under_the_interpreter's subprocess",
)


def test_the_kernels_under_the_interpreter() -> None:
    """Without a GPU: this file's tests in a fresh process with TRITON_INTERPRET=1 (Triton reads it
    once, when it is first imported, and another test may have imported it already)."""
    if torch.cuda.is_available() or INTERPRETED:
        pytest.skip("the tests run directly here")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}  # small shapes: one thread
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "18 passed" in summary, summary  # every kernel test ran (only this one skips there)


@pytest.fixture
def device() -> torch.device:
    """CUDA, or the CPU under the interpreter (qtrain.quant.cuda patches the interpreter for numpy >= 2.4)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _bound(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # bf16 weights (relative rounding 2^-9 each) and a bf16 output (2^-9 of |y| <= sum |x||w| + |b|):
    # 2^-7 of that covers both with room; fp32 accumulation order adds far less.
    b = 0.0 if bias is None else bias.abs().float()
    return 2**-7 * (x.abs().float() @ w.abs().t().float() + b) + 1e-4


def _int4(n: int, k: int, group: int, symmetric: bool, seed: int) -> tuple:
    """Random int4 weight: (packed, scales, zeros or None, float32 dequantized weight)."""
    gen = torch.Generator().manual_seed(seed)
    qw = P.quantize_weight(torch.randn(n, k, generator=gen) * 0.05, 4, group, symmetric)
    return P.pack_int4(qw.codes), qw.scales, qw.zeros, P.dequantize(qw.codes, qw.scales, qw.zeros, 4, group)


def _check(y: torch.Tensor, x: torch.Tensor, w_hat: torch.Tensor, bias: torch.Tensor | None) -> None:
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]).float().cpu()
    want = x2.float() @ w_hat.t() + (0.0 if bias is None else bias.float())
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == (*x.shape[:-1], w_hat.shape[0])
    err = (y2 - want).abs()
    assert bool((err <= _bound(x2, w_hat, bias)).all()), float((err / _bound(x2, w_hat, bias)).max())


def _on(device: torch.device, *ts: torch.Tensor | None) -> list:
    return [None if t is None else t.to(device) for t in ts]


@needs_backend
@pytest.mark.parametrize(
    ("m", "n", "k", "group", "symmetric", "bias"),
    [
        (5, 40, 128, 32, True, False),  # groups inside a K tile
        (33, 72, 256, 64, False, True),  # asymmetric, bias, several row tiles
        (3, 24, 64, -1, True, False),  # per channel
        (7, 24, 96, 32, False, True),  # K not a multiple of the K tile (masked tail)
        (2, 20, 192, 96, True, False),  # a group that straddles K tiles (per-byte scale gather)
    ],
)
def test_int4_gemm_matches_the_reference(
    device: torch.device, m: int, n: int, k: int, group: int, symmetric: bool, bias: bool
) -> None:
    packed, scales, zeros, w_hat = _int4(n, k, group, symmetric, seed=m)
    gen = torch.Generator().manual_seed(10 + m)
    x = (torch.randn(m, k, generator=gen) + 0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=gen) if bias else None
    y = K.int4_gemm(*_on(device, x, packed, scales, zeros), group, *_on(device, b))
    _check(y, x, w_hat, b)


@needs_backend
@pytest.mark.parametrize(
    ("m", "n", "k", "group", "symmetric", "bias"),
    [
        (1, 40, 128, 32, True, False),  # decode: one row, g32 (several groups per tile)
        (3, 24, 600, -1, False, True),  # per channel, asymmetric, K/2 not a multiple of the tile, bias
        (8, 20, 192, 96, True, True),  # the most rows; groups straddle tiles (per-byte gather)
        (2, 12, 1024, 512, False, False),  # one group per tile
    ],
)
def test_int4_gemv_matches_the_reference(
    device: torch.device, m: int, n: int, k: int, group: int, symmetric: bool, bias: bool
) -> None:
    packed, scales, zeros, w_hat = _int4(n, k, group, symmetric, seed=20 + m)
    gen = torch.Generator().manual_seed(30 + m)
    x = (torch.randn(m, k, generator=gen) - 0.3).to(torch.bfloat16)
    b = torch.randn(n, generator=gen) if bias else None
    y = G.int4_gemv(*_on(device, x, packed, scales, zeros), group, *_on(device, b))
    _check(y, x, w_hat, b)


@needs_backend
@pytest.mark.parametrize(("m", "k", "bias"), [(1, 96, False), (5, 300, True)])
def test_int8_gemv_matches_the_reference(device: torch.device, m: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(5 + m)
    qw = P.quantize_weight(torch.randn(33, k, generator=gen) * 0.05, 8, -1, True)
    x = (torch.randn(m, k, generator=gen) + 0.2).to(torch.bfloat16)
    b = torch.randn(33, generator=gen) if bias else None
    y = G.int8_gemv(*_on(device, x, qw.codes, qw.scales, b))
    _check(y, x, P.dequantize(qw.codes, qw.scales, None, 8, -1), b)
    with pytest.raises(ValueError, match="at most 8"):
        G.int8_gemv(*_on(device, torch.zeros(9, k), qw.codes, qw.scales))


@needs_backend
def test_int8_gemm_matches_the_reference_and_keeps_leading_dims(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    qw = P.quantize_weight(torch.randn(48, 96, generator=gen) * 0.05, 8, -1, True)
    x = (torch.randn(2, 9, 96, generator=gen) - 0.2).to(torch.bfloat16)
    w_hat = P.dequantize(qw.codes, qw.scales, None, 8, -1)
    b = torch.randn(48, generator=gen)
    _check(K.int8_gemm(*_on(device, x, qw.codes, qw.scales)), x, w_hat, None)
    _check(K.int8_gemm(*_on(device, x, qw.codes, qw.scales, b)), x, w_hat, b)


@needs_backend
@pytest.mark.parametrize(("n", "k", "group", "symmetric"), [(70, 320, 32, False), (9, 64, -1, True)])
def test_dequant_int4_is_bit_exact_to_the_reference(
    device: torch.device, n: int, k: int, group: int, symmetric: bool
) -> None:
    # N and K/2 not multiples of the block (masks), asymmetric and per-channel groups.
    gen = torch.Generator().manual_seed(2)
    qw = P.quantize_weight(torch.randn(n, k, generator=gen) * 0.05, 4, group, symmetric)
    want = P.dequantize(qw.codes, qw.scales, qw.zeros, 4, group).to(torch.bfloat16)
    zeros = None if qw.zeros is None else qw.zeros.to(device)
    got = K.dequant_int4(P.pack_int4(qw.codes).to(device), qw.scales.to(device), zeros, group)
    assert got.dtype == torch.bfloat16 and torch.equal(got.cpu(), want)  # exact: one rounding of an exact product
    codes8 = P.quantize_weight(torch.randn(n, k, generator=gen) * 0.05, 8, -1, True)
    want8 = P.dequantize(codes8.codes, codes8.scales, None, 8, -1).to(torch.bfloat16)
    assert torch.equal(K.dequant_int8(codes8.codes.to(device), codes8.scales.to(device)).cpu(), want8)


def _layers(gen: torch.Generator) -> list:
    from qtrain.quant.packed import Int4Linear, Int8Linear
    from qtrain.quant.spec import LayerSpec

    return [
        Int4Linear.from_float(torch.randn(24, 64, generator=gen) * 0.05, LayerSpec("int4", 4, 32, symmetric=False)),
        Int8Linear.from_float(torch.randn(24, 64, generator=gen) * 0.05, LayerSpec("int8", 8)),
        Int4Linear.from_float(  # int8 dynamic activations: quantized per token before the kernel
            torch.randn(24, 64, generator=gen) * 0.05, LayerSpec("int8da_int4w", 4, 32, True, "int8")
        ),
    ]


@needs_backend
def test_the_kernel_table_rows_run_the_layer_like_its_reference(device: torch.device) -> None:
    from qtrain.quant import kernels as table
    from qtrain.quant.cuda import table as cuda_rows

    gen = torch.Generator().manual_seed(3)
    many = torch.randn(70, 64, generator=gen).to(torch.bfloat16)  # more rows than tinygemm serves
    few = torch.randn(3, 64, generator=gen).to(torch.bfloat16)  # decode rows
    for mod in _layers(gen):
        w = mod.to(device).packed_weights()
        for build, x in (
            (table.triton_dequant_cuda, many),
            (cuda_rows.triton_gemm_cuda, many),
            (cuda_rows.triton_gemv_cuda, few),
        ):
            y = build(w)(x.to(device))
            assert y is not None and y.dtype == x.dtype, build.__name__
            x_in = P.fake_quantize_per_token(x) if w.act_int8 else x  # what the weight sees
            # bf16 activations, weights and output: within the bound of the dequantized weight
            _check(y, x_in, mod.dequantize().cpu(), None)


@needs_backend
def test_the_compiled_decode_plan_runs_the_triton_ops_without_a_graph_break(device: torch.device) -> None:
    from qtrain.quant.cuda.linear import apply_linear, plan_linear

    gen = torch.Generator().manual_seed(6)
    for mod in _layers(gen):
        mod = mod.to(device)
        mod.set_bias(torch.randn(24, generator=gen).to(device))  # Qwen2's qkv bias: fused into the kernel
        plan, tensors = plan_linear(mod, device, int4="triton")
        assert plan.kind == f"int{mod.bits}_triton" and plan.bias
        other = "triton-int8" if mod.bits == 4 else "triton-int4"  # the Triton GEMV for the other width only
        assert not plan_linear(mod, device, int4=other)[0].kind.endswith("triton")
        assert plan_linear(mod, device, int4=f"triton-int{mod.bits}")[0].kind == plan.kind
        step = torch.compile(lambda x, p=plan, ts=tensors: apply_linear(p, x, ts), fullgraph=True, backend="eager")
        for rows in (1, 9):  # the GEMV op, and the GEMM op above 8 rows
            x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
            with torch.inference_mode():
                y = step(x.to(device))
            x_in = P.fake_quantize_per_token(x) if mod.spec.activations == "int8" else x
            _check(y, x_in, mod.dequantize().cpu(), mod.bias.cpu())


@needs_backend
def test_shape_mismatches_are_refused(device: torch.device) -> None:
    packed = torch.zeros(8, 32, dtype=torch.uint8, device=device)
    scales = torch.ones(8, 3, dtype=torch.bfloat16, device=device)  # K=64 has 2 groups of 32, not 3
    with pytest.raises(ValueError, match="do not fit"):
        K.int4_gemm(torch.zeros(2, 64, device=device), packed, scales, None, 32)
    with pytest.raises(ValueError, match="do not fit"):
        K.dequant_int4(packed, scales, None, 32)
    with pytest.raises(ValueError, match="scales for N=8"):
        K.dequant_int8(torch.zeros(8, 16, dtype=torch.int8, device=device), torch.ones(3, 1, device=device))
    with pytest.raises(ValueError, match="input features"):
        K.int8_gemm(
            torch.zeros(2, 10, device=device),
            torch.zeros(8, 16, dtype=torch.int8, device=device),
            torch.ones(8, 1, device=device),
        )


def test_without_a_backend_the_reason_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is a backend")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in (K.why_unavailable(torch.device("cpu")) or "")
    with pytest.raises(RuntimeError, match="int4_gemm"):
        K.int4_gemm(torch.zeros(1, 64), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2), None, 32)


def _compile_for_hopper(fn, sig: dict[str, str], consts: dict, warps: int, stages: int):  # noqa: ANN001, ANN202
    """Compile a kernel for sm_90 ahead of time (no GPU needed), pointers and strides 16-aligned as
    PyTorch's allocations make them at run time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = [n for n in sig if sig[n].startswith("*") or n.startswith("stride") or n in ("K", "KB", "N")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature={**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def _local_bytes(kernel) -> int:  # noqa: ANN001
    """Per-thread local memory (register spills) of a compiled kernel, from cuobjdump."""
    import re

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"qtrain_{os.getpid()}.cubin"), "wb") as f:
        f.write(kernel.asm["cubin"])
    done = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    os.unlink(f.name)
    return int(re.search(r"LOCAL:(\d+)", done.stdout).group(1))


@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 swaps the kernels for interpreted ones")
def test_the_kernels_compile_for_hopper_without_spills() -> None:
    """What the interpreter cannot check: each kernel family lowers to sm_90 code (layouts, splits,
    tensor-core dots), keeps its registers, and the prefill GEMM's loads are pipelined."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its CUDA backend")
    from qtrain.quant.cuda import _triton_gemv, _triton_src

    ptrs = {"x_ptr": "*bf16", "s_ptr": "*bf16", "b_ptr": "*fp32", "y_ptr": "*bf16"}
    ints = dict.fromkeys(("M", "N", "stride_xm", "stride_ym", "m_bucket"), "i32")
    int4 = {
        **ptrs,
        **ints,
        "p_ptr": "*u8",
        "z_ptr": "*u8",
        "KB": "i32",
        "G": "i32",
        "stride_pn": "i32",
        "stride_sn": "i32",
    }
    common = {"HAS_ZERO": True, "ZERO": 8.0, "HAS_BIAS": True}
    gemv4 = _compile_for_hopper(
        _triton_gemv.int4_gemv_kernel, int4, {"GROUP_B": 16, **common, "BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_B": 256}, 4, 2
    )
    int8 = {**ptrs, **ints, "w_ptr": "*i8", "K": "i32", "stride_wn": "i32"}
    gemv8 = _compile_for_hopper(
        _triton_gemv.int8_gemv_kernel, int8, {"HAS_BIAS": False, "BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_K": 512}, 4, 2
    )
    gemm4 = _compile_for_hopper(
        _triton_src.int4_gemm_kernel,
        {**{k: v for k, v in int4.items() if k != "KB"}, "K": "i32"},
        {"GROUP_B": 64, **common, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "DOT_F32": False},
        8,
        3,
    )
    assert all(_local_bytes(k) == 0 for k in (gemv4, gemv8, gemm4))
    assert "async_copy_global_to_local" in gemm4.asm["ttgir"]  # multi-stage loads feed the dot
