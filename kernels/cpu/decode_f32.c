/* Decode attention in fp32 on AVX2: one new token per request over its paged context, the `cpu`
 * backend's fp32 path (kernels/cpu/flash_decode.py checks the arguments and calls it). The same job as
 * pdbox_flash_decode (flash_attention.c, bf16 on AVX-512) with the same arguments.
 *
 * One unit of work is a (request, KV head): its query heads share each K and V row read, straight from
 * the pages; blocks of BLK rows get their scores (eight rows' dot products reduced across lanes
 * together), then one online-softmax update (running max and sum per head, the accumulator rescaled
 * once a block), then their V rows (64 output columns at a time in registers).
 *
 * A context longer than SPLIT rows is cut into parts of SPLIT rows, each a unit of its own (a batch of one
 * has as few units as KV heads, too few to keep two cores busy); each part leaves its running max, sum
 * and unnormalised output, and a second pass merges a request's parts. Each unit is computed alone and
 * the parts depend only on the request's own length, so a request's result does not depend on the batch
 * it came in nor on the thread count. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "f32_avx2.h"

#define MAX_D 256
#define MAX_G 16
#define BLK 64
/* context rows x query heads below which one thread does all. A serving step finds the KV cold (it has
 * streamed every layer's weights since), and cold rows come at ~7 GB/s to one core here, so two threads
 * pay from a few hundred rows on; a step's team is awake from its GEMVs. */
#define PAR_WORK (1 << 11)
#define SPLIT 512 /* context rows per unit, at most (a multiple of BLK) */

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

/* Rows [begin, end) of request b for KV head g: into out, normalised, when part is NULL; else each query
 * head's max, sum and unnormalised output into part[i * (d + 2) ...], for merge(). */
static void unit(const job_t *jb, int b, int g, int begin, int end, float *part) {
    const int G = jb->hq / jb->hkv, d = jb->d, nv = d / 8;
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
    for (int j0 = begin; j0 < end; j0 += BLK) {
        const int n = end - j0 < BLK ? end - j0 : BLK;
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
        if (part) {
            float *at = part + (int64_t)i * (d + 2);
            at[0] = m[i], at[1] = l[i];
            memcpy(at + 2, acc[i], sizeof(float) * d);
            continue;
        }
        float *o = jb->out + b * jb->out_row + (int64_t)(g * G + i) * jb->out_head;
        const __m256 inv = _mm256_set1_ps(1.f / l[i]);
        for (int c = 0; c < nv; c++) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(_mm256_load_ps(acc[i] + 8 * c), inv));
    }
}

static inline int parts_of(int64_t len) { return len > SPLIT ? (int)((len + SPLIT - 1) / SPLIT) : 1; }

/* The parts of request b, KV head g (parts[p * G * (d + 2)]): softmax's sums rescaled to the largest max. */
static void merge(const job_t *jb, int b, int g, const float *parts) {
    const int G = jb->hq / jb->hkv, d = jb->d, n = parts_of(jb->lens[b]);
    const int64_t stride = (int64_t)G * (d + 2);
    for (int i = 0; i < G; i++) {
        const float *first = parts + (int64_t)i * (d + 2);
        float mx = first[0], l = 0.f;
        for (int p = 1; p < n; p++) mx = fmaxf(mx, first[p * stride]);
        float acc[MAX_D] __attribute__((aligned(32))) = {0};
        for (int p = 0; p < n; p++) {
            const float *at = first + p * stride, w = expf(at[0] - mx);
            l += at[1] * w;
            const __m256 wv = _mm256_set1_ps(w);
            for (int c = 0; c < d; c += 8)
                _mm256_store_ps(acc + c, _mm256_fmadd_ps(_mm256_loadu_ps(at + 2 + c), wv, _mm256_load_ps(acc + c)));
        }
        float *o = jb->out + b * jb->out_row + (int64_t)(g * G + i) * jb->out_head;
        const __m256 inv = _mm256_set1_ps(1.f / l);
        for (int c = 0; c < d; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_load_ps(acc + c), inv));
    }
}

/* Returns 0, -1 for sizes the kernel does not take (the Python side checks them first; page_size a power
 * of two), or -3 when its scratch could not be allocated. */
int pdbox_decode_f32(const float *q, int64_t q_row, int64_t q_head, const float *k_cache, const float *v_cache,
                     int64_t page_stride, int page_size, const int64_t *table, int64_t table_row, const int64_t *lens,
                     int batch, int hq, int hkv, int d, float scale, float *out, int64_t out_row, int64_t out_head,
                     int threads) {
    if (d % 8 || d > MAX_D || hkv < 1 || hq % hkv || hq / hkv > MAX_G || batch < 1 || page_size < 1
        || page_size & (page_size - 1))
        return -1;
    job_t jb = {q, k_cache, v_cache, q_row, q_head, page_stride, table_row, out_row, out_head, table, lens,
                __builtin_ctz(page_size), hq, hkv, d, scale, out};
    const int G = hq / hkv;
    int64_t work = 0;
    int units = 0, split = 0; /* units in all; (request, KV head) pairs whose context is cut */
    for (int b = 0; b < batch; b++) {
        work += lens[b] * hq;
        units += hkv * parts_of(lens[b]);
        split += parts_of(lens[b]) > 1 ? hkv : 0;
    }
    const int team = work >= PAR_WORK && threads > 1 && units > 1 ? (threads < units ? threads : units) : 1;
    if (!split) { /* no context is cut: a unit per (request, KV head), straight to out */
#pragma omp parallel for num_threads(team) schedule(static)
        for (int u = 0; u < units; u++) unit(&jb, u / hkv, u % hkv, 0, (int)lens[u / hkv], NULL);
        return 0;
    }
    /* per unit: request, KV head, part (a cut context's unit x leaves its part at scratch[x]); per merge:
     * request, KV head, its first unit */
    int *plan = malloc(sizeof(int) * (3 * (size_t)units + 3 * (size_t)split));
    float *scratch = malloc(sizeof(float) * (size_t)units * G * (d + 2));
    if (!plan || !scratch) {
        free(plan);
        free(scratch);
        return -3;
    }
    int *merges = plan + 3 * units, u = 0, nm = 0;
    for (int b = 0; b < batch; b++)
        for (int g = 0; g < hkv; g++) {
            const int n = parts_of(lens[b]);
            if (n > 1) merges[3 * nm] = b, merges[3 * nm + 1] = g, merges[3 * nm + 2] = u, nm++;
            for (int p = 0; p < n; p++, u++) plan[3 * u] = b, plan[3 * u + 1] = g, plan[3 * u + 2] = p;
        }
    const int64_t part_floats = (int64_t)G * (d + 2);
#pragma omp parallel num_threads(team)
    {
#pragma omp for schedule(dynamic, 1)
        for (int x = 0; x < units; x++) {
            const int *w = plan + 3 * x;
            const int begin = w[2] * SPLIT, end = (int)(lens[w[0]] < begin + SPLIT ? lens[w[0]] : begin + SPLIT);
            unit(&jb, w[0], w[1], begin, end, parts_of(lens[w[0]]) > 1 ? scratch + x * part_floats : NULL);
        }
#pragma omp for schedule(static)
        for (int x = 0; x < nm; x++)
            merge(&jb, merges[3 * x], merges[3 * x + 1], scratch + merges[3 * x + 2] * part_floats);
    }
    free(plan);
    free(scratch);
    return 0;
}
