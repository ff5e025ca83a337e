/* Decode attention in fp32 on AVX2: one new token per request over its paged context, the `cpu`
 * backend's fp32 path (kernels/cpu/flash_decode.py checks the arguments and calls it). The same job as
 * pdbox_flash_decode (flash_attention.c, bf16 on AVX-512) with the same arguments.
 *
 * One unit of work is a (request, KV head): its query heads share each K and V row read, straight from
 * the pages; blocks of BLK rows get their scores (eight rows' dot products reduced across lanes
 * together), then one online-softmax update (running max and sum per head, the accumulator rescaled
 * once a block), then their V rows (64 output columns at a time in registers). Each unit is computed
 * alone, so a request's result does not depend on the batch it came in. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "f32_avx2.h"

#define MAX_D 256
#define MAX_G 16
#define BLK 64
/* context rows x query heads below which one thread does all. A serving step finds the KV cold (it has
 * streamed every layer's weights since), and cold rows come at ~7 GB/s to one core here, so two threads
 * pay from a few hundred rows on; a step's team is awake from its GEMVs. */
#define PAR_WORK (1 << 11)

typedef struct {
    const float *q, *k, *v;
    int64_t q_row, q_head, page_stride, table_row, out_row, out_head;
    const int64_t *table, *lens;
    int page_shift, hq, hkv, d; /* page_size = 1 << page_shift: a row's page by shift and mask, not a divide */
    float scale;
    float *out;
} job_t;

/* The sums of eight vectors' lanes, as one vector: lane r holds the sum of a[r]. */
static inline __m256 sum8(const __m256 a[8]) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline float dot(const float *a, const float *b, int nv) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    for (int c = 1; c < nv; c++) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + 8 * c), _mm256_loadu_ps(b + 8 * c), acc);
    return hsum(acc);
}

/* acc[0, 8 cn) = acc * alpha + sum_j p[j] * v[j][col, col + 8 cn): cn vectors held in registers across the rows
 * (inlined with cn = 8 a constant, so they stay there: a runtime count keeps them on the stack). */
static inline __attribute__((always_inline)) void v_rows(float *acc, int cn, __m256 alpha, const float *p,
                                                         const float *const *v, int col, int n) {
    __m256 o[8];
    for (int c = 0; c < cn; c++) o[c] = _mm256_mul_ps(_mm256_load_ps(acc + 8 * c), alpha);
    for (int j = 0; j < n; j++) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int c = 0; c < cn; c++) o[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v[j] + col + 8 * c), o[c]);
    }
    for (int c = 0; c < cn; c++) _mm256_store_ps(acc + 8 * c, o[c]);
}

static void unit(const job_t *jb, int b, int g) {
    const int G = jb->hq / jb->hkv, d = jb->d, nv = d / 8, len = (int)jb->lens[b];
    const int64_t *pages = jb->table + b * jb->table_row;
    const int64_t row = (int64_t)jb->hkv * d, off = (int64_t)g * d;
    float acc[MAX_G][MAX_D] __attribute__((aligned(32)));
    float s[MAX_G][BLK] __attribute__((aligned(32)));
    const float *kp[BLK], *vp[BLK];
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
            const int64_t at = pages[j >> jb->page_shift] * jb->page_stride
                               + (j & ((1 << jb->page_shift) - 1)) * row + off;
            kp[jj] = jb->k + at, vp[jj] = jb->v + at;
        }
        /* scores: eight rows at a time, their dot products summed across lanes together */
        for (int i = 0; i < G; i++) {
            int jj = 0;
            for (; jj + 8 <= n; jj += 8) {
                __m256 a[8];
                for (int r = 0; r < 8; r++) a[r] = _mm256_mul_ps(_mm256_loadu_ps(q[i]), _mm256_loadu_ps(kp[jj + r]));
                for (int c = 1; c < nv; c++) {
                    const __m256 qc = _mm256_loadu_ps(q[i] + 8 * c);
                    for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kp[jj + r] + 8 * c), a[r]);
                }
                _mm256_store_ps(s[i] + jj, _mm256_mul_ps(sum8(a), _mm256_set1_ps(jb->scale)));
            }
            for (; jj < n; jj++) s[i][jj] = dot(q[i], kp[jj], nv) * jb->scale;
        }
        for (int i = 0; i < G; i++) {
            float mx = m[i];
            int jm = 0;
            if (n >= 8) { /* eight lanes at a time: a scalar max is a 64-long dependency chain a block */
                __m256 mv8 = _mm256_load_ps(s[i]);
                for (jm = 8; jm + 8 <= n; jm += 8) mv8 = _mm256_max_ps(mv8, _mm256_load_ps(s[i] + jm));
                __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv8), _mm256_extractf128_ps(mv8, 1));
                h = _mm_max_ps(h, _mm_movehl_ps(h, h));
                h = _mm_max_ss(h, _mm_movehdup_ps(h));
                const float bm = _mm_cvtss_f32(h);
                mx = bm > mx ? bm : mx;
            }
            for (; jm < n; jm++) mx = s[i][jm] > mx ? s[i][jm] : mx;
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
            /* the block's V rows, 64 columns at a time held in registers */
            const __m256 av = _mm256_set1_ps(alpha);
            int c0 = 0;
            for (; c0 + 8 <= nv; c0 += 8) v_rows(acc[i] + 8 * c0, 8, av, s[i], (const float *const *)vp, 8 * c0, n);
            if (c0 < nv) v_rows(acc[i] + 8 * c0, nv - c0, av, s[i], (const float *const *)vp, 8 * c0, n);
        }
    }
    for (int i = 0; i < G; i++) {
        float *o = jb->out + b * jb->out_row + (int64_t)(g * G + i) * jb->out_head;
        const __m256 inv = _mm256_set1_ps(1.f / l[i]);
        for (int c = 0; c < nv; c++) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(_mm256_load_ps(acc[i] + 8 * c), inv));
    }
}

/* Returns 0, or -1 for sizes the kernel does not take (the Python side checks them first; page_size a power
 * of two). */
int pdbox_decode_f32(const float *q, int64_t q_row, int64_t q_head, const float *k_cache, const float *v_cache,
                     int64_t page_stride, int page_size, const int64_t *table, int64_t table_row, const int64_t *lens,
                     int batch, int hq, int hkv, int d, float scale, float *out, int64_t out_row, int64_t out_head,
                     int threads) {
    if (d % 8 || d > MAX_D || hkv < 1 || hq % hkv || hq / hkv > MAX_G || batch < 1 || page_size < 1
        || page_size & (page_size - 1))
        return -1;
    job_t jb = {q, k_cache, v_cache, q_row, q_head, page_stride, table_row, out_row, out_head, table, lens,
                __builtin_ctz(page_size), hq, hkv, d, scale, out};
    int64_t work = 0;
    for (int b = 0; b < batch; b++) work += lens[b] * hq;
    const int units = batch * hkv;
    const int team = work >= PAR_WORK && threads > 1 && units > 1 ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static)
    for (int u = 0; u < units; u++) unit(&jb, u / hkv, u % hkv);
    return 0;
}
