/* Helpers the C kernels share: bf16 <-> fp32 on AVX-512 and an exp. */
#ifndef PDBOX_BF16_AVX512_H
#define PDBOX_BF16_AVX512_H

#include <immintrin.h>
#include <stdint.h>

typedef uint16_t bf16;

/* 16 bf16 -> fp32, exact */
static inline __m512 widen(const bf16 *x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

/* 16 fp32 -> bf16, rounded to nearest even (as torch's .to(bfloat16), but for subnormals, which VCVTNEPS2BF16
 * flushes to zero, and NaN's bits; decode_layer_bf16.c's round_bf16 has torch's bits where it needs them) */
static inline void narrow(bf16 *dst, __m512 x) { _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(x)); }

/* exp(x), fp32 (Cephes' expf polynomial; ~1 ulp); below -87 gives ~0, above 88 gives inf */
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

#endif
