/* The pointwise pieces of an fp32 layer on AVX2, each one pass and one call where torch takes several ops
 * (and a Python call each): the residual add with RMSNorm, rotary, SiLU-and-mul, and the KV store. A
 * decode step of SmolLM2 makes about 150 of these calls, each over a row of 576 to 3072 floats, so the
 * calls, not the bytes, are their cost. kernels/cpu/pointwise.py checks the arguments and calls them.
 * Rows go to `threads` OpenMP threads when there are enough of them.
 *
 * Every row is computed alone, so a row's result does not depend on the batch it came in. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "f32_avx2.h"

#define PAR_ROWS 16 /* fewer rows run on the calling thread */

/* residual_out = residual + x (x absent when NULL); out = rmsnorm(residual_out) * weight */
int pdbox_add_rmsnorm_f32(const float *x, int64_t x_row, const float *residual, int64_t r_row, float *residual_out,
                          const float *weight, float *out, int rows, int h, float eps, int threads) {
    if (h % 8 || h <= 0 || rows < 0) return -1;
#pragma omp parallel for num_threads(threads) if (rows >= PAR_ROWS && threads > 1) schedule(static)
    for (int t = 0; t < rows; t++) {
        const float *r = residual + t * r_row;
        float *ro = residual_out + (int64_t)t * h;
        __m256 ss = _mm256_setzero_ps();
        for (int i = 0; i < h; i += 8) {
            __m256 v = _mm256_loadu_ps(r + i);
            if (x) v = _mm256_add_ps(_mm256_loadu_ps(x + t * x_row + i), v);
            _mm256_storeu_ps(ro + i, v);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum(ss) / (float)h + eps));
        for (int i = 0; i < h; i += 8)
            _mm256_storeu_ps(out + (int64_t)t * h + i,
                             _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(ro + i), inv), _mm256_loadu_ps(weight + i)));
    }
    return 0;
}

/* out[t] = silu(gate) * up for x[t] = [gate (n), up (n)] */
int pdbox_silu_and_mul_f32(const float *x, int64_t x_row, float *out, int rows, int n, int threads) {
    if (n % 8 || n <= 0 || rows < 0) return -1;
#pragma omp parallel for num_threads(threads) if (rows >= PAR_ROWS && threads > 1) schedule(static)
    for (int t = 0; t < rows; t++) {
        const float *g = x + t * x_row, *u = g + n;
        for (int i = 0; i < n; i += 8)
            _mm256_storeu_ps(out + (int64_t)t * n + i, silu_mul_ps(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    }
    return 0;
}

/* Rotate-half rotary of `heads` heads of x (row t at x + t * x_row, head stride x_head) into out
 * (contiguous [rows][heads][d]): [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] at position pos[t], cos
 * and sin from the fp32 cache row (cos in its first d/2, sin in the second). x * cos, then the rolled
 * x * sin added by one FMA, as the torch path's addcmul_ computes them: bit-equal to it. */
int pdbox_rotary_f32(const float *x, int64_t x_row, int64_t x_head, const int64_t *pos, const float *cache,
                     int64_t cache_row, float *out, int rows, int heads, int d, int threads) {
    if (d % 16 || d <= 0 || rows < 0 || heads <= 0) return -1;
    const int half = d / 2;
#pragma omp parallel for num_threads(threads) if (rows >= PAR_ROWS && threads > 1) schedule(static)
    for (int t = 0; t < rows; t++) {
        const float *cs = cache + pos[t] * cache_row;
        for (int hh = 0; hh < heads; hh++) {
            const float *src = x + t * x_row + hh * x_head;
            float *dst = out + ((int64_t)t * heads + hh) * d;
            for (int i = 0; i < half; i += 8) {
                const __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(cs + half + i);
                const __m256 x1 = _mm256_loadu_ps(src + i), x2 = _mm256_loadu_ps(src + half + i);
                _mm256_storeu_ps(dst + i, _mm256_fmadd_ps(x2, _mm256_sub_ps(_mm256_setzero_ps(), s), _mm256_mul_ps(x1, c)));
                _mm256_storeu_ps(dst + half + i, _mm256_fmadd_ps(x1, s, _mm256_mul_ps(x2, c)));
            }
        }
    }
    return 0;
}

/* k_cache/v_cache rows slots[t] = k/v row t (width floats each): the KV store. Returns -2 without
 * writing anything if a slot lies outside [0, total_slots). */
int pdbox_store_kv_f32(const float *k, int64_t k_row, const float *v, int64_t v_row, const int64_t *slots, int rows,
                       int64_t width, float *k_cache, float *v_cache, int64_t total_slots) {
    if (width <= 0 || rows < 0) return -1;
    for (int t = 0; t < rows; t++)
        if (slots[t] < 0 || slots[t] >= total_slots) return -2;
    for (int t = 0; t < rows; t++) {
        memcpy(k_cache + slots[t] * width, k + t * k_row, sizeof(float) * width);
        memcpy(v_cache + slots[t] * width, v + t * v_row, sizeof(float) * width);
    }
    return 0;
}
