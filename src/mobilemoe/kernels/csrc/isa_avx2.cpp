// AVX2 + FMA + F16C kernels on the mobilemoe-q4t16 layout (see mm_common.h).
// No VNNI here: u8 x s8 products via vpmaddubsw. |pair| <= 2*15*127 = 3810, so all 8 k-groups of a
// block can be summed in int16 (<= 30480) before one vpmaddwd widens them to int32.
#include <immintrin.h>
#include <math.h>

#include "mm_common.h"
#include "vec_math.h"

namespace {

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum8i(__m256i v) {
  __m128i m = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_add_epi32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_add_epi32(m, _mm_shuffle_epi32(m, 0xB1));
  return _mm_cvtsi128_si32(m);
}

void quant_row(const float* x, int64_t K, int8_t* q, float* d, int32_t* s) {
  const int64_t nkb = K / MM_QK;
  const __m256 signbit = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < nkb; ++b) {
    __m256 a[4];
    for (int i = 0; i < 4; ++i) a[i] = _mm256_loadu_ps(x + b * MM_QK + 8 * i);
    __m256 mx = _mm256_max_ps(_mm256_andnot_ps(signbit, a[0]), _mm256_andnot_ps(signbit, a[1]));
    mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_andnot_ps(signbit, a[2]), _mm256_andnot_ps(signbit, a[3])));
    const float amax = hmax8(mx);
    const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(a[0], id));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(a[1], id));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(a[2], id));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(a[3], id));
    s[b] = 8 * hsum8i(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)(q + b * MM_QK), p);
    d[b] = amax / 127.f;
  }
}

template <int MB, bool WS>
inline void tile_kernel(const uint8_t* wt, int64_t nkb, const int8_t* q, const float* d,
                        const int32_t* s, float* out, int64_t ldo, int n_store) {
  const int64_t K = nkb * MM_QK;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint16_t* ws = (const uint16_t*)(wt + nkb * MM_BLOCK_BYTES);
  __m256 acc_lo[MB], acc_hi[MB];
  for (int j = 0; j < MB; ++j) acc_lo[j] = acc_hi[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nkb; ++b) {
    const uint8_t* wb = wt + b * MM_BLOCK_BYTES;
    __m256i s16_lo[MB], s16_hi[MB];
    for (int j = 0; j < MB; ++j) s16_lo[j] = s16_hi[j] = _mm256_setzero_si256();
    if (MB == 1) {
      const char* pf = (const char*)(wb + MM_PREFETCH_BLOCKS * MM_BLOCK_BYTES);
      for (int o = 0; o < MM_BLOCK_BYTES; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
    }
    for (int c = 0; c < 4; ++c) {
      const __m256i clo = _mm256_loadu_si256((const __m256i*)(wb + c * 64));       // rows 0-7
      const __m256i chi = _mm256_loadu_si256((const __m256i*)(wb + c * 64 + 32));  // rows 8-15
      const __m256i wl0 = _mm256_and_si256(clo, m4), wl1 = _mm256_and_si256(_mm256_srli_epi16(clo, 4), m4);
      const __m256i wh0 = _mm256_and_si256(chi, m4), wh1 = _mm256_and_si256(_mm256_srli_epi16(chi, 4), m4);
      for (int j = 0; j < MB; ++j) {
        const int8_t* qa = q + j * K + b * MM_QK + 8 * c;
        const __m256i a0 = _mm256_set1_epi32(mm_ld32(qa));
        const __m256i a1 = _mm256_set1_epi32(mm_ld32(qa + 4));
        s16_lo[j] = _mm256_add_epi16(s16_lo[j], _mm256_add_epi16(_mm256_maddubs_epi16(wl0, a0), _mm256_maddubs_epi16(wl1, a1)));
        s16_hi[j] = _mm256_add_epi16(s16_hi[j], _mm256_add_epi16(_mm256_maddubs_epi16(wh0, a0), _mm256_maddubs_epi16(wh1, a1)));
      }
    }
    __m256 sc_lo = _mm256_set1_ps(1.f), sc_hi = sc_lo;
    if (WS) {
      sc_lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ws + b * MM_TILE)));
      sc_hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ws + b * MM_TILE + 8)));
    }
    for (int j = 0; j < MB; ++j) {
      const __m256i bias = _mm256_set1_epi32(-s[j * nkb + b]);
      const __m256 dv = _mm256_set1_ps(d[j * nkb + b]);
      const __m256 flo = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(s16_lo[j], ones), bias));
      const __m256 fhi = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(s16_hi[j], ones), bias));
      if (WS) {
        acc_lo[j] = _mm256_fmadd_ps(flo, _mm256_mul_ps(sc_lo, dv), acc_lo[j]);
        acc_hi[j] = _mm256_fmadd_ps(fhi, _mm256_mul_ps(sc_hi, dv), acc_hi[j]);
      } else {
        acc_lo[j] = _mm256_fmadd_ps(flo, dv, acc_lo[j]);
        acc_hi[j] = _mm256_fmadd_ps(fhi, dv, acc_hi[j]);
      }
    }
  }
  for (int j = 0; j < MB; ++j) {
    if (n_store >= MM_TILE) {
      _mm256_storeu_ps(out + j * ldo, acc_lo[j]);
      _mm256_storeu_ps(out + j * ldo + 8, acc_hi[j]);
    } else {
      float tmp[MM_TILE];
      _mm256_storeu_ps(tmp, acc_lo[j]);
      _mm256_storeu_ps(tmp + 8, acc_hi[j]);
      for (int r = 0; r < n_store; ++r) out[j * ldo + r] = tmp[r];
    }
  }
}

MM_DEFINE_GEMM_4

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(g + i);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, mm256_exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), v))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(v, sig), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

}  // namespace

extern const mm_kernels mm_kernels_avx2 = {"avx2", "portable", quant_row, gemm, silu_mul,
                                           mm_prep_row_generic, mm_quant_scaled_generic,
                                           mm_attend_for_portable, mm_router_rows_portable,
                                           0, 0, nullptr, nullptr};  // no prefill-only entries
