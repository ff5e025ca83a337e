/* One decode layer of an fp32 Llama-family model in one call: the residual add and RMSNorm, the QKV
 * projection, rotary and the KV store, paged decode attention, the output projection, the second norm, the
 * gate/up projection and the SwiGLU down projection. kernels/cpu/decode_layer.py checks the arguments and
 * calls it.
 *
 * It computes nothing itself: it calls pdbox's own kernels (pointwise_f32.c, quant_gemv.c, decode_f32.c)
 * through the function pointers it is given, with the arguments the `cpu` backend's per-op calls pass, so
 * its result has the same bits as theirs. What it saves is the Python between them: a SmolLM2 layer is
 * nine such calls, each ~10-25 us of Python and ctypes around a few microseconds of work at batch 1. */
#include <stdint.h>
#include <stdlib.h>

#include "decode_layer.h"

DECODE_LAYER_KERNELS(float)

/* The kernels, as addresses from their libraries (kernels/cpu/decode_layer.py fills it once). */
typedef struct {
    add_rmsnorm_f32_fn add_rmsnorm;
    quant_linear_fn quant_linear;
    rotary_fn rotary;
    store_kv_fn store_kv;
    decode_fn decode;
} kernels_t;

/* x (rows, hidden) is the previous layer's output, or NULL for the first layer (then residual_in is the
 * embedding); residual_out (rows, hidden) gets residual_in + x, then residual_out + the attention's output;
 * out (rows, hidden) gets the MLP's output. residual_out may be residual_in. Returns 0, or the E_* step
 * that failed times 100 minus that kernel's own code (E_ALLOC: scratch memory). */
int pdbox_decode_layer_f32(const kernels_t *kn, const layer_t *L, const step_t *st, const float *x,
                           const float *residual_in, float *residual_out, float *out, int threads) {
    const int rows = st->rows, H = L->hidden, D = L->d, hq = L->hq, hkv = L->hkv;
    const int64_t qkv_w = (int64_t)(hq + 2 * hkv) * D, rot_w = (int64_t)(hq + hkv) * D, o_w = (int64_t)hq * D;
    if (rows < 1 || H < 1 || D < 1 || hq < 1 || hkv < 1 || L->inter < 1 || !weights_fit(L)) return E_ARGS * 100;
    float *scratch = malloc(sizeof(float) * rows * (H + qkv_w + rot_w + o_w + H + 2 * (int64_t)L->inter));
    if (!scratch) return E_ALLOC * 100;
    float *h = scratch, *qkv = h + rows * H, *rot = qkv + rows * qkv_w, *o = rot + rows * rot_w;
    float *attn = o + rows * o_w, *gu = attn + rows * H;
    int rc, step; /* RUN (decode_layer.h) */
    RUN(E_NORM1, kn->add_rmsnorm(x, H, residual_in, H, residual_out, L->input_norm, h, rows, H, L->eps, threads));
    RUN(E_QKV, kn->quant_linear(L->qkv.bits, h, H, rows, L->qkv.k, L->qkv.codes, L->qkv.params, L->qkv.n, qkv, qkv_w,
                                threads, 0));
    /* q and k heads rotated together into rot (rows, hq + hkv, D); v stays in qkv */
    RUN(E_ROTARY, kn->rotary(qkv, qkv_w, D, st->positions, L->cos_sin, L->cos_sin_row, rot, rows, hq + hkv, D,
                             threads));
    RUN(E_STORE, kn->store_kv(rot + o_w, rot_w, qkv + rot_w, qkv_w, st->slots, rows, (int64_t)hkv * D, L->k_cache,
                              L->v_cache, L->total_slots));
    RUN(E_ATTEND, kn->decode(rot, rot_w, D, L->k_cache, L->v_cache, L->page_stride, L->page_size, st->table,
                             st->table_row, st->lens, rows, hq, hkv, D, L->scale, o, o_w, D, threads));
    RUN(E_O, kn->quant_linear(L->o.bits, o, o_w, rows, L->o.k, L->o.codes, L->o.params, L->o.n, attn, H, threads, 0));
    RUN(E_NORM2, kn->add_rmsnorm(attn, H, residual_out, H, residual_out, L->post_norm, h, rows, H, L->eps, threads));
    RUN(E_GATE_UP, kn->quant_linear(L->gate_up.bits, h, H, rows, L->gate_up.k, L->gate_up.codes, L->gate_up.params,
                                    L->gate_up.n, gu, 2 * (int64_t)L->inter, threads, 0));
    RUN(E_DOWN, kn->quant_linear(L->down.bits, gu, 2 * (int64_t)L->inter, rows, L->down.k, L->down.codes,
                                 L->down.params, L->down.n, out, H, threads, 1));
done:
    free(scratch);
    return rc ? step * 100 - rc : 0;
}
