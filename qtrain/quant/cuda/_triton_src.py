"""Triton kernels. Imported by :mod:`qtrain.quant.cuda.kernels` on first use only, where Triton
is installed (``triton.jit`` reads ``TRITON_INTERPRET`` when Triton is imported). Layouts are
the canonical packed ones (:mod:`qtrain.quant.packed`): int4 ``uint8 [N, K/2]``, low nibble =
even column; scales ``[N, G]``; zeros ``uint8 [N, G]`` (asymmetric) or the implicit 8; int8
``[N, K]`` with ``[N, 1]`` scales. No repacked copy.

- ``int4_gemv_kernel`` / ``int8_gemv_kernel`` (in ``_triton_gemv``): decode (1..8 rows), one
  program per few output rows, CUDA-core FMAs, float32 accumulation; the weight read once.
- ``int4_gemm_kernel`` / ``int8_gemm_kernel``: prefill, tensor-core tiles, the weight
  dequantized to bf16 in registers tile by tile (never written to memory), float32 accumulation.
- ``dequant_int4_kernel`` / ``dequant_int8_kernel``: the whole bf16 weight (for cuBLAS).

Each GEMV/GEMM takes an optional bias (added in float32 after the product). ``m_bucket`` is
unused by the math: it is the autotuning key for the row count (a power of two), so each
prefill length does not re-tune.
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
def _group_params(
    s_ptr,
    z_ptr,
    rn,
    n_ok,
    b0,
    G,
    stride_sn,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    GROUP_B: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO: tl.constexpr,
):
    """float32 (scale, zero) of the packed bytes ``b0 .. b0 + BLOCK_B`` of rows ``rn``, broadcastable to
    ``[BLOCK_N, BLOCK_B]`` (a byte holds two columns of one group: ``GROUP_B`` bytes per group).

    One load per group, not per byte, where the tile holds whole groups or lies inside one
    (per channel: ``GROUP_B`` is a large power of two); a per-byte gather only for groups that
    straddle tiles.
    """
    if GROUP_B % BLOCK_B == 0:  # the tile lies inside one group: [BLOCK_N, 1]
        g = b0 // GROUP_B
        s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_ZERO:  # noqa: SIM108 - constexpr branch
            z = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=ZERO).to(tl.float32)[:, None]
        else:
            z = ZERO * 1.0
    elif BLOCK_B % GROUP_B == 0:  # whole groups: load [BLOCK_N, BLOCK_B / GROUP_B], repeat each GROUP_B times
        g = b0 // GROUP_B + tl.arange(0, BLOCK_B // GROUP_B)
        mask = n_ok[:, None] & (g < G)[None, :]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_B // GROUP_B, GROUP_B)), (BLOCK_N, BLOCK_B))
        if HAS_ZERO:
            z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=mask, other=ZERO).to(tl.float32)
            z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, BLOCK_B // GROUP_B, GROUP_B)), (BLOCK_N, BLOCK_B))
        else:
            z = ZERO * 1.0
    else:  # groups straddle tiles: per-byte gather
        g = (b0 + tl.arange(0, BLOCK_B)) // GROUP_B
        mask = n_ok[:, None] & (g < G)[None, :]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:  # noqa: SIM108 - constexpr branch
            z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=mask, other=ZERO).to(tl.float32)
        else:
            z = ZERO * 1.0
    return s, z


@triton.jit
def int4_gemm_kernel(
    x_ptr,
    p_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
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
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Prefill GEMM: y[M, N] = x[M, K] @ W^T (+ bias), W int4 dequantized tile by tile in registers.

    Per K step: a contiguous ``[BLOCK_M, BLOCK_K]`` activation tile, the ``[BLOCK_N, BLOCK_K/2]``
    packed bytes (row-major, coalesced), one scale (and zero) load per group, nibbles
    dequantized to bf16 and interleaved back into column order, one tensor-core dot with
    float32 accumulation. The bf16 weight never goes to memory.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
        b0 = k0 // 2
        rb = b0 + tl.arange(0, BLOCK_K // 2)
        w_mask = n_ok[:, None] & (rb < K // 2)[None, :]
        pk = tl.load(p_ptr + rn[:, None] * stride_pn + rb[None, :], mask=w_mask, other=0)  # [BLOCK_N, BLOCK_K / 2]
        s, z = _group_params(s_ptr, z_ptr, rn, n_ok, b0, G, stride_sn, BLOCK_N, BLOCK_K // 2, GROUP_B, HAS_ZERO, ZERO)
        w_even = (((pk & 15).to(tl.float32) - z) * s).to(tl.bfloat16)
        w_odd = (((pk >> 4).to(tl.float32) - z) * s).to(tl.bfloat16)
        w = tl.interleave(w_even, w_odd)  # [BLOCK_N, BLOCK_K] in column order
        if DOT_F32:  # noqa: SIM108 - the interpreter's bf16 dot is wrong: same bf16 values, float32 dot
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(tl.bfloat16), mask=y_mask)


@triton.jit
def int8_gemm_kernel(
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
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Prefill GEMM: y[M, N] = (x[M, K] @ codes^T) * scale[N] (+ bias); int8 codes become bf16 exactly in registers."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        if DOT_F32:  # noqa: SIM108 - kept as a block, like the int4 kernel
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(tl.bfloat16)), acc)
    acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(tl.bfloat16), mask=y_mask)


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
