/* A few rows of fp32 activations times a GGUF-style 4- or 8-bit weight: decode's linear layers on CPUs
 * with AVX2 and FMA (kernels/cpu/quant_gemv.py holds the layouts and the Python side).
 *
 * The weight (n, k) comes in blocks of 32 weights along k.
 * - 4-bit: w = q * scale + offset, q in 0..15. Its codes are (n, k / 2) bytes, byte j of a block holding
 *   weight j in its low nibble and j + 16 in its high one (GGUF's own order); its parameters are
 *   (n, 2, k / 32) fp32: a column's block scales, then its block offsets.
 * - 8-bit: w = q * scale, q int8. Its codes are (n, k) bytes, its scales (n, k / 32) fp32.
 *
 * Each row of x is quantized per block of 32 to int16 (dx = max |x| / 32767: a relative step of 2^-15 of
 * the block's largest value, finer than bf16's 2^-8 of each value; llama.cpp's 8 bits flip SmolLM2's
 * greedy answers where this does not), so a block's dot product is dx * scale * sum(q * xq)
 * (+ offset * sum(x), 4-bit): the integer sum by VPMADDWD on the codes widened to 16 bits (32 products of
 * at most 128 * 32768 fit an int32), the float sum of x exact. One pass over the weight serves every row
 * of x. The codes are split out of their bytes by 16-bit shifts and masks, with x's codes stored in the
 * matching order (x_slot), so no byte shuffles or widenings: 1.55x the VPMOVZXBW way at one row on the
 * Zen 3 (75 vs 116 us for a 3072 x 576 4-bit weight, one thread, hot). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "f32_avx2.h"

#define BLOCK 32
#define MAX_ROWS 16
#define GROUP_ROWS 8 /* rows whose accumulators stay in registers: more go through a chunk of columns in groups */
#define CHUNK 64     /* columns a thread takes at a time, so a second group of rows reads them from cache */
/* weights below which one thread does all (a team's wake-up costs about what it saves there; 1 << 19 and
 * always-split measured the same on the Zen 3, while single-threaded gate/up and down cost 3 ms a step) */
#define PAR_WORK (1 << 19)

/* The order x's int16 codes take, so that each code meets its weight with no shuffle: the weight bytes are
 * read as 16-bit words and split by shifts and masks alone (see q4_columns, q8_columns).
 * - 4-bit: word i (i < 8) of a block's 16 bytes holds weights 2i, 2i + 16 (byte 2i's nibbles) and 2i + 1,
 *   2i + 17 (byte 2i + 1's); a pair of blocks is one 256-bit load, a block per 128-bit half. So the codes of
 *   a pair come as four vectors of 16 (groups g = 0..3 for weights 2i, 2i + 16, 2i + 1, 2i + 17), each the
 *   first block's 8 then the second's; a last, unpaired block as four groups of 8.
 * - 8-bit: word i (i < 16) of a block's 32 bytes holds weights 2i and 2i + 1: two vectors of 16. */
static inline int x_slot(int bits, int blocks, int b, int j) {
    if (bits == 8) return b * BLOCK + (j & 1) * 16 + j / 2;
    int g = j < 16 ? ((j & 1) ? 2 : 0) : ((j & 1) ? 3 : 1), i = (j % 16) / 2;
    int paired = b / 2 * 2 + 1 < blocks;
    return b / 2 * 64 + (paired ? g * 16 + (b & 1) * 8 : g * 8) + i;
}

/* One row of x (k floats) into int16 blocks xq (in x_slot's order), their scales dx and float sums sx. */
static void quantize_row(int bits, const float *x, int k, int16_t *xq, float *dx, float *sx) {
    const int blocks = k / BLOCK;
    for (int b = 0; b < blocks; b++) {
        const float *xb = x + b * BLOCK;
        float amax = 0.f, sum = 0.f;
        for (int j = 0; j < BLOCK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
            sum += xb[j];
        }
        float d = amax / 32767.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
        for (int j = 0; j < BLOCK; j++) xq[x_slot(bits, blocks, b, j)] = (int16_t)lrintf(xb[j] * inv);
        dx[b] = d;
        sx[b] = sum;
    }
}

/* Columns [c0, c1) of out for R rows of x (a compile-time constant where inlined, so each row's
 * accumulators stay in registers). A pair of blocks is one load of 32 code bytes; its four nibbles per
 * 16-bit word come out by shifts and masks; their products with x land in one vector of int32, the first
 * block's in the low four lanes, the second's in the high four, scaled by a vector of the two blocks'
 * scales. The offsets' part is summed after the blocks, 8 blocks at a time. */
static inline __attribute__((always_inline)) void q4_columns(int R, const int16_t *xq, const float *dx,
                                                          const float *dxv, const float *sx, int k,
                                                          const uint8_t *codes, const float *params, int c0,
                                                          int c1, float *out, int64_t out_stride) {
    const int blocks = k / BLOCK, pairs = blocks / 2;
    const __m256i nib = _mm256_set1_epi16(0x0F);
    const __m256i twice = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    for (int c = c0; c < c1; c++) {
        const uint8_t *wc = codes + (size_t)c * (k / 2);
        const float *scale = params + (size_t)c * blocks * 2, *offset = scale + blocks;
        __m256 acc[GROUP_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        for (int p = 0; p < pairs; p++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(wc + p * 32));
            __m256i q0 = _mm256_and_si256(raw, nib), q1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib);
            __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(raw, 8), nib), q3 = _mm256_srli_epi16(raw, 12);
            /* the pair's scales, each over its block's four lanes */
            __m256 s = _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd((const double *)(scale + 2 * p)))), twice);
            for (int r = 0; r < R; r++) {
                const __m256i *xr = (const __m256i *)(xq + (size_t)r * k + p * 64);
                __m256i d = _mm256_add_epi32(
                    _mm256_add_epi32(_mm256_madd_epi16(q0, _mm256_load_si256(xr)),
                                     _mm256_madd_epi16(q1, _mm256_load_si256(xr + 1))),
                    _mm256_add_epi32(_mm256_madd_epi16(q2, _mm256_load_si256(xr + 2)),
                                     _mm256_madd_epi16(q3, _mm256_load_si256(xr + 3))));
                __m256 f = _mm256_mul_ps(s, _mm256_load_ps(dxv + ((size_t)r * pairs + p) * 8));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), f, acc[r]);
            }
        }
        float last[GROUP_ROWS] = {0};
        if (blocks & 1) {
            const int b = blocks - 1;
            const __m128i raw = _mm_loadu_si128((const __m128i *)(wc + b * 16)), n4 = _mm_set1_epi16(0x0F);
            __m128i q0 = _mm_and_si128(raw, n4), q1 = _mm_and_si128(_mm_srli_epi16(raw, 4), n4);
            __m128i q2 = _mm_and_si128(_mm_srli_epi16(raw, 8), n4), q3 = _mm_srli_epi16(raw, 12);
            for (int r = 0; r < R; r++) {
                const __m128i *xr = (const __m128i *)(xq + (size_t)r * k + b * BLOCK);
                __m128i d = _mm_add_epi32(_mm_add_epi32(_mm_madd_epi16(q0, _mm_load_si128(xr)),
                                                        _mm_madd_epi16(q1, _mm_load_si128(xr + 1))),
                                          _mm_add_epi32(_mm_madd_epi16(q2, _mm_load_si128(xr + 2)),
                                                        _mm_madd_epi16(q3, _mm_load_si128(xr + 3))));
                d = _mm_add_epi32(d, _mm_shuffle_epi32(d, 0x4E));
                d = _mm_add_epi32(d, _mm_shuffle_epi32(d, 0xB1));
                last[r] = (float)_mm_cvtsi128_si32(d) * (scale[b] * dx[r * blocks + b]);
            }
        }
        for (int r = 0; r < R; r++) {
            const float *sr = sx + r * blocks;
            __m256 o = _mm256_setzero_ps();
            int j = 0;
            for (; j + 8 <= blocks; j += 8) o = _mm256_fmadd_ps(_mm256_loadu_ps(offset + j), _mm256_loadu_ps(sr + j), o);
            float tail = last[r];
            for (; j < blocks; j++) tail += offset[j] * sr[j];
            out[r * out_stride + c] = hsum(_mm256_add_ps(acc[r], o)) + tail;
        }
    }
}

/* The same for 8-bit codes (n, k) int8 and scales (n, k / 32): a block is one load, its bytes
 * sign-extended by shifts of the 16-bit words; even and odd blocks on two chains. */
static inline __attribute__((always_inline)) void q8_columns(int R, const int16_t *xq, const float *dx, int k,
                                                             const int8_t *codes, const float *scales, int c0,
                                                             int c1, float *out, int64_t out_stride) {
    const int blocks = k / BLOCK;
    for (int c = c0; c < c1; c++) {
        const int8_t *wc = codes + (size_t)c * k;
        const float *scale = scales + (size_t)c * blocks;
        __m256 even[GROUP_ROWS], odd[GROUP_ROWS];
        for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(wc + b * BLOCK));
            __m256i qa = _mm256_srai_epi16(_mm256_slli_epi16(raw, 8), 8), qb = _mm256_srai_epi16(raw, 8);
            for (int r = 0; r < R; r++) {
                const __m256i *xr = (const __m256i *)(xq + (size_t)r * k + b * BLOCK);
                __m256i d = _mm256_add_epi32(_mm256_madd_epi16(qa, _mm256_load_si256(xr)),
                                             _mm256_madd_epi16(qb, _mm256_load_si256(xr + 1)));
                __m256 f = _mm256_set1_ps(scale[b] * dx[r * blocks + b]);
                if (b & 1)
                    odd[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), f, odd[r]);
                else
                    even[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), f, even[r]);
            }
        }
        for (int r = 0; r < R; r++) out[r * out_stride + c] = hsum(_mm256_add_ps(even[r], odd[r]));
    }
}

/* out[r, c] = sum_i x[r, i] * w[c, i] for r < rows (1..MAX_ROWS), c < n, w 4-bit (bits 4: codes uint8
 * (n, k / 2), params (n, 2, k / 32)) or 8-bit (bits 8: codes int8 (n, k), params the scales (n, k / 32)).
 * silu_mul: each row of x is [gate (k), up (k)] and the input is silu(gate) * up (SwiGLU's down
 * projection), made as pdbox_silu_and_mul_f32 makes it. Returns 0, or -1 for bad sizes, -2 when scratch
 * memory could not be had. */
int pdbox_quant_linear(int bits, const float *x, int64_t x_stride, int rows, int k, const void *codes,
                       const float *params, int n, float *out, int64_t out_stride, int threads, int silu_mul) {
    if ((bits != 4 && bits != 8) || rows < 1 || rows > MAX_ROWS || k < BLOCK || k % BLOCK || n < 1) return -1;
    const int blocks = k / BLOCK;
    const int pairs = blocks / 2;
    int16_t *xq = aligned_alloc(32, sizeof(int16_t) * rows * k);
    float *dx = malloc(sizeof(float) * rows * blocks), *sx = malloc(sizeof(float) * rows * blocks);
    float *dxv = aligned_alloc(32, sizeof(float) * 8 * (rows * pairs + 1)); /* a pair's two dx, four lanes each */
    float *act = silu_mul ? malloc(sizeof(float) * k) : NULL;
    if (!xq || !dx || !sx || !dxv || (silu_mul && !act)) {
        free(xq), free(dx), free(sx), free(dxv), free(act);
        return -2;
    }
    for (int r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        if (silu_mul) {
            for (int i = 0; i < k; i += 8)
                _mm256_storeu_ps(act + i, silu_mul_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(xr + k + i)));
            xr = act;
        }
        quantize_row(bits, xr, k, xq + (size_t)r * k, dx + r * blocks, sx + r * blocks);
        for (int p = 0; p < pairs; p++)
            for (int j = 0; j < 8; j++) dxv[((size_t)r * pairs + p) * 8 + j] = dx[r * blocks + 2 * p + j / 4];
    }
    int team = (int64_t)n * k >= PAR_WORK && threads > 1 ? threads : 1;
#pragma omp parallel num_threads(team)
    {
        int t = 0, size = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), size = omp_get_num_threads();
#endif
        int per = (n + size - 1) / size, c0 = t * per, c1 = c0 + per < n ? c0 + per : n;
        for (int cc = c0; cc < c1; cc += CHUNK) {
            const int ce = cc + CHUNK < c1 ? cc + CHUNK : c1;
            for (int g = 0; g < rows; g += GROUP_ROWS) {
                const int16_t *gq = xq + (size_t)g * k;
                const float *gdx = dx + g * blocks, *gdxv = dxv + (size_t)g * pairs * 8, *gsx = sx + g * blocks;
                float *gout = out + g * out_stride;
                switch (rows - g < GROUP_ROWS ? rows - g : GROUP_ROWS) {
#define ROWS(R)                                                                                \
    case R:                                                                                    \
        if (bits == 4)                                                                         \
            q4_columns(R, gq, gdx, gdxv, gsx, k, codes, params, cc, ce, gout, out_stride);     \
        else                                                                                   \
            q8_columns(R, gq, gdx, k, codes, params, cc, ce, gout, out_stride);                \
        break;
                    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
#undef ROWS
                }
            }
        }
    }
    free(xq), free(dx), free(sx), free(dxv), free(act);
    return 0;
}
