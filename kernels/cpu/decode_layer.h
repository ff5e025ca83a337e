/* What decode_layer_f32.c and decode_layer_bf16.c share: the kernels' signatures, the layer and step layouts
 * kernels/cpu/decode_layer.py fills (one ctypes structure for both), the weight-shape check their scratch
 * sizes rely on, and the codes of the step that failed. */
#ifndef PDBOX_DECODE_LAYER_H
#define PDBOX_DECODE_LAYER_H

#include <stdint.h>

/* The two kernels both layers call on fp32 rows: pointwise_f32.c's residual add and RMSNorm (the bf16 layer's
 * first norm, of the embeddings) and quant_gemv.c's GEMV. */
typedef int (*add_rmsnorm_f32_fn)(const float *x, int64_t x_row, const float *residual, int64_t r_row,
                                  float *residual_out, const float *weight, float *out, int rows, int h, float eps,
                                  int threads);
typedef int (*quant_linear_fn)(int bits, const float *x, int64_t x_stride, int rows, int k, const void *codes,
                               const float *params, int n, float *out, int64_t out_stride, int threads, int silu_mul);

/* The kernels both layers call on rows of their own element type T (float, or bf16): rotary, the KV store and
 * paged decode attention take the same arguments in either. */
#define DECODE_LAYER_KERNELS(T)                                                                                    \
    typedef int (*rotary_fn)(const T *x, int64_t x_row, int64_t x_head, const int64_t *pos, const float *cache,      \
                             int64_t cache_row, T *out, int rows, int heads, int d, int threads);                   \
    typedef int (*store_kv_fn)(const T *k, int64_t k_row, const T *v, int64_t v_row, const int64_t *slots,           \
                               int rows, int64_t width, T *k_cache, T *v_cache, int64_t total_slots);               \
    typedef int (*decode_fn)(const T *q, int64_t q_row, int64_t q_head, const T *k_cache, const T *v_cache,          \
                             int64_t page_stride, int page_size, const int64_t *table, int64_t table_row,           \
                             const int64_t *lens, int batch, int hq, int hkv, int d, float scale, T *out,           \
                             int64_t out_row, int64_t out_head, int threads);

/* A quantized weight (n, k) as pdbox_quant_linear takes it: bits 4 or 8, codes, params. */
typedef struct {
    const void *codes;
    const float *params;
    int bits, n, k;
} qweight_t;

/* What stays the same from step to step: a layer's sizes, weights, rotary table and KV cache (fp32 or bf16
 * rows, as the layer's dtype). */
typedef struct {
    int hidden, hq, hkv, d, inter, page_size;
    float eps, scale;
    const float *input_norm, *post_norm;
    qweight_t qkv, o, gate_up, down;
    const float *cos_sin;
    int64_t cos_sin_row;
    void *k_cache, *v_cache;
    int64_t page_stride, total_slots;
} layer_t;

/* A step's rows: positions, cache slots, the checked page table (int64) and lengths. */
typedef struct {
    int rows;
    const int64_t *positions, *slots, *table, *lens;
    int64_t table_row;
} step_t;

/* A layer's step S: CALL returns a kernel's code; on a failure the layer records the step in `step`, the code
 * in `rc`, and jumps to its `done:` (both layers declare all three). */
#define RUN(S, CALL)                  \
    do {                              \
        step = (S);                   \
        if ((rc = (CALL))) goto done; \
    } while (0)

/* kernels/cpu/decode_layer.py's STEPS, in order */
enum { E_ARGS = 1, E_ALLOC, E_NORM1, E_QKV, E_ROTARY, E_STORE, E_ATTEND, E_O, E_NORM2, E_GATE_UP, E_DOWN, E_SILU };

/* Whether the four weights have the shapes the layer's sizes give them: the scratch a layer cuts is sized
 * from those, and a weight of another shape would write past it. */
static inline int weights_fit(const layer_t *L) {
    const int qkv_w = (L->hq + 2 * L->hkv) * L->d, o_w = L->hq * L->d, H = L->hidden, I = L->inter;
    return L->qkv.n == qkv_w && L->qkv.k == H && L->o.n == H && L->o.k == o_w && L->gate_up.n == 2 * I &&
           L->gate_up.k == H && L->down.n == H && L->down.k == I;
}

#endif
