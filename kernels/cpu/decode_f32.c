/* Decode attention in fp32 on AVX2: one new token per request over its paged context, the `cpu`
 * backend's fp32 path (kernels/cpu/flash_decode.py checks the arguments and calls it). The same job as
 * pdbox_flash_decode (flash_attention.c, bf16 on AVX-512) with the same arguments.
 *
 * One unit of work is a (request, KV head): its query heads share each K and V row read, straight from
 * the pages; blocks of BLK rows get their scores, then one online-softmax update (running max and sum
 * per head, the accumulator rescaled once a block), then their V rows. Each unit is computed alone, so
 * a request's result does not depend on the batch it came in. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "f32_avx2.h"

#define MAX_D 256
#define MAX_G 16
#define BLK 64
#define PAR_WORK (1 << 16) /* context rows x query heads below which one thread does all */

typedef struct {
    const float *q, *k, *v;
    int64_t q_row, q_head, page_stride, table_row, out_row, out_head;
    const int64_t *table, *lens;
    int page_size, hq, hkv, d;
    float scale;
    float *out;
} job_t;

static void unit(const job_t *jb, int b, int g) {
    const int G = jb->hq / jb->hkv, d = jb->d, nv = d / 8, len = (int)jb->lens[b];
    const int64_t *pages = jb->table + b * jb->table_row;
    const int64_t row = (int64_t)jb->hkv * d;
    float acc[MAX_G][MAX_D] __attribute__((aligned(32)));
    float s[MAX_G][BLK] __attribute__((aligned(32)));
    float m[MAX_G], l[MAX_G];
    const float *q[MAX_G];
    for (int i = 0; i < G; i++) {
        q[i] = jb->q + b * jb->q_row + (int64_t)(g * G + i) * jb->q_head;
        m[i] = -INFINITY, l[i] = 0.f;
        memset(acc[i], 0, sizeof(float) * d);
    }
    for (int j0 = 0; j0 < len; j0 += BLK) {
        const int n = len - j0 < BLK ? len - j0 : BLK;
        for (int jj = 0; jj < n; jj++) {
            const int j = j0 + jj;
            const float *kr = jb->k + pages[j / jb->page_size] * jb->page_stride + (j % jb->page_size) * row + g * d;
            for (int i = 0; i < G; i++) {
                __m256 dot = _mm256_mul_ps(_mm256_loadu_ps(q[i]), _mm256_loadu_ps(kr));
                for (int c = 1; c < nv; c++)
                    dot = _mm256_fmadd_ps(_mm256_loadu_ps(q[i] + 8 * c), _mm256_loadu_ps(kr + 8 * c), dot);
                s[i][jj] = hsum(dot) * jb->scale;
            }
        }
        for (int i = 0; i < G; i++) {
            float mx = m[i];
            for (int jj = 0; jj < n; jj++) mx = s[i][jj] > mx ? s[i][jj] : mx;
            const float alpha = expf(m[i] - mx); /* 0 on the first block (m = -inf) */
            const __m256 mv = _mm256_set1_ps(mx);
            __m256 sum = _mm256_setzero_ps();
            int jj = 0;
            for (; jj + 8 <= n; jj += 8) {
                __m256 p = exp_ps(_mm256_sub_ps(_mm256_load_ps(s[i] + jj), mv));
                _mm256_store_ps(s[i] + jj, p);
                sum = _mm256_add_ps(sum, p);
            }
            float tail = 0.f;
            for (; jj < n; jj++) tail += (s[i][jj] = expf(s[i][jj] - mx));
            l[i] = l[i] * alpha + hsum(sum) + tail;
            m[i] = mx;
            const __m256 av = _mm256_set1_ps(alpha);
            for (int c = 0; c < nv; c++) _mm256_store_ps(acc[i] + 8 * c, _mm256_mul_ps(_mm256_load_ps(acc[i] + 8 * c), av));
        }
        for (int jj = 0; jj < n; jj++) {
            const int j = j0 + jj;
            const float *vr = jb->v + pages[j / jb->page_size] * jb->page_stride + (j % jb->page_size) * row + g * d;
            for (int i = 0; i < G; i++) {
                const __m256 p = _mm256_set1_ps(s[i][jj]);
                for (int c = 0; c < nv; c++)
                    _mm256_store_ps(acc[i] + 8 * c, _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * c),
                                                                    _mm256_load_ps(acc[i] + 8 * c)));
            }
        }
    }
    for (int i = 0; i < G; i++) {
        float *o = jb->out + b * jb->out_row + (int64_t)(g * G + i) * jb->out_head;
        const __m256 inv = _mm256_set1_ps(1.f / l[i]);
        for (int c = 0; c < nv; c++) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(_mm256_load_ps(acc[i] + 8 * c), inv));
    }
}

/* Returns 0, or -1 for sizes the kernel does not take (the Python side checks them first). */
int pdbox_decode_f32(const float *q, int64_t q_row, int64_t q_head, const float *k_cache, const float *v_cache,
                     int64_t page_stride, int page_size, const int64_t *table, int64_t table_row, const int64_t *lens,
                     int batch, int hq, int hkv, int d, float scale, float *out, int64_t out_row, int64_t out_head,
                     int threads) {
    if (d % 8 || d > MAX_D || hkv < 1 || hq % hkv || hq / hkv > MAX_G || batch < 1 || page_size < 1) return -1;
    job_t jb = {q, k_cache, v_cache, q_row, q_head, page_stride, table_row, out_row, out_head, table, lens,
                page_size, hq, hkv, d, scale, out};
    int64_t work = 0;
    for (int b = 0; b < batch; b++) work += lens[b] * hq;
    const int units = batch * hkv;
    const int team = work >= PAR_WORK && threads > 1 && units > 1 ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static)
    for (int u = 0; u < units; u++) unit(&jb, u / hkv, u % hkv);
    return 0;
}
