/* One decode layer of a bf16 Llama-family model with quantized weights in one call, for CPUs with AVX-512
 * BF16: the residual add and RMSNorm, the QKV projection, rotary and the KV store, paged decode attention,
 * the output projection, the second norm, the gate/up projection, SiLU-and-mul and the down projection.
 * kernels/cpu/decode_layer.py checks the arguments and calls it.
 *
 * It calls pdbox's own kernels (pointwise.c, pointwise_f32.c, quant_gemv.c, flash_attention.c) through the
 * function pointers it is given, with the arguments the `cpu` backend's per-op calls pass, and between them
 * makes the conversions those calls make in torch: a linear layer widens its bf16 rows to fp32 for the
 * quantized GEMV and rounds the GEMV's fp32 rows to bf16 (round to nearest even, as torch's
 * .to(bfloat16)); the first layer's norm runs on the fp32 embeddings, as the backend's fp32 rmsnorm. So
 * the result has the same bits as the per-op path's. What it saves is the Python between them: sixteen
 * calls and conversions a layer, each ~10-25 us of Python around a few microseconds of work at batch 1. */
#include <stdint.h>
#include <stdlib.h>

#include "bf16_avx512.h"
#include "decode_layer.h"

typedef int (*add_rmsnorm_fn)(const bf16 *x, int64_t x_row, const float *residual, int64_t r_row,
                              float *residual_out, const float *weight, bf16 *out, int rows, int h, float eps,
                              int threads);
DECODE_LAYER_KERNELS(bf16)
typedef int (*silu_fn)(const bf16 *x, int64_t x_row, bf16 *out, int rows, int n, int threads);

/* The kernels, as addresses from their libraries (kernels/cpu/decode_layer.py fills it once). */
typedef struct {
    add_rmsnorm_fn add_rmsnorm;
    add_rmsnorm_f32_fn add_rmsnorm_f32;
    quant_linear_fn quant_linear;
    rotary_fn rotary;
    store_kv_fn store_kv;
    decode_fn decode;
    silu_fn silu_and_mul;
} kernels_t;

/* 16 fp32 -> bf16 with the bits of torch's .to(bfloat16), which the per-op path applies to the GEMV's rows:
 * rounded to nearest even, subnormals kept (narrow()'s VCVTNEPS2BF16 flushes them), every NaN 0xffff (checked
 * against torch 2.13 over all 2^32 patterns) */
static inline void round_bf16(bf16 *dst, __m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0xffff));
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(r));
}

/* dst rows (n, a multiple of 16) = bf16 of src rows */
static void to_bf16(const float *src, int64_t src_row, bf16 *dst, int64_t dst_row, int rows, int n) {
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < n; i += 16) round_bf16(dst + t * dst_row + i, _mm512_loadu_ps(src + t * src_row + i));
}

/* dst rows (n, a multiple of 16) = fp32 of src rows, exact */
static void to_f32(const bf16 *src, int64_t src_row, float *dst, int rows, int n) {
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < n; i += 16) _mm512_storeu_ps(dst + (int64_t)t * n + i, widen(src + t * src_row + i));
}

/* The backend's linear layer on bf16 rows: widened into fin, the GEMV into fout, rounded into dst. */
static int linear(const kernels_t *kn, const qweight_t *w, const bf16 *in, int64_t in_row, int rows, float *fin,
                  float *fout, bf16 *dst, int64_t dst_row, int threads) {
    to_f32(in, in_row, fin, rows, w->k);
    const int rc = kn->quant_linear(w->bits, fin, w->k, rows, w->k, w->codes, w->params, w->n, fout, w->n, threads, 0);
    if (!rc) to_bf16(fout, w->n, dst, dst_row, rows, w->n);
    return rc;
}

/* x (rows, hidden) bf16 is the previous layer's output, or NULL for the first layer (then residual_in is the
 * fp32 embedding); residual_out (rows, hidden) fp32 gets residual_in + x, then residual_out + the attention's
 * output; out (rows, hidden) bf16 gets the MLP's output. residual_out may be residual_in. Returns 0, or the
 * E_* step that failed times 100 minus that kernel's own code (E_ALLOC: scratch memory). */
int pdbox_decode_layer_bf16(const kernels_t *kn, const layer_t *L, const step_t *st, const bf16 *x,
                            const float *residual_in, float *residual_out, bf16 *out, int threads) {
    const int rows = st->rows, H = L->hidden, D = L->d, hq = L->hq, hkv = L->hkv, I = L->inter;
    const int64_t qkv_w = (int64_t)(hq + 2 * hkv) * D, rot_w = (int64_t)(hq + hkv) * D, o_w = (int64_t)hq * D;
    if (rows < 1 || H < 16 || H % 16 || D < 1 || D % 16 || hq < 1 || hkv < 1 || I < 16 || I % 16 || !weights_fit(L))
        return E_ARGS * 100;
    int64_t widest_in = H > o_w ? H : o_w, widest_out = qkv_w > 2 * (int64_t)I ? qkv_w : 2 * (int64_t)I;
    if (I > widest_in) widest_in = I;
    if (H > widest_out) widest_out = H;
    float *fin = malloc(sizeof(float) * rows * (widest_in + widest_out));
    bf16 *scratch = malloc(sizeof(bf16) * rows * (H + qkv_w + rot_w + o_w + H + 3 * (int64_t)I));
    if (!fin || !scratch) {
        free(fin), free(scratch);
        return E_ALLOC * 100;
    }
    float *fout = fin + rows * widest_in;
    bf16 *h = scratch, *qkv = h + rows * H, *rot = qkv + rows * qkv_w, *o = rot + rows * rot_w;
    bf16 *attn = o + rows * o_w, *gu = attn + rows * H, *act = gu + rows * 2 * (int64_t)I;
    int rc, step; /* RUN (decode_layer.h) */
    if (x) {
        RUN(E_NORM1, kn->add_rmsnorm(x, H, residual_in, H, residual_out, L->input_norm, h, rows, H, L->eps, threads));
    } else { /* the embeddings: the fp32 norm, then the rounding the QKV layer's input takes */
        RUN(E_NORM1, kn->add_rmsnorm_f32(NULL, H, residual_in, H, residual_out, L->input_norm, fout, rows, H, L->eps,
                                         threads));
        to_bf16(fout, H, h, H, rows, H);
    }
    RUN(E_QKV, linear(kn, &L->qkv, h, H, rows, fin, fout, qkv, qkv_w, threads));
    /* q and k heads rotated together into rot (rows, hq + hkv, D); v stays in qkv */
    RUN(E_ROTARY, kn->rotary(qkv, qkv_w, D, st->positions, L->cos_sin, L->cos_sin_row, rot, rows, hq + hkv, D,
                             threads));
    RUN(E_STORE, kn->store_kv(rot + o_w, rot_w, qkv + rot_w, qkv_w, st->slots, rows, (int64_t)hkv * D, L->k_cache,
                              L->v_cache, L->total_slots));
    RUN(E_ATTEND, kn->decode(rot, rot_w, D, L->k_cache, L->v_cache, L->page_stride, L->page_size, st->table,
                             st->table_row, st->lens, rows, hq, hkv, D, L->scale, o, o_w, D, threads));
    RUN(E_O, linear(kn, &L->o, o, o_w, rows, fin, fout, attn, H, threads));
    RUN(E_NORM2, kn->add_rmsnorm(attn, H, residual_out, H, residual_out, L->post_norm, h, rows, H, L->eps, threads));
    RUN(E_GATE_UP, linear(kn, &L->gate_up, h, H, rows, fin, fout, gu, 2 * (int64_t)I, threads));
    RUN(E_SILU, kn->silu_and_mul(gu, 2 * (int64_t)I, act, rows, I, threads));
    RUN(E_DOWN, linear(kn, &L->down, act, I, rows, fin, fout, out, H, threads));
done:
    free(fin), free(scratch);
    return rc ? step * 100 - rc : 0;
}
