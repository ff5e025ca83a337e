/* Causal prefill attention in fp32 on AVX2: the `cpu` backend's fp32 prefill (kernels/cpu/flash_extend.py
 * checks the arguments and calls it). The same job as pdbox_flash_extend (flash_attention.c, bf16 on
 * AVX-512), with the same arguments:
 *
 *   out[i, h] = softmax_j(scale * q[i, h] . k[j, g]) . v[j, g] over j <= prefix + i, g = h / (hq / hkv).
 *
 * Flash-style: QT = 24 query rows of one head (a tile) at a time, keys in blocks of KB with an online
 * softmax; nothing of size T x S is materialised. A tile's scores are kept transposed (one vector = 8 query
 * rows of one key), so the row max, the row sum and the rescale are vertical vector ops, and the causal
 * mask of a block the diagonal cuts is one compare per key.
 *
 *   q . k: the tile's q rows packed once, [d][24]; each key's k[c] broadcast into KC = 4 keys x 3 vectors
 *          of sums: 12 independent FMA chains, 7 loads per 12 FMAs (16 registers in all).
 *   p . v: out^T [d][24] in registers CV = 4 columns at a time over the block's keys, each v[c] broadcast.
 *
 * On a Zen 3 core this runs at ~70% of the FMA peak: ~9% is the softmax's exps, and ~15% goes to K and V
 * rows that come from L2 (a block's K and V are 32 KB; software prefetch of the next block was slower).
 *
 * K and V rows are read in place from the pages. Work units are (tile, head), longest first, off one atomic
 * counter, so a causal mask's uneven rows balance; each unit is computed whole by one thread, so the
 * thread count does not change a bit of the result.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "f32_avx2.h"

#define NV 3        /* vectors of 8 query rows per tile */
#define QT (8 * NV) /* query rows per tile */
#define KB 64       /* keys per softmax block (a multiple of KC) */
#define KC 4        /* keys per q . k register block */
#define CV 4        /* output columns per p . v register block */
#define MAX_D 256

typedef struct {
    const float *q;
    int64_t q_row, q_head; /* strides, elements */
    const float *k, *v;    /* caches [pages][page_size][hkv][d] */
    int64_t page_stride;   /* elements */
    const int64_t *pages;
    int page_shift;
    int prefix, n_new, hq, hkv, d;
    float scale;
    float *out;
    int64_t o_row, o_head;
    int ntiles, units;
    int next_unit; /* atomic counter */
} job_t;

static const float ZERO_ROW[MAX_D];

static inline const float *kv_row(const job_t *jb, const float *cache, int j, int g) {
    int64_t page = jb->pages[j >> jb->page_shift];
    int64_t slot = j & ((1 << jb->page_shift) - 1);
    return cache + page * jb->page_stride + (slot * jb->hkv + g) * jb->d;
}

static inline __attribute__((always_inline)) void tile(const job_t *jb, int t, int h, const int d) {
    const int g = h / (jb->hq / jb->hkv);
    const int i0 = t * QT;
    const int rows = jb->n_new - i0 < QT ? jb->n_new - i0 : QT;
    const int diag = jb->prefix + i0; /* row r sees keys j <= diag + r */
    const int kend = diag + rows;     /* the tile's last real row sees keys < kend (<= the context) */

    float qt[MAX_D][QT] __attribute__((aligned(32)));
    float s[KB][QT] __attribute__((aligned(32)));
    float ot[MAX_D][QT] __attribute__((aligned(32)));
    const float *kr[KB], *vr[KB];

    for (int r = 0; r < QT; r++) { /* rows past the tile's end are zeros: computed, never written */
        const float *src = r < rows ? jb->q + (int64_t)(i0 + r) * jb->q_row + (int64_t)h * jb->q_head : ZERO_ROW;
        for (int c = 0; c < d; c++) qt[c][r] = src[c];
    }
    memset(ot, 0, sizeof(float) * QT * d);
    __m256 m[NV], l[NV], ridx[NV];
    for (int w = 0; w < NV; w++) {
        m[w] = _mm256_set1_ps(-1e30f);
        l[w] = _mm256_setzero_ps();
        ridx[w] = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                       _mm256_set1_epi32(8 * w)));
    }
    const __m256 scale = _mm256_set1_ps(jb->scale), neg_inf = _mm256_set1_ps(-INFINITY);

    for (int j0 = 0; j0 < kend; j0 += KB) {
        const int nk = kend - j0 < KB ? kend - j0 : KB;
        for (int x = 0; x < nk; x++) {
            kr[x] = kv_row(jb, jb->k, j0 + x, g);
            vr[x] = kv_row(jb, jb->v, j0 + x, g);
        }
        for (int x = nk; x < (nk + KC - 1) / KC * KC; x++) kr[x] = ZERO_ROW; /* a last group's missing keys */
        /* scores, transposed: s[key][row] */
        for (int x0 = 0; x0 < nk; x0 += KC) {
            __m256 a[KC][NV];
            for (int x = 0; x < KC; x++)
                for (int w = 0; w < NV; w++) a[x][w] = _mm256_setzero_ps();
            for (int c = 0; c < d; c++) {
                __m256 qv[NV];
                for (int w = 0; w < NV; w++) qv[w] = _mm256_load_ps(&qt[c][8 * w]);
                for (int x = 0; x < KC; x++) {
                    const __m256 kb = _mm256_broadcast_ss(kr[x0 + x] + c);
                    for (int w = 0; w < NV; w++) a[x][w] = _mm256_fmadd_ps(qv[w], kb, a[x][w]);
                }
            }
            for (int x = 0; x < KC; x++)
                for (int w = 0; w < NV; w++) _mm256_store_ps(&s[x0 + x][8 * w], _mm256_mul_ps(a[x][w], scale));
        }
        /* the causal mask: key j is seen by rows r >= j - diag; keys past the diagonal get -inf */
        const int first_cut = diag + 1 - j0 > 0 ? diag + 1 - j0 : 0; /* keys before it are seen by every row */
        __m256 keep[KB][NV];
        for (int x = first_cut; x < nk; x++) {
            const __m256i lim = _mm256_set1_epi32(j0 + x - diag - 1);
            for (int w = 0; w < NV; w++) {
                keep[x][w] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_castps_si256(ridx[w]), lim));
                _mm256_store_ps(&s[x][8 * w], _mm256_blendv_ps(neg_inf, _mm256_load_ps(&s[x][8 * w]), keep[x][w]));
            }
        }
        /* online softmax: new running max, the old sums and outputs rescaled by exp(old - new) */
        __m256 alpha[NV];
        for (int w = 0; w < NV; w++) {
            __m256 n = m[w];
            for (int x = 0; x < nk; x++) n = _mm256_max_ps(n, _mm256_load_ps(&s[x][8 * w]));
            alpha[w] = exp_ps(_mm256_sub_ps(m[w], n));
            m[w] = n;
            __m256 sum = _mm256_setzero_ps();
            for (int x = 0; x < nk; x++) {
                __m256 p = exp_ps(_mm256_sub_ps(_mm256_load_ps(&s[x][8 * w]), n));
                if (x >= first_cut) p = _mm256_and_ps(p, keep[x][w]); /* exp_ps(-inf) is ~1e-38, not 0 */
                _mm256_store_ps(&s[x][8 * w], p);
                sum = _mm256_add_ps(sum, p);
            }
            l[w] = _mm256_fmadd_ps(l[w], alpha[w], sum);
        }
        /* out^T = out^T * alpha + p . v, CV head dims at a time */
        for (int c = 0; c < d; c += CV) {
            __m256 o[CV][NV];
            for (int y = 0; y < CV; y++)
                for (int w = 0; w < NV; w++) o[y][w] = _mm256_mul_ps(_mm256_load_ps(&ot[c + y][8 * w]), alpha[w]);
            for (int x = 0; x < nk; x++) {
                __m256 p[NV];
                for (int w = 0; w < NV; w++) p[w] = _mm256_load_ps(&s[x][8 * w]);
                const float *vx = vr[x] + c;
                for (int y = 0; y < CV; y++) {
                    const __m256 vb = _mm256_broadcast_ss(vx + y);
                    for (int w = 0; w < NV; w++) o[y][w] = _mm256_fmadd_ps(p[w], vb, o[y][w]);
                }
            }
            for (int y = 0; y < CV; y++)
                for (int w = 0; w < NV; w++) _mm256_store_ps(&ot[c + y][8 * w], o[y][w]);
        }
    }
    /* out[i0 + r, h, c] = out^T[c][r] / l[r] */
    float inv[QT] __attribute__((aligned(32)));
    for (int w = 0; w < NV; w++) _mm256_store_ps(&inv[8 * w], _mm256_div_ps(_mm256_set1_ps(1.0f), l[w]));
    for (int r = 0; r < rows; r++) {
        float *dst = jb->out + (int64_t)(i0 + r) * jb->o_row + (int64_t)h * jb->o_head;
        for (int c = 0; c < d; c++) dst[c] = ot[c][r] * inv[r];
    }
}

static void run_tile(const job_t *jb, int t, int h) {
    switch (jb->d) { /* the common head sizes with a constant d: the loops unroll */
    case 64: tile(jb, t, h, 64); break;
    case 128: tile(jb, t, h, 128); break;
    default: tile(jb, t, h, jb->d); break;
    }
}

static void worker(job_t *jb) {
    for (int u; (u = __atomic_fetch_add(&jb->next_unit, 1, __ATOMIC_RELAXED)) < jb->units;)
        run_tile(jb, jb->ntiles - 1 - u / jb->hq, u % jb->hq); /* the last tiles see the most keys */
}

/* Returns 0, or a negative code for arguments it does not take (checked first in Python). */
int pdbox_extend_f32(const float *q, int64_t q_row, int64_t q_head, const float *k_cache, const float *v_cache,
                     int64_t page_stride, int page_size, const int64_t *pages, int prefix, int n_new, int hq,
                     int hkv, int d, float scale, float *out, int64_t o_row, int64_t o_head, int threads) {
    if (d % 8 || d > MAX_D || d <= 0 || hkv <= 0 || hq % hkv || n_new <= 0 || prefix < 0) return -1;
    if (page_size <= 0 || (page_size & (page_size - 1))) return -2;
    job_t jb = {.q = q, .q_row = q_row, .q_head = q_head, .k = k_cache, .v = v_cache, .page_stride = page_stride,
                .pages = pages, .page_shift = __builtin_ctz(page_size), .prefix = prefix, .n_new = n_new, .hq = hq,
                .hkv = hkv, .d = d, .scale = scale, .out = out, .o_row = o_row, .o_head = o_head};
    jb.ntiles = (n_new + QT - 1) / QT;
    jb.units = jb.ntiles * hq;
    if (threads > jb.units) threads = jb.units;
    if (threads < 1) threads = 1;
    /* OpenMP: in a torch process this is torch's own libgomp, so its pool takes the work */
#pragma omp parallel num_threads(threads)
    worker(&jb);
    return 0;
}
