/* The pointwise pieces of a bf16 layer on AVX-512, each one pass over memory where torch takes several
 * ops (and a Python call each): the residual add with RMSNorm, rotary, SiLU-and-mul (fp32 math, one
 * rounding to bf16 at the end), and the KV store. kernels/cpu/build.py builds it; kernels/cpu/pointwise.py checks the
 * arguments and calls it. Rows go to `threads` OpenMP threads when there are enough of them.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16_avx512.h"

#define PAR_ROWS 16 /* fewer rows run on the calling thread */

static inline float hsum(__m512 x) { return _mm512_reduce_add_ps(x); }

/* residual_out = residual + x (fp32; x bf16, or absent when NULL); out = bf16(rmsnorm(residual_out) * weight) */
int pdbox_add_rmsnorm(const bf16 *x, int64_t x_row, const float *residual, int64_t r_row, float *residual_out,
                      const float *weight, bf16 *out, int rows, int h, float eps, int threads) {
    if (h % 16 || h <= 0 || rows < 0) return -1;
#pragma omp parallel for num_threads(threads) if (rows >= PAR_ROWS && threads > 1) schedule(static)
    for (int t = 0; t < rows; t++) {
        const float *r = residual + t * r_row;
        float *ro = residual_out + (int64_t)t * h;
        __m512 ss = _mm512_setzero_ps();
        for (int i = 0; i < h; i += 16) {
            __m512 v = _mm512_loadu_ps(r + i);
            if (x) v = _mm512_add_ps(widen(x + t * x_row + i), v);
            _mm512_storeu_ps(ro + i, v);
            ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(hsum(ss) / (float)h + eps));
        for (int i = 0; i < h; i += 16)
            narrow(out + (int64_t)t * h + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(ro + i), inv),
                                                          _mm512_loadu_ps(weight + i)));
    }
    return 0;
}

/* out[t] = bf16(silu(gate) * up) for x[t] = [gate (n), up (n)] */
int pdbox_silu_and_mul(const bf16 *x, int64_t x_row, bf16 *out, int rows, int n, int threads) {
    if (n % 16 || n <= 0 || rows < 0) return -1;
#pragma omp parallel for num_threads(threads) if (rows >= PAR_ROWS && threads > 1) schedule(static)
    for (int t = 0; t < rows; t++) {
        const bf16 *g = x + t * x_row, *u = g + n;
        for (int i = 0; i < n; i += 16) {
            const __m512 gv = widen(g + i);
            const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            narrow(out + (int64_t)t * n + i, _mm512_mul_ps(s, widen(u + i)));
        }
    }
    return 0;
}

/* Rotate-half rotary of `heads` heads of x (row t at x + t * x_row, head stride x_head) into out
 * (contiguous [rows][heads][d]): [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] at position pos[t], cos
 * and sin from the fp32 cache row (cos in its first d/2, sin in the second). Products and sums as
 * separate ops (no FMA), the same as the torch path computes them. */
int pdbox_rotary(const bf16 *x, int64_t x_row, int64_t x_head, const int64_t *pos, const float *cache,
                 int64_t cache_row, bf16 *out, int rows, int heads, int d, int threads) {
    if (d % 32 || d <= 0 || rows < 0 || heads <= 0) return -1;
    const int half = d / 2;
#pragma omp parallel for num_threads(threads) if (rows >= PAR_ROWS && threads > 1) schedule(static)
    for (int t = 0; t < rows; t++) {
        const float *cs = cache + pos[t] * cache_row;
        for (int hh = 0; hh < heads; hh++) {
            const bf16 *src = x + t * x_row + hh * x_head;
            bf16 *dst = out + ((int64_t)t * heads + hh) * d;
            for (int i = 0; i < half; i += 16) {
                const __m512 c = _mm512_loadu_ps(cs + i), s = _mm512_loadu_ps(cs + half + i);
                const __m512 x1 = widen(src + i), x2 = widen(src + half + i);
                narrow(dst + i, _mm512_add_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, _mm512_sub_ps(_mm512_setzero_ps(), s))));
                narrow(dst + half + i, _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s)));
            }
        }
    }
    return 0;
}

/* k_cache/v_cache rows slots[t] = k/v row t (kv_heads * d elements each, bf16): the KV store. Returns
 * -2 without writing anything if a slot lies outside [0, total_slots). */
int pdbox_store_kv(const bf16 *k, int64_t k_row, const bf16 *v, int64_t v_row, const int64_t *slots, int rows,
                   int64_t width, bf16 *k_cache, bf16 *v_cache, int64_t total_slots) {
    if (width <= 0 || rows < 0) return -1;
    for (int t = 0; t < rows; t++)
        if (slots[t] < 0 || slots[t] >= total_slots) return -2;
    for (int t = 0; t < rows; t++) {
        memcpy(k_cache + slots[t] * width, k + t * k_row, sizeof(bf16) * width);
        memcpy(v_cache + slots[t] * width, v + t * v_row, sizeof(bf16) * width);
    }
    return 0;
}
