/* Causal attention of one request's new tokens over its paged KV cache, bf16, for CPUs with
 * AVX-512 BF16 (the `cpu` backend's prefill path; kernels/cpu/native.py builds and loads it).
 *
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
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QT 32 /* query rows per tile: two vectors of 16 */
#define KB 64 /* keys per softmax block */
#define KC 8  /* keys per q.k register block */
#define MAX_D 256
#define PACK_PAIRS 256 /* key pairs per V packing unit */

typedef uint16_t bf16;

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

/* exp(x) for x <= 0, fp32 (Cephes' expf polynomial; ~1 ulp); x below -87 gives ~0. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
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
