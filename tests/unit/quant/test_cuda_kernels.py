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
    assert "9 passed" in summary, summary  # every kernel test ran (only this one skips there)


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """CUDA, or the CPU under the interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # numpy >= 2.4 refuses int() of a 1-element array (range(K) in a kernel)
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)
    return torch.device("cpu")


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # bf16 weights (relative rounding 2^-9 each) and a bf16 output (2^-9 of |y|): 2^-7 of
    # sum |x| |w| covers both with room; fp32 accumulation order adds far less.
    return 2**-7 * (x.abs().float() @ w.abs().t().float()) + 1e-4


@needs_backend
@pytest.mark.parametrize(
    ("m", "n", "k", "group", "symmetric"), [(5, 40, 128, 32, True), (33, 72, 256, 64, False), (3, 24, 64, -1, True)]
)
def test_int4_gemm_matches_the_reference(
    device: torch.device, m: int, n: int, k: int, group: int, symmetric: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    qw = P.quantize_weight(torch.randn(n, k, generator=gen) * 0.05, 4, group, symmetric)
    x = (torch.randn(m, k, generator=gen) + 0.5).to(torch.bfloat16)
    w_hat = P.dequantize(qw.codes, qw.scales, qw.zeros, 4, group)
    zeros = None if qw.zeros is None else qw.zeros.to(device)
    y = K.int4_gemm(x.to(device), P.pack_int4(qw.codes).to(device), qw.scales.to(device), zeros, group)
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == (m, n)
    err = (y.float().cpu() - x.float() @ w_hat.t()).abs()
    assert bool((err <= _bound(x, w_hat)).all()), float(err.max())


@needs_backend
def test_int8_gemm_matches_the_reference_and_keeps_leading_dims(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    qw = P.quantize_weight(torch.randn(48, 96, generator=gen) * 0.05, 8, -1, True)
    x = (torch.randn(2, 9, 96, generator=gen) - 0.2).to(torch.bfloat16)
    w_hat = P.dequantize(qw.codes, qw.scales, None, 8, -1)
    y = K.int8_gemm(x.to(device), qw.codes.to(device), qw.scales.to(device))
    assert tuple(y.shape) == (2, 9, 48)
    err = (y.float().cpu() - x.float() @ w_hat.t()).abs()
    assert bool((err <= _bound(x.reshape(-1, 96), w_hat).reshape(2, 9, 48)).all()), float(err.max())


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


@needs_backend
def test_the_kernel_table_row_runs_the_layer_like_its_dequantized_weight(device: torch.device) -> None:
    from qtrain.quant import kernels as table
    from qtrain.quant.packed import Int4Linear, Int8Linear
    from qtrain.quant.spec import LayerSpec

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(70, 64, generator=gen).to(torch.bfloat16).to(device)  # more rows than tinygemm serves
    for mod in (
        Int4Linear.from_float(torch.randn(24, 64, generator=gen), LayerSpec("int4", 4, 32, symmetric=False)),
        Int8Linear.from_float(torch.randn(24, 64, generator=gen), LayerSpec("int8", 8)),
    ):
        w = mod.to(device).packed_weights()
        y = table.triton_dequant_cuda(w)(x)
        # same bf16 weight (bit-exact) and the same F.linear: equal up to the GEMM's summation order
        want = torch.nn.functional.linear(x, w.dequantize_bf16())
        assert y.dtype == x.dtype and torch.allclose(y.float(), want.float(), rtol=2**-7, atol=1e-3)


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
