// Vectorized exp for the AVX-512 and AVX2 code paths (softmax, SiLU). Cephes' expf scheme:
// n = round(x / ln2), r = x - n ln2 (two-constant split), degree-6 polynomial, times 2^n; within
// ~2 ulp of std::exp on [-87, 88] (inputs are clamped there: softmax and SiLU only need exp to
// underflow to ~0 and not overflow). Every function is `static inline` with its own target
// attribute, so including this header shares no symbol between differently-compiled units and
// nothing here runs unless the caller checked the CPU first.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <stdint.h>

// Lanes [0, min(n, 16)) of a 16-lane mask: the tail of a loop over n floats.
static inline __mmask16 mm_mask16(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

#define MM_EXP_POLY(FMA, MUL, ADD, SET, r)                                         \
  ({                                                                               \
    auto p_ = SET(1.9875691500E-4f);                                               \
    p_ = FMA(p_, r, SET(1.3981999507E-3f));                                        \
    p_ = FMA(p_, r, SET(8.3334519073E-3f));                                        \
    p_ = FMA(p_, r, SET(4.1665795894E-2f));                                        \
    p_ = FMA(p_, r, SET(1.6666665459E-1f));                                        \
    p_ = FMA(p_, r, SET(5.0000001201E-1f));                                        \
    FMA(p_, MUL(r, r), ADD(r, SET(1.f)));                                          \
  })

static inline __attribute__((target("avx512f,fma"))) __m512 mm512_exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 p = MM_EXP_POLY(_mm512_fmadd_ps, _mm512_mul_ps, _mm512_add_ps, _mm512_set1_ps, r);
  return _mm512_scalef_ps(p, n);
}

static inline __attribute__((target("avx2,fma"))) __m256 mm256_exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 p = MM_EXP_POLY(_mm256_fmadd_ps, _mm256_mul_ps, _mm256_add_ps, _mm256_set1_ps, r);
  // 2^n from the exponent bits (n in [-126, 128] after the clamp)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif
