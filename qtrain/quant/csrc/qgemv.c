/*
 * qtrain native CPU kernels: packed int4 / int8 weight times float32 activations, for the
 * few-row (decode) case.  AVX2 + FMA, OpenMP over output rows.
 *
 * Built on first use by qtrain/quant/native.py (gcc/cc, -O3 -mavx2 -mfma -fopenmp) into a
 * per-user cache and called through ctypes with raw pointers; nothing here knows about torch.
 * The weights are read in qtrain's canonical checkpoint layout, so no repacked copy exists:
 *
 *   int4: w   uint8 [N, K/2]   byte j of a row = column 2j (low nibble), 2j+1 (high nibble)
 *         s   bf16  [N, G]     one scale per group of `group` columns (G = K / group)
 *         z   uint8 [N, G]     zero points, or NULL for symmetric (implicit zero 8)
 *   int8: w   int8  [N, K]     s bf16 [N] one scale per row
 *
 *   y[m, n] = sum_k (code[n, k] - zero[n, k / group]) * scale[n, k / group] * x[m, k]
 *
 * Neither kernel rounds the activations to bf16 (PyTorch's own CPU kernels need bf16 inputs
 * to be fast); results do not depend on the thread count (each output is one thread's fixed
 * sequence of operations).
 *
 * int8: float32 activations, each weight converted to float32, FMA, float32 accumulation.
 *
 * int4: sum_k (c_k - z) s x_k = s * (sum_k c_k x_k - z * sum_k x_k).  Once per call, every
 * 32-column block of activations is quantized to int16 (scale = block max / 32767) and
 * permuted to [even columns, odd columns], so the low and high nibbles of 16 consecutive
 * weight bytes meet contiguous activations; the products are then exact int16 x uint4 ->
 * int32 multiply-adds (_mm256_madd_epi16), eight blocks reduced together and scaled in
 * float32.  The zero-point term uses the per-group sums of the int16 activations.  A row of
 * activations with a NaN or infinity gives NaN outputs (as a float matmul would).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QT_ABI 3

int qt_abi_version(void) { return QT_ABI; }

/*
 * Threads: every kernel takes `nthreads` (the caller passes torch.get_num_threads(), so one
 * setting, qtrain's `threads`, drives PyTorch and these kernels) and opens its parallel region
 * with num_threads(nthreads); OMP_NUM_THREADS does not apply.  qt_omp_team_size(n) is the
 * size of the team such a region gets (the runtime may give fewer, e.g. under OMP_THREAD_LIMIT).
 */
int qt_omp_team_size(int nthreads) {
    int size = 0;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp single
        size = omp_get_num_threads();
    }
    return size;
}

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    lo = _mm_add_ss(lo, sh);
    return _mm_cvtss_f32(lo);
}

static inline __m256 bf16x8_to_f32(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* int32 block sums S_b = sum_{k in block b} c_k * xq_k of one 32-column block: 8 lanes */
static inline __m256i block32(const uint8_t *wb, const int16_t *xq) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)wb);
    __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, mask));
    __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
    __m256i p = _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xq));
    return _mm256_add_epi32(p, _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 16))));
}

/* [sum(v0), ..., sum(v7)]: the lane sums of 8 int32 vectors, in order */
static inline __m256i sum8(__m256i v0, __m256i v1, __m256i v2, __m256i v3, __m256i v4, __m256i v5,
                           __m256i v6, __m256i v7) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v4, v5), _mm256_hadd_epi32(v6, v7));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

static inline int32_t hsum256i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    return _mm_cvtsi128_si32(s);
}

/* acc (blocks before b done) + the remaining blocks - the zero-point term, one activation row */
static inline float int4_finish(float acc, int64_t b, const uint8_t *w, const uint16_t *s, const uint8_t *z,
                                const int16_t *xq, const float *sx, const float *xz, int64_t k, int64_t group) {
    const int64_t n_blocks = k / 32, n_groups = k / group, per = group / 32;
    for (; b < n_blocks; ++b) acc += bf16_to_f32(s[b / per]) * sx[b] * (float)hsum256i(block32(w + 16 * b, xq + 32 * b));
    float zt = 0.0f;
    int64_t g = 0;
    if (z == NULL) {
        __m256 v = _mm256_setzero_ps();
        for (; g + 8 <= n_groups; g += 8) v = _mm256_fmadd_ps(bf16x8_to_f32(s + g), _mm256_loadu_ps(xz + g), v);
        zt = hsum256(v);
        for (; g < n_groups; ++g) zt += bf16_to_f32(s[g]) * xz[g];
        zt *= 8.0f;
    } else {
        for (; g < n_groups; ++g) zt += bf16_to_f32(s[g]) * (float)z[g] * xz[g];
    }
    return acc - zt;
}

/*
 * One output row for one activation row.  xq: int16 activations, each 32-column block
 * permuted to [even columns, odd columns]; sx: per-block activation scales (K/32); xz:
 * per-group sums of the dequantized activations (G); cs: the row's weight scales expanded
 * to one per block (K/32, only read when group > 32).
 *   y = sum_b s_{g(b)} sx_b S_b  -  sum_g s_g z_g xz_g,   S_b = sum_{k in b} code_k xq_k
 * Eight blocks' S_b are reduced together (sum8), so scaling is one FMA per 256 columns.
 */
static float int4_out(const uint8_t *w, const uint16_t *s, const uint8_t *z, const int16_t *xq,
                       const float *sx, const float *xz, const float *cs, int64_t k, int64_t group) {
    const int64_t n_blocks = k / 32, per = group / 32;
    __m256 tot = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= n_blocks; b += 8) {
        const uint8_t *wb = w + 16 * b;
        const int16_t *xb = xq + 32 * b;
        const __m256 sw = per == 1 ? bf16x8_to_f32(s + b) : _mm256_loadu_ps(cs + b);
        __m256i S = sum8(block32(wb, xb), block32(wb + 16, xb + 32), block32(wb + 32, xb + 64),
                         block32(wb + 48, xb + 96), block32(wb + 64, xb + 128), block32(wb + 80, xb + 160),
                         block32(wb + 96, xb + 192), block32(wb + 112, xb + 224));
        tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), _mm256_mul_ps(sw, _mm256_loadu_ps(sx + b)), tot);
    }
    return int4_finish(hsum256(tot), b, w, s, z, xq, sx, xz, k, group);
}

/*
 * x float32 [M, K] row-major; y float32 [M, N].  Requires K % group == 0, group % 32 == 0.
 * Each 32-column block of activations is quantized to int16 (round to nearest, scale =
 * block max / 32767: relative error <= 2^-16 of the block's largest value, ~100x finer than
 * a bf16 activation) so the products run as exact int16 x uint4 -> int32 multiply-adds.
 * Returns 0, or -1 when a scratch allocation failed (y untouched).
 */
int qt_int4_linear(const float *x, int64_t m, int64_t k, const uint8_t *w, const uint16_t *s,
                   const uint8_t *z, int64_t n, int64_t group, float *y, int nthreads) {
    const int64_t n_blocks = k / 32, n_groups = k / group, per = group / 32;
    char *mem = (char *)malloc(sizeof(int16_t) * (size_t)(m * k) + sizeof(float) * (size_t)(m * (n_blocks + n_groups)));
    if (mem == NULL) return -1;
    int16_t *xq = (int16_t *)mem;
    float *sx = (float *)(mem + sizeof(int16_t) * (size_t)(m * k));
    float *xz = sx + m * n_blocks;
    int any_bad = 0;
    for (int64_t r = 0; r < m; ++r) {
        const float *xr = x + r * k;
        int16_t *qr = xq + r * k;
        for (int64_t g = 0; g < n_groups; ++g) xz[r * n_groups + g] = 0.0f;
        for (int64_t b = 0; b < n_blocks; ++b) {
            const float *xb = xr + 32 * b;
            float amax = 0.0f;
            for (int j = 0; j < 32; ++j) amax = fabsf(xb[j]) > amax ? fabsf(xb[j]) : amax;
            for (int j = 0; j < 32; ++j) any_bad |= !isfinite(xb[j]);
            const float scale = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            int32_t total = 0;
            for (int j = 0; j < 16; ++j) {
                int16_t e = (int16_t)lrintf(xb[2 * j] * inv), o = (int16_t)lrintf(xb[2 * j + 1] * inv);
                qr[32 * b + j] = e;
                qr[32 * b + 16 + j] = o;
                total += e + o;
            }
            sx[r * n_blocks + b] = scale;
            xz[r * n_groups + b / per] += scale * (float)total;
        }
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *cs = per == 1 ? NULL : (float *)malloc(sizeof(float) * (size_t)n_blocks);
        if (per != 1 && cs == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            if (per != 1 && cs == NULL) continue;
            const uint8_t *wi = w + i * (k / 2);
            const uint16_t *si = s + i * n_groups;
            const uint8_t *zi = z == NULL ? NULL : z + i * n_groups;
            if (cs != NULL)
                for (int64_t j = 0; j < n_blocks; ++j) cs[j] = bf16_to_f32(si[j / per]);
            for (int64_t r = 0; r < m; ++r)
                y[r * n + i] = int4_out(wi, si, zi, xq + r * k, sx + r * n_blocks, xz + r * n_groups, cs, k, group);
        }
        free(cs);
    }
    if (any_bad) /* non-finite activations: NaN rows instead of garbage from their int16 image */
        for (int64_t r = 0; r < m; ++r) {
            int bad = 0;
            for (int64_t j = 0; j < k; ++j) bad |= !isfinite(x[r * k + j]);
            if (bad)
                for (int64_t i = 0; i < n; ++i) y[r * n + i] = NAN;
        }
    free(mem);
    return failed ? -1 : 0;
}

static inline __m256 i8x8_to_f32(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* sum_k w_k x_k for one row pair, four independent accumulators (the decode case) */
static inline float int8_out1(const int8_t *wi, const float *xr, int64_t k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 32) {
        a0 = _mm256_fmadd_ps(i8x8_to_f32(wi + j), _mm256_loadu_ps(xr + j), a0);
        a1 = _mm256_fmadd_ps(i8x8_to_f32(wi + j + 8), _mm256_loadu_ps(xr + j + 8), a1);
        a2 = _mm256_fmadd_ps(i8x8_to_f32(wi + j + 16), _mm256_loadu_ps(xr + j + 16), a2);
        a3 = _mm256_fmadd_ps(i8x8_to_f32(wi + j + 24), _mm256_loadu_ps(xr + j + 24), a3);
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* one output row for `rows` (2..4) activation rows: each weight vector converts once */
static inline void int8_out(const int8_t *wi, const float *x, int64_t k, int64_t rows, float scale, float *y,
                            int64_t ldy) {
    __m256 a[4][2];
    for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) {
        const __m256 w0 = i8x8_to_f32(wi + j), w1 = i8x8_to_f32(wi + j + 8);
        for (int64_t r = 0; r < rows; ++r) {
            a[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * k + j), a[r][0]);
            a[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * k + j + 8), a[r][1]);
        }
    }
    for (int64_t r = 0; r < rows; ++r) y[r * ldy] = hsum256(_mm256_add_ps(a[r][0], a[r][1])) * scale;
}

/* x float32 [M, K], w int8 [N, K], s bf16 [N]; y float32 [M, N].  Requires K % 32 == 0. */
int qt_int8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const uint16_t *s,
                   int64_t n, float *y, int nthreads) {
    if (m == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; ++i) y[i] = int8_out1(w + i * k, x, k) * bf16_to_f32(s[i]);
        return 0;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        const float scale = bf16_to_f32(s[i]);
        for (int64_t r0 = 0; r0 < m; r0 += 4) {
            const int64_t rows = m - r0 < 4 ? m - r0 : 4;
            if (rows == 1)
                y[r0 * n + i] = int8_out1(w + i * k, x + r0 * k, k) * scale;
            else
                int8_out(w + i * k, x + r0 * k, k, rows, scale, y + r0 * n + i, n);
        }
    }
    return 0;
}
