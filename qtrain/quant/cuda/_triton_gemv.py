"""Triton decode GEMV kernels (1..8 rows): see :mod:`qtrain.quant.cuda.gemv` and ``_triton_src``
(the shared scale loader, the layouts). Imported on first use only, where Triton is installed."""

import triton
import triton.language as tl

from qtrain.quant.cuda._triton_src import _group_params


@triton.jit
def int4_gemv_kernel(
    x_ptr,
    p_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    KB,
    G,
    stride_xm,
    stride_pn,
    stride_sn,
    stride_ym,
    m_bucket,
    GROUP_B: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Decode GEMV: y[M, N] = x[M, K] @ W^T (+ bias) for a few rows, W int4 read once.

    One program per ``BLOCK_N`` output rows (many programs: a 2048-row layer fills every SM),
    streaming their packed bytes ``[BLOCK_N, BLOCK_B]`` (coalesced, 16-byte loads) over K;
    each byte is dequantized in registers (float32) and multiplied with the even and odd
    activation it covers, for each of the ``BLOCK_M`` (<= 8) rows. float32 accumulation; no
    tensor cores (one row does not fill them), no split-K (no second kernel, no atomics).
    """
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:  # one row: element-wise partial sums over K, a single reduction at the end
        part2 = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        for b0 in range(0, KB, BLOCK_B):
            w_even, w_odd = _int4_tile(
                p_ptr,
                s_ptr,
                z_ptr,
                rn,
                n_ok,
                b0,
                KB,
                G,
                stride_pn,
                stride_sn,
                BLOCK_N,
                BLOCK_B,
                GROUP_B,
                HAS_ZERO,
                ZERO,
            )
            x_even, x_odd = _x_pairs(x_ptr, 0, stride_xm, b0, KB, M, BLOCK_B)
            part2 += w_even * x_even[None, :] + w_odd * x_odd[None, :]
        acc = tl.sum(part2, axis=1)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b0 in range(0, KB, BLOCK_B):
            w_even, w_odd = _int4_tile(
                p_ptr,
                s_ptr,
                z_ptr,
                rn,
                n_ok,
                b0,
                KB,
                G,
                stride_pn,
                stride_sn,
                BLOCK_N,
                BLOCK_B,
                GROUP_B,
                HAS_ZERO,
                ZERO,
            )
            for m in tl.static_range(BLOCK_M):
                x_even, x_odd = _x_pairs(x_ptr, m, stride_xm, b0, KB, M, BLOCK_B)
                part = tl.sum(w_even * x_even[None, :] + w_odd * x_odd[None, :], axis=1)  # [BLOCK_N]
                acc = tl.where(rm[:, None] == m, acc + part[None, :], acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_mask = (rm < M)[:, None] & n_ok[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _int4_tile(
    p_ptr,
    s_ptr,
    z_ptr,
    rn,
    n_ok,
    b0,
    KB,
    G,
    stride_pn,
    stride_sn,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    GROUP_B: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO: tl.constexpr,
):
    """float32 weights of the even and odd columns held by packed bytes ``b0 .. b0 + BLOCK_B`` of rows ``rn``."""
    rb = b0 + tl.arange(0, BLOCK_B)
    pk = tl.load(p_ptr + rn[:, None] * stride_pn + rb[None, :], mask=n_ok[:, None] & (rb < KB)[None, :], other=0)
    s, z = _group_params(s_ptr, z_ptr, rn, n_ok, b0, G, stride_sn, BLOCK_N, BLOCK_B, GROUP_B, HAS_ZERO, ZERO)
    return ((pk & 15).to(tl.float32) - z) * s, ((pk >> 4).to(tl.float32) - z) * s


@triton.jit
def _x_pairs(x_ptr, m, stride_xm, b0, KB, M, BLOCK_B: tl.constexpr):
    """float32 activations of row ``m`` at the even and odd columns of bytes ``b0 .. b0 + BLOCK_B``
    (one contiguous load, split in registers); zeros past K or past the last row."""
    rk = b0 * 2 + tl.arange(0, 2 * BLOCK_B)
    xm = tl.load(x_ptr + m * stride_xm + rk, mask=(rk < 2 * KB) & (m < M), other=0.0).to(tl.float32)
    return tl.split(tl.reshape(xm, (BLOCK_B, 2)))


@triton.jit
def int8_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    m_bucket,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Decode GEMV: y[M, N] = (x @ codes^T) * scale[N] (+ bias), int8 codes read once (see int4_gemv_kernel)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:  # one row: element-wise partial sums over K, a single reduction at the end
        part2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            x0 = tl.load(x_ptr + rk, mask=k_ok & (M > 0), other=0.0).to(tl.float32)
            part2 += w.to(tl.float32) * x0[None, :]
        acc = tl.sum(part2, axis=1)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            w = w.to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                xm = tl.load(x_ptr + m * stride_xm + rk, mask=k_ok & (m < M), other=0.0).to(tl.float32)
                part = tl.sum(w * xm[None, :], axis=1)
                acc = tl.where(rm[:, None] == m, acc + part[None, :], acc)
    acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_mask = (rm < M)[:, None] & n_ok[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)
