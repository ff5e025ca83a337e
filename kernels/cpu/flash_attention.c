/* Paged attention in bf16 for CPUs with AVX-512 BF16: the `cpu` backend's prefill (pdbox_flash_extend)
 * and decode (pdbox_flash_decode, at the end). kernels/cpu/build.py builds it; kernels/cpu/flash_*.py
 * check the arguments and call it.
 *
 * pdbox_flash_extend: causal attention of one request's new tokens over its paged KV cache,
 * out[i, h] = softmax_j(scale * q[i, h] . k[j, g]) . v[j, g] over j <= prefix + i, g = h / (hq / hkv).
 *
 * Flash-style: 32 query rows of one head (a tile) at a time, keys in blocks of 64 with an online
 * softmax, nothing of size T x S ever materialised. Layout is chosen so no step needs a horizontal
 * reduction: a tile's scores are kept transposed (one vector = 16 query rows of one key), so row
 * max and row sum are plain vector max/add across keys.
 *
 *   q . k: the tile's q rows packed once as bf16 pairs [d/2][32 rows]; each key's (k[2p], k[2p+1])
 *          broadcast and multiplied in with VDPBF16PS (fp32 sums), keys read in place from the pages.
 *   p . v: probabilities rounded to bf16 and paired along keys [key/2][32 rows]; V packed once per
 *          call as pairs along keys [kv head][key/2][d]; VDPBF16PS again, into fp32 out^T [d][32 rows].
 *
 * Work units are (tile, head), longest first, taken off one atomic counter by `threads` OpenMP threads,
 * so a causal mask's uneven rows balance.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_avx512.h"

#define QT 32 /* query rows per tile: two vectors of 16 */
#define KB 64 /* keys per softmax block */
#define KC 8  /* keys per q.k register block */
#define MAX_D 256
#define PACK_PAIRS 256 /* key pairs per V packing unit */

typedef struct {
    const bf16 *q;
    int64_t q_row, q_head; /* strides, elements */
    const bf16 *k, *v;     /* caches [pages][page_size][hkv][d] */
    int64_t page_stride;   /* elements */
    const int64_t *pages;
    int page_shift;
    int prefix, n_new, hq, hkv, d;
    float scale;
    bf16 *out;
    int64_t o_row, o_head;
    uint32_t *vp; /* [hkv][npairs][d]: (v[2j][c], v[2j+1][c]) */
    int npairs, vpairs, ntiles, units, pack_units;
    int next_pack, packed, next_unit; /* atomic counters */
} job_t;

static const bf16 ZERO_ROW[MAX_D];

static inline const bf16 *kv_row(const job_t *jb, const bf16 *cache, int j, int g) {
    int64_t page = jb->pages[j >> jb->page_shift];
    int64_t slot = j & ((1 << jb->page_shift) - 1);
    return cache + page * jb->page_stride + (slot * jb->hkv + g) * jb->d;
}

static inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

/* V of kv head g, key pairs [p0, p1), into jb->vp. */
static void pack_v(const job_t *jb, int g, int p0, int p1) {
    const int d = jb->d, total = jb->prefix + jb->n_new;
    for (int p = p0; p < p1; p++) {
        int j = 2 * p;
        const bf16 *a = kv_row(jb, jb->v, j, g);
        const bf16 *b = j + 1 < total ? kv_row(jb, jb->v, j + 1, g) : ZERO_ROW;
        uint32_t *dst = jb->vp + ((int64_t)g * jb->npairs + p) * d;
        for (int c = 0; c < d; c++) dst[c] = (uint32_t)a[c] | ((uint32_t)b[c] << 16);
    }
}

static inline __attribute__((always_inline)) void tile(const job_t *jb, int t, int h, const int d) {
    const int g = h / (jb->hq / jb->hkv);
    const int total = jb->prefix + jb->n_new;
    const int i0 = t * QT;
    const int rows = jb->n_new - i0 < QT ? jb->n_new - i0 : QT;
    const int diag = jb->prefix + i0; /* row r sees keys j <= diag + r */
    const int kend = diag + QT < total ? diag + QT : total;

    uint32_t qp[MAX_D / 2][QT] __attribute__((aligned(64)));
    float s[KB][QT] __attribute__((aligned(64)));
    uint32_t pp[KB / 2][QT] __attribute__((aligned(64)));
    float ot[MAX_D][QT] __attribute__((aligned(64)));

    for (int r = 0; r < QT; r++) {
        const uint32_t *src = r < rows ? (const uint32_t *)(jb->q + (i0 + r) * jb->q_row + h * jb->q_head) : 0;
        for (int p = 0; p < d / 2; p++) qp[p][r] = src ? src[p] : 0;
    }
    memset(ot, 0, sizeof(float) * QT * d);
    __m512 m0 = _mm512_set1_ps(-1e30f), m1 = m0, l0 = _mm512_setzero_ps(), l1 = l0;
    const __m512 scale = _mm512_set1_ps(jb->scale);
    const __m512i pair_idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);

    for (int j0 = 0; j0 < kend; j0 += KB) {
        const int nk = kend - j0 < KB ? kend - j0 : KB;
        /* scores, transposed: s[key][row] */
        for (int c = 0; c < nk; c += KC) {
            const uint32_t *kr[KC];
            for (int x = 0; x < KC; x++)
                kr[x] = (const uint32_t *)(j0 + c + x < total ? kv_row(jb, jb->k, j0 + c + x, g) : ZERO_ROW);
            __m512 acc[KC][2];
            for (int x = 0; x < KC; x++) acc[x][0] = acc[x][1] = _mm512_setzero_ps();
            for (int p = 0; p < d / 2; p++) {
                __m512i q0 = _mm512_load_si512(&qp[p][0]), q1 = _mm512_load_si512(&qp[p][16]);
                for (int x = 0; x < KC; x++) {
                    __m512i kb = _mm512_set1_epi32((int)kr[x][p]);
                    acc[x][0] = dp(acc[x][0], q0, kb);
                    acc[x][1] = dp(acc[x][1], q1, kb);
                }
            }
            for (int x = 0; x < KC; x++) {
                _mm512_store_ps(&s[c + x][0], _mm512_mul_ps(acc[x][0], scale));
                _mm512_store_ps(&s[c + x][16], _mm512_mul_ps(acc[x][1], scale));
            }
        }
        /* masks: key j is seen by rows r >= j - diag, and by none at or past `total` */
        __mmask16 v0[KB], v1[KB];
        for (int x = 0; x < KB; x++) {
            int j = j0 + x, lim = j - diag;
            uint32_t mask = x >= nk || j >= total ? 0u : lim <= 0 ? 0xffffffffu : lim >= QT ? 0u : ~((1u << lim) - 1u);
            v0[x] = (__mmask16)(mask & 0xffff);
            v1[x] = (__mmask16)(mask >> 16);
        }
        __m512 n0 = m0, n1 = m1;
        for (int x = 0; x < nk; x++) {
            n0 = _mm512_mask_max_ps(n0, v0[x], n0, _mm512_load_ps(&s[x][0]));
            n1 = _mm512_mask_max_ps(n1, v1[x], n1, _mm512_load_ps(&s[x][16]));
        }
        const __m512 a0 = exp_ps(_mm512_sub_ps(m0, n0)), a1 = exp_ps(_mm512_sub_ps(m1, n1));
        m0 = n0;
        m1 = n1;
        __m512 sum0 = _mm512_setzero_ps(), sum1 = sum0;
        const int np = (nk + 1) / 2;
        for (int x = 0; x < 2 * np; x += 2) {
            __m512 pa0 = _mm512_maskz_mov_ps(v0[x], exp_ps(_mm512_sub_ps(_mm512_load_ps(&s[x][0]), m0)));
            __m512 pa1 = _mm512_maskz_mov_ps(v1[x], exp_ps(_mm512_sub_ps(_mm512_load_ps(&s[x][16]), m1)));
            __m512 pb0 = _mm512_setzero_ps(), pb1 = pb0;
            if (x + 1 < nk) {
                pb0 = _mm512_maskz_mov_ps(v0[x + 1], exp_ps(_mm512_sub_ps(_mm512_load_ps(&s[x + 1][0]), m0)));
                pb1 = _mm512_maskz_mov_ps(v1[x + 1], exp_ps(_mm512_sub_ps(_mm512_load_ps(&s[x + 1][16]), m1)));
            }
            sum0 = _mm512_add_ps(sum0, _mm512_add_ps(pa0, pb0));
            sum1 = _mm512_add_ps(sum1, _mm512_add_ps(pa1, pb1));
            /* cvtne2ps: low 16 lanes from the second operand; pair_idx interleaves (key x, key x+1) per row */
            _mm512_store_si512(&pp[x / 2][0], _mm512_permutexvar_epi16(pair_idx, (__m512i)_mm512_cvtne2ps_pbh(pb0, pa0)));
            _mm512_store_si512(&pp[x / 2][16], _mm512_permutexvar_epi16(pair_idx, (__m512i)_mm512_cvtne2ps_pbh(pb1, pa1)));
        }
        l0 = _mm512_fmadd_ps(l0, a0, sum0);
        l1 = _mm512_fmadd_ps(l1, a1, sum1);
        /* out^T = out^T * alpha + p . v, 8 head dims at a time */
        const uint32_t *vp = jb->vp + ((int64_t)g * jb->npairs + j0 / 2) * d;
        for (int c = 0; c < d; c += 8) {
            __m512 acc[8][2];
            for (int x = 0; x < 8; x++) {
                acc[x][0] = _mm512_mul_ps(_mm512_load_ps(&ot[c + x][0]), a0);
                acc[x][1] = _mm512_mul_ps(_mm512_load_ps(&ot[c + x][16]), a1);
            }
            for (int p = 0; p < np; p++) {
                __m512i p0 = _mm512_load_si512(&pp[p][0]), p1 = _mm512_load_si512(&pp[p][16]);
                const uint32_t *vr = vp + (int64_t)p * d + c;
                for (int x = 0; x < 8; x++) {
                    __m512i vb = _mm512_set1_epi32((int)vr[x]);
                    acc[x][0] = dp(acc[x][0], p0, vb);
                    acc[x][1] = dp(acc[x][1], p1, vb);
                }
            }
            for (int x = 0; x < 8; x++) {
                _mm512_store_ps(&ot[c + x][0], acc[x][0]);
                _mm512_store_ps(&ot[c + x][16], acc[x][1]);
            }
        }
    }
    /* out[i0 + r, h, c] = out^T[c][r] / l[r], rounded to bf16 (nearest even) */
    float inv[QT] __attribute__((aligned(64)));
    _mm512_store_ps(&inv[0], _mm512_div_ps(_mm512_set1_ps(1.0f), l0));
    _mm512_store_ps(&inv[16], _mm512_div_ps(_mm512_set1_ps(1.0f), l1));
    bf16 ob[MAX_D][QT] __attribute__((aligned(64)));
    for (int c = 0; c < d; c++) {
        __m512 o0 = _mm512_mul_ps(_mm512_load_ps(&ot[c][0]), _mm512_load_ps(&inv[0]));
        __m512 o1 = _mm512_mul_ps(_mm512_load_ps(&ot[c][16]), _mm512_load_ps(&inv[16]));
        _mm512_store_si512(&ob[c][0], (__m512i)_mm512_cvtne2ps_pbh(o1, o0));
    }
    for (int r = 0; r < rows; r++) {
        bf16 *dst = jb->out + (i0 + r) * jb->o_row + h * jb->o_head;
        for (int c = 0; c < d; c++) dst[c] = ob[c][r];
    }
}

static void run_tile(const job_t *jb, int t, int h) {
    switch (jb->d) {
    case 64: tile(jb, t, h, 64); break;
    case 128: tile(jb, t, h, 128); break;
    default: tile(jb, t, h, jb->d); break;
    }
}

static void worker(job_t *jb) {
    const int chunks = (jb->vpairs + PACK_PAIRS - 1) / PACK_PAIRS;
    for (int u; (u = __atomic_fetch_add(&jb->next_pack, 1, __ATOMIC_RELAXED)) < jb->pack_units;) {
        int g = u / chunks, p0 = (u % chunks) * PACK_PAIRS;
        pack_v(jb, g, p0, p0 + PACK_PAIRS < jb->vpairs ? p0 + PACK_PAIRS : jb->vpairs);
        __atomic_fetch_add(&jb->packed, 1, __ATOMIC_RELEASE);
    }
    while (__atomic_load_n(&jb->packed, __ATOMIC_ACQUIRE) < jb->pack_units) _mm_pause(); /* V fully packed */
    for (int u; (u = __atomic_fetch_add(&jb->next_unit, 1, __ATOMIC_RELAXED)) < jb->units;)
        run_tile(jb, jb->ntiles - 1 - u / jb->hq, u % jb->hq); /* the last tiles see the most keys */
}

/* Returns 0, or a negative code for arguments it does not take (checked again in Python). */
int pdbox_flash_extend(const bf16 *q, int64_t q_row, int64_t q_head, const bf16 *k_cache, const bf16 *v_cache,
                       int64_t page_stride, int page_size, const int64_t *pages, int prefix, int n_new, int hq,
                       int hkv, int d, float scale, bf16 *out, int64_t o_row, int64_t o_head, int threads) {
    if (d % 32 || d > MAX_D || d <= 0 || hkv <= 0 || hq % hkv || n_new <= 0 || prefix < 0) return -1;
    if (page_size <= 0 || (page_size & (page_size - 1))) return -2;
    job_t jb = {.q = q, .q_row = q_row, .q_head = q_head, .k = k_cache, .v = v_cache, .page_stride = page_stride,
                .pages = pages, .page_shift = __builtin_ctz(page_size), .prefix = prefix, .n_new = n_new, .hq = hq,
                .hkv = hkv, .d = d, .scale = scale, .out = out, .o_row = o_row, .o_head = o_head};
    const int total = prefix + n_new;
    /* whole blocks of KB keys, so a block's pairs never run past the buffer */
    jb.npairs = ((total + KB - 1) / KB) * (KB / 2);
    jb.vp = aligned_alloc(64, (size_t)hkv * jb.npairs * d * sizeof(uint32_t));
    if (!jb.vp) return -3;
    jb.vpairs = (total + 1) / 2;
    for (int g = 0; g < hkv; g++) /* pairs past the keys: zeros (their probabilities are 0; 0 * garbage may be NaN) */
        memset(jb.vp + ((int64_t)g * jb.npairs + jb.vpairs) * d, 0,
               (size_t)(jb.npairs - jb.vpairs) * d * sizeof(uint32_t));
    jb.pack_units = hkv * ((jb.vpairs + PACK_PAIRS - 1) / PACK_PAIRS);
    jb.ntiles = (n_new + QT - 1) / QT;
    jb.units = jb.ntiles * hq;
    if (threads > jb.units) threads = jb.units;
    /* OpenMP: in a torch process this is torch's own libgomp (same soname), so its pool, just used by a
     * GEMM, takes the work instead of spinning beside threads of ours */
#pragma omp parallel num_threads(threads)
    worker(&jb);
    free(jb.vp);
    return 0;
}

/* ---- decode: one new token per request over its whole paged context ---------------------------------
 *
 * A unit is one request. Its context is cold when a step reaches it (the step has streamed every layer's
 * weights and KV since), and reading one KV head's rows in place (128 of every hkv * 128 bytes) ran at
 * ~4 GB/s here. So each block of 64 keys is first copied whole, every KV head at once, into a per-thread
 * buffer (whole page runs: memcpy streams them), the next block prefetched a slice per 8 keys computed. Then per KV head:
 * its query heads (at most 16) are the rows of one score vector, so each key's (k[2p], k[2p+1])
 * broadcast serves them all, as in a tile above; p . v runs in fp32 on the staged V rows (widened
 * exactly from bf16), out[g][d] accumulated 64 dims at a time, an online softmax per head.
 */
#define DR 16 /* query heads per KV head, at most */

typedef struct {
    const bf16 *q;
    int64_t q_row, q_head;
    const bf16 *k, *v;
    int64_t page_stride;
    const int64_t *table; /* [batch][table_stride] page ids */
    int64_t table_stride;
    const int64_t *lens;
    int page_shift, batch, hq, hkv, d;
    float scale;
    bf16 *out;
    int64_t o_row, o_head;
    char *scratch; /* per thread: scratch_bytes each */
    size_t scratch_bytes;
    int next;
} djob_t;


/* rows [j0, j0 + n) of request b, all KV heads, from `cache` into dst (contiguous, slot-major) */
static void stage(const djob_t *jb, const bf16 *cache, int b, int j0, int n, bf16 *dst) {
    const int ps = 1 << jb->page_shift;
    const int64_t row = (int64_t)jb->hkv * jb->d;
    for (int j = j0; j < j0 + n;) {
        const int slot = j & (ps - 1), run = ps - slot < j0 + n - j ? ps - slot : j0 + n - j;
        const bf16 *src = cache + jb->table[b * jb->table_stride + (j >> jb->page_shift)] * jb->page_stride + slot * row;
        memcpy(dst + (j - j0) * row, src, sizeof(bf16) * run * row);
        j += run;
    }
}

/* prefetch part `part` of `parts` of rows [j0, j0 + n) of request b (K and V), so a block's compute
 * streams in the next block a little at a time (a burst of prefetches stalls on the miss buffers) */
static void prefetch_part(const djob_t *jb, int b, int j0, int n, int part, int parts) {
    const int64_t row = (int64_t)jb->hkv * jb->d;
    const int a = j0 + (int)((int64_t)n * part / parts), e = j0 + (int)((int64_t)n * (part + 1) / parts);
    for (int j = a; j < e; j++) {
        const int64_t off = jb->table[b * jb->table_stride + (j >> jb->page_shift)] * jb->page_stride
                          + (int64_t)(j & ((1 << jb->page_shift) - 1)) * row;
        for (int64_t i = 0; i < row; i += 32) {
            _mm_prefetch((const char *)(jb->k + off + i), _MM_HINT_T1);
            _mm_prefetch((const char *)(jb->v + off + i), _MM_HINT_T1);
        }
    }
}

static size_t decode_scratch(int hkv, int group, int d) {
    return sizeof(uint32_t) * hkv * (d / 2) * DR  /* qp */
         + sizeof(float) * hkv * group * d        /* o */
         + sizeof(float) * 2 * hkv * DR           /* m, l */
         + sizeof(float) * KB * DR                /* s */
         + sizeof(bf16) * 2 * KB * hkv * d;       /* staged K, V */
}

static inline __attribute__((always_inline)) void decode_request(const djob_t *jb, int b, char *scratch, const int d) {
    const int hkv = jb->hkv, group = jb->hq / hkv, len = (int)jb->lens[b];
    const int64_t row = (int64_t)hkv * d;
    uint32_t *qp = (uint32_t *)scratch;                  /* [hkv][d/2][DR] */
    float *o = (float *)(qp + (size_t)hkv * (d / 2) * DR); /* [hkv][group][d] */
    float *ms = o + (size_t)hkv * group * d;               /* [hkv][DR] */
    float *ls = ms + (size_t)hkv * DR;
    float *s = ls + (size_t)hkv * DR; /* [KB][DR] */
    bf16 *kst = (bf16 *)(s + KB * DR), *vst = kst + KB * row;
    for (int g = 0; g < hkv; g++) {
        for (int r = 0; r < DR; r++) {
            const uint32_t *src = r < group ? (const uint32_t *)(jb->q + b * jb->q_row + (g * group + r) * jb->q_head) : 0;
            for (int p = 0; p < d / 2; p++) qp[((size_t)g * (d / 2) + p) * DR + r] = src ? src[p] : 0;
        }
        _mm512_store_ps(ms + g * DR, _mm512_set1_ps(-1e30f));
        _mm512_store_ps(ls + g * DR, _mm512_setzero_ps());
    }
    memset(o, 0, sizeof(float) * hkv * group * d);
    const __m512 scale = _mm512_set1_ps(jb->scale);
    for (int j0 = 0; j0 < len; j0 += KB) {
        const int nk = len - j0 < KB ? len - j0 : KB;
        stage(jb, jb->k, b, j0, nk, kst);
        stage(jb, jb->v, b, j0, nk, vst);
        const int nn = len - j0 - KB < KB ? len - j0 - KB : KB; /* the next block: prefetched meanwhile */
        const int parts = hkv * ((nk + KC - 1) / KC);
        for (int g = 0; g < hkv; g++) {
            const uint32_t *qg = qp + (size_t)g * (d / 2) * DR;
            for (int c = 0; c < nk; c += KC) {
                if (nn > 0) prefetch_part(jb, b, j0 + KB, nn, g * ((nk + KC - 1) / KC) + c / KC, parts);
                const uint32_t *kr[KC];
                for (int x = 0; x < KC; x++)
                    kr[x] = (const uint32_t *)(c + x < nk ? kst + (c + x) * row + g * d : ZERO_ROW);
                __m512 acc[KC];
                for (int x = 0; x < KC; x++) acc[x] = _mm512_setzero_ps();
                for (int p = 0; p < d / 2; p++) {
                    __m512i qv = _mm512_load_si512(qg + p * DR);
                    for (int x = 0; x < KC; x++) acc[x] = dp(acc[x], qv, _mm512_set1_epi32((int)kr[x][p]));
                }
                for (int x = 0; x < KC; x++) _mm512_store_ps(&s[(c + x) * DR], _mm512_mul_ps(acc[x], scale));
            }
            const __m512 m = _mm512_load_ps(ms + g * DR);
            __m512 n = m;
            for (int x = 0; x < nk; x++) n = _mm512_max_ps(n, _mm512_load_ps(&s[x * DR]));
            const __m512 alpha = exp_ps(_mm512_sub_ps(m, n));
            __m512 sum = _mm512_setzero_ps();
            for (int x = 0; x < nk; x++) {
                __m512 p = exp_ps(_mm512_sub_ps(_mm512_load_ps(&s[x * DR]), n));
                sum = _mm512_add_ps(sum, p);
                _mm512_store_ps(&s[x * DR], p);
            }
            _mm512_store_ps(ms + g * DR, n);
            _mm512_store_ps(ls + g * DR, _mm512_fmadd_ps(_mm512_load_ps(ls + g * DR), alpha, sum));
            float al[DR] __attribute__((aligned(64)));
            _mm512_store_ps(al, alpha);
            float *og = o + (size_t)g * group * d;
            for (int c = 0; c < d; c += 64) /* 4 rows x 64 dims of out in registers; each V row widened once */
                for (int r0 = 0; r0 < group; r0 += 4) {
                    const int nr = group - r0 < 4 ? group - r0 : 4;
                    __m512 acc[4][4];
                    for (int r = 0; r < nr; r++)
                        for (int v = 0; v < 4; v++)
                            acc[r][v] = _mm512_mul_ps(_mm512_loadu_ps(og + (r0 + r) * d + c + 16 * v),
                                                      _mm512_set1_ps(al[r0 + r]));
                    for (int x = 0; x < nk; x++) {
                        const bf16 *vr = vst + x * row + g * d + c;
                        const __m512 v0 = widen(vr), v1 = widen(vr + 16), v2 = widen(vr + 32), v3 = widen(vr + 48);
                        for (int r = 0; r < nr; r++) {
                            const __m512 p = _mm512_set1_ps(s[x * DR + r0 + r]);
                            acc[r][0] = _mm512_fmadd_ps(p, v0, acc[r][0]);
                            acc[r][1] = _mm512_fmadd_ps(p, v1, acc[r][1]);
                            acc[r][2] = _mm512_fmadd_ps(p, v2, acc[r][2]);
                            acc[r][3] = _mm512_fmadd_ps(p, v3, acc[r][3]);
                        }
                    }
                    for (int r = 0; r < nr; r++)
                        for (int v = 0; v < 4; v++) _mm512_storeu_ps(og + (r0 + r) * d + c + 16 * v, acc[r][v]);
                }
        }
    }
    for (int g = 0; g < hkv; g++)
        for (int r = 0; r < group; r++) {
            const float inv = 1.0f / ls[g * DR + r];
            const float *src = o + ((size_t)g * group + r) * d;
            bf16 *dst = jb->out + b * jb->o_row + (g * group + r) * jb->o_head;
            for (int c = 0; c < d; c += 32) {
                __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(src + c), _mm512_set1_ps(inv));
                __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(src + c + 16), _mm512_set1_ps(inv));
                _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
}

static void decode_worker(djob_t *jb, int thread) {
    char *scratch = jb->scratch + thread * jb->scratch_bytes;
    for (int b; (b = __atomic_fetch_add(&jb->next, 1, __ATOMIC_RELAXED)) < jb->batch;) {
        switch (jb->d) {
        case 64: decode_request(jb, b, scratch, 64); break;
        case 128: decode_request(jb, b, scratch, 128); break;
        default: decode_request(jb, b, scratch, jb->d); break;
        }
    }
}

int pdbox_flash_decode(const bf16 *q, int64_t q_row, int64_t q_head, const bf16 *k_cache, const bf16 *v_cache,
                       int64_t page_stride, int page_size, const int64_t *table, int64_t table_stride,
                       const int64_t *lens, int batch, int hq, int hkv, int d, float scale, bf16 *out, int64_t o_row,
                       int64_t o_head, int threads) {
    if (d % 64 || d > MAX_D || d <= 0 || hkv <= 0 || hq % hkv || hq / hkv > DR || batch <= 0) return -1;
    if (page_size <= 0 || (page_size & (page_size - 1))) return -2;
    for (int b = 0; b < batch; b++)
        if (lens[b] < 1) return -4;
    djob_t jb = {.q = q, .q_row = q_row, .q_head = q_head, .k = k_cache, .v = v_cache, .page_stride = page_stride,
                 .table = table, .table_stride = table_stride, .lens = lens, .page_shift = __builtin_ctz(page_size),
                 .batch = batch, .hq = hq, .hkv = hkv, .d = d, .scale = scale, .out = out, .o_row = o_row,
                 .o_head = o_head};
    if (threads > batch) threads = batch;
    if (threads < 1) threads = 1;
    jb.scratch_bytes = (decode_scratch(hkv, hq / hkv, d) + 63) & ~(size_t)63;
    jb.scratch = aligned_alloc(64, jb.scratch_bytes * threads);
    if (!jb.scratch) return -3;
    if (threads == 1) {
        decode_worker(&jb, 0);
    } else {
#pragma omp parallel num_threads(threads)
        decode_worker(&jb, omp_get_thread_num());
    }
    free(jb.scratch);
    return 0;
}
