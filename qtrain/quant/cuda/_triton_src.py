"""Triton kernels. Imported by :mod:`qtrain.quant.cuda.kernels` on first use only, where Triton
is installed (``triton.jit`` reads ``TRITON_INTERPRET`` when Triton is imported). Layouts are
the canonical packed ones (:mod:`qtrain.quant.packed`): int4 ``uint8 [N, K/2]``, low nibble = even column; scales
``[N, G]``; zeros ``uint8 [N, G]`` (asymmetric) or the implicit 8; int8 ``[N, K]`` with
``[N, 1]`` scales. Every product accumulates in float32; weights are dequantized to bf16 in
registers, tile by tile, and never written to memory. ``m_bucket`` is unused by the math: it is
the autotuning key for the row count (a power of two), so each prefill length does not re-tune.
"""

import triton
import triton.language as tl


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, in grouped order (GROUP_M row tiles share weight tiles in L2)."""
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def int4_gemm_kernel(
    x_ptr,
    p_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_pn,
    stride_sn,
    stride_ym,
    m_bucket,
    GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """y[M, N] = x[M, K] @ ((code - zero) * scale)^T; even and odd columns as two dots."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // 2)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + rb  # byte columns of this K tile
        kc = 2 * kb  # the even column each byte holds (the odd one is kc + 1)
        k_ok = kc < K
        x_mask = m_ok[:, None] & k_ok[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + kc[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + kc[None, :] + 1, mask=x_mask, other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        pk = tl.load(p_ptr + rn[None, :] * stride_pn + kb[:, None], mask=w_mask, other=0)  # [BK/2, BN]
        g = kc // GROUP  # both columns of a byte share a group (groups are even)
        s = tl.load(s_ptr + rn[None, :] * stride_sn + g[:, None], mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + rn[None, :] * stride_sn + g[:, None], mask=w_mask, other=ZERO).to(tl.float32)
        else:
            z = ZERO * 1.0
        w_even = (((pk & 15).to(tl.float32) - z) * s).to(tl.bfloat16)
        w_odd = (((pk >> 4).to(tl.float32) - z) * s).to(tl.bfloat16)
        if DOT_F32:  # the interpreter's bf16 dot is wrong: same bf16 values, float32 dot
            acc = tl.dot(x_even.to(tl.float32), w_even.to(tl.float32), acc)
            acc = tl.dot(x_odd.to(tl.float32), w_odd.to(tl.float32), acc)
        else:
            acc = tl.dot(x_even, w_even, acc)
            acc = tl.dot(x_odd, w_odd, acc)
    y_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(tl.bfloat16), mask=y_mask)


@triton.jit
def int8_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    m_bucket,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """y[M, N] = (x[M, K] @ codes^T) * scale[N]; int8 codes become bf16 exactly in registers."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kc = k0 + rk
        k_ok = kc < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kc[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kc[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        if DOT_F32:  # noqa: SIM108 - kept as a block, like the int4 kernel
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w.to(tl.bfloat16), acc)
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], (acc * s[None, :]).to(tl.bfloat16), mask=y_mask)


@triton.jit
def _bf16_rtne(x):
    """float32 -> bf16 rounded to nearest even, in integer ops (finite inputs).

    What the GPU's conversion does; written out because Triton's interpreter truncates instead,
    and the CPU check of these kernels is bit-exact.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def dequant_int4_kernel(
    p_ptr,
    s_ptr,
    z_ptr,
    w_ptr,
    N,
    KB,
    stride_pn,
    stride_sn,
    stride_wn,
    GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """w[N, 2*KB] bf16 = (code - zero) * scale from packed bytes [N, KB]; one read, one write.

    The product of a code difference (|d| <= 15) and a bf16 scale is exact in float32, so the one
    rounding to bf16 matches ``primitives.dequantize(...).to(bfloat16)`` bit for bit.
    """
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rn < N)[:, None] & (rb < KB)[None, :]
    pk = tl.load(p_ptr + rn[:, None] * stride_pn + rb[None, :], mask=mask, other=0)
    g = (2 * rb) // GROUP  # both columns of a byte share a group (groups are even)
    s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:  # noqa: SIM108 - a constexpr branch (no load traced for symmetric weights)
        z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=mask, other=ZERO).to(tl.float32)
    else:
        z = ZERO * 1.0
    lo = _bf16_rtne(((pk & 15).to(tl.float32) - z) * s)
    hi = _bf16_rtne(((pk >> 4).to(tl.float32) - z) * s)
    both = tl.interleave(lo, hi)  # [BLOCK_N, 2 * BLOCK_B]: even column, then odd
    rk = tl.program_id(1) * (2 * BLOCK_B) + tl.arange(0, 2 * BLOCK_B)
    w_mask = (rn < N)[:, None] & (rk < 2 * KB)[None, :]
    tl.store(w_ptr + rn[:, None] * stride_wn + rk[None, :], both, mask=w_mask)


@triton.jit
def dequant_int8_kernel(
    c_ptr,
    s_ptr,
    w_ptr,
    N,
    K,
    stride_cn,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """w[N, K] bf16 = code * scale[N] (exact in float32, one rounding: bit-exact to the reference)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    c = tl.load(c_ptr + rn[:, None] * stride_cn + rk[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(w_ptr + rn[:, None] * stride_wn + rk[None, :], _bf16_rtne(c * s[:, None]), mask=mask)
