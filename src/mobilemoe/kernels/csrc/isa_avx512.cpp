// AVX-512 F/BW/VL + VNNI kernels on the mobilemoe-q4t16 layout (see mm_common.h).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni; only called after a runtime check.
// GCC 12 false positive: the intrinsics' _mm512_undefined_ps() self-initialisation.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "mm_common.h"
#include "vec_math.h"

namespace {

template <typename Op>
inline __m512 reduce16_from_pairs(const __m512* u, Op op) {
  __m512 w[4], z[2];
  for (int j = 0; j < 4; ++j)  // w[j]: lane l = block 4j + l
    w[j] = op(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
              _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int j = 0; j < 2; ++j)  // z[j]: lane l = [b, b, b+4, b+4] with b = 8j + l
    z[j] = op(_mm512_shuffle_ps(w[2 * j], w[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
              _mm512_shuffle_ps(w[2 * j], w[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // r: element 4l + p = block 4p + l
  const __m512 r = op(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i to_natural = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(to_natural, r);
}

// Horizontal reduction of 16 vectors at once: returns r with r[n] = reduce(v[n]) for n < 16.
// Built from pairwise lane shuffles (45 shuffles/ops for 16 blocks instead of ~8 per block).
template <typename Op>
inline __m512 reduce16(const __m512* v, Op op) {
  __m512 u[8];
  for (int i = 0; i < 8; ++i)  // u[i]: 128-bit lanes 0-1 = block 2i, 2-3 = block 2i+1
    u[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
              _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return reduce16_from_pairs(u, op);
}

struct MaxOp {
  __m512 operator()(__m512 a, __m512 b) const { return _mm512_max_ps(a, b); }
};
struct AddIOp {
  __m512 operator()(__m512 a, __m512 b) const {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
};

// 8 * (sum of each 32-byte block) for the 16 blocks at q: vpdpbusd with all-ones gives, per 64 bytes
// (2 blocks), 8 int32 partials per block in 256-bit halves = the pair layout reduce16_from_pairs expects.
inline void block_sums16(const int8_t* q, int32_t* s) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512 u[8];
  for (int j = 0; j < 8; ++j)
    u[j] = _mm512_castsi512_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(q + j * 2 * MM_QK)));
  const __m512i sums = _mm512_castps_si512(reduce16_from_pairs(u, AddIOp()));
  _mm512_storeu_si512(s, _mm512_slli_epi32(sums, 3));
}

// Per block b of 32 values: m[b] = max|v|_b and out = v * (numer / m[b]) (0 for an all-zero block),
// with load(o) giving the 16 values at offset o as fp32; 16 blocks at a time (one batched reduction).
template <typename Load>
inline void normalize_blocks(const Load& load, int64_t K, float numer, float* out, float* m) {
  const int64_t nkb = K / MM_QK;
  int64_t b = 0;
  alignas(64) float inv[16];
  for (; b + 16 <= nkb; b += 16) {
    __m512 v[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t o = (b + i) * MM_QK;
      v[i] = _mm512_max_ps(_mm512_abs_ps(load(o)), _mm512_abs_ps(load(o + 16)));
    }
    const __m512 mx = reduce16(v, MaxOp());
    const __mmask16 nz = _mm512_cmp_ps_mask(mx, _mm512_setzero_ps(), _CMP_GT_OQ);
    _mm512_storeu_ps(m + b, mx);
    _mm512_store_ps(inv, _mm512_maskz_div_ps(nz, _mm512_set1_ps(numer), mx));
    for (int i = 0; i < 16; ++i) {
      const int64_t o = (b + i) * MM_QK;
      const __m512 f = _mm512_set1_ps(inv[i]);
      _mm512_storeu_ps(out + o, _mm512_mul_ps(load(o), f));
      _mm512_storeu_ps(out + o + 16, _mm512_mul_ps(load(o + 16), f));
    }
  }
  for (; b < nkb; ++b) {  // tail blocks one at a time
    const int64_t o = b * MM_QK;
    const __m512 a0 = load(o), a1 = load(o + 16);
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
    const __m512 f = _mm512_set1_ps(mx > 0.f ? numer / mx : 0.f);
    _mm512_storeu_ps(out + o, _mm512_mul_ps(a0, f));
    _mm512_storeu_ps(out + o + 16, _mm512_mul_ps(a1, f));
    m[b] = mx;
  }
}

// Stores one block of 32 values, given as two 16-lane halves already within [-127, 127], as int8
// (round to nearest even); returns the int32 values summed pairwise (a lone block's sum is their total).
inline __m512i store_int8_block(__m512 p0, __m512 p1, int8_t* q) {
  const __m512i i0 = _mm512_cvtps_epi32(p0);
  const __m512i i1 = _mm512_cvtps_epi32(p1);
  _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(i0));
  _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(i1));
  return _mm512_add_epi32(i0, i1);
}

// Linear activations (Q8_0): d = max|x|_b / 127, q = round(x * 127 / max|x|_b), s = 8 * block sums.
void quant_row(const float* x, int64_t K, int8_t* q, float* d, int32_t* s) {
  const int64_t nkb = K / MM_QK;
  alignas(64) float u[16 * MM_QK];
  for (int64_t b = 0; b < nkb; b += 16) {
    const int64_t nb = nkb - b < 16 ? nkb - b : 16;
    const float* xb = x + b * MM_QK;
    normalize_blocks([xb](int64_t o) { return _mm512_loadu_ps(xb + o); }, nb * MM_QK, 127.f, u, d + b);
    for (int64_t i = 0; i < nb; ++i) {
      d[b + i] /= 127.f;
      const float* ub = u + i * MM_QK;
      const __m512i t = store_int8_block(_mm512_load_ps(ub), _mm512_load_ps(ub + 16), q + (b + i) * MM_QK);
      if (nb < 16) s[b + i] = 8 * _mm512_reduce_add_epi32(t);
    }
    if (nb == 16) block_sums16(q + b * MM_QK, s + b);
  }
}

// Expert activations: u = x * 127 / max|x|_b, xd = max|x|_b / 127.
void prep_row(const float* x, int64_t K, float* u, float* xd) {
  normalize_blocks([x](int64_t o) { return _mm512_loadu_ps(x + o); }, K, 127.f, u, xd);
  for (int64_t b = 0; b < K / MM_QK; ++b) xd[b] /= 127.f;
}

// q = round(u * sn) per element (bounded by 127 by construction; sn fp16), s = 8 * block sums.
void quant_scaled(const float* u, const uint16_t* sn, int64_t K, int8_t* q, int32_t* s) {
  const int64_t nkb = K / MM_QK;
  for (int64_t b = 0; b < nkb; b += 16) {
    const int64_t nb = nkb - b < 16 ? nkb - b : 16;
    for (int64_t i = b * MM_QK; i < (b + nb) * MM_QK; i += MM_QK) {
      const __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sn + i)));
      const __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sn + i + 16)));
      const __m512i t = store_int8_block(_mm512_mul_ps(_mm512_loadu_ps(u + i), s0),
                                         _mm512_mul_ps(_mm512_loadu_ps(u + i + 16), s1), q + i);
      if (nb < 16) s[i / MM_QK] = 8 * _mm512_reduce_add_epi32(t);
    }
    if (nb == 16) block_sums16(q + b * MM_QK, s + b);
  }
}

// One 16-row tile for MB tokens over all K blocks (MB <= 8 float accumulators stay in registers;
// the 8 expanded weight vectors of a block are reused by all MB tokens).
template <int MB, bool WS>
inline void tile_kernel(const uint8_t* wt, int64_t nkb, const int8_t* q, const float* d, const int32_t* s,
                        float* out, int64_t ldo, int n_store) {
  const int64_t K = nkb * MM_QK;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const uint16_t* ws = (const uint16_t*)(wt + nkb * MM_BLOCK_BYTES);
  const __mmask16 mask = (__mmask16)(n_store >= MM_TILE ? 0xFFFFu : ((1u << n_store) - 1u));
  __m512 acc[MB];
  for (int j = 0; j < MB; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nkb; ++b) {
    const uint8_t* wb = wt + b * MM_BLOCK_BYTES;
    const __m512i c0 = _mm512_loadu_si512(wb);
    const __m512i c1 = _mm512_loadu_si512(wb + 64);
    const __m512i c2 = _mm512_loadu_si512(wb + 128);
    const __m512i c3 = _mm512_loadu_si512(wb + 192);
    const __m512i w0 = _mm512_and_si512(c0, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(c0, 4), m4);
    const __m512i w2 = _mm512_and_si512(c1, m4), w3 = _mm512_and_si512(_mm512_srli_epi16(c1, 4), m4);
    const __m512i w4 = _mm512_and_si512(c2, m4), w5 = _mm512_and_si512(_mm512_srli_epi16(c2, 4), m4);
    const __m512i w6 = _mm512_and_si512(c3, m4), w7 = _mm512_and_si512(_mm512_srli_epi16(c3, 4), m4);
    __m512 sc = _mm512_set1_ps(1.f);
    if (WS) sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ws + b * MM_TILE)));
    if (MB == 1) {
      const char* pf = (const char*)(wb + MM_PREFETCH_BLOCKS * MM_BLOCK_BYTES);
      _mm_prefetch(pf, _MM_HINT_T0);
      _mm_prefetch(pf + 64, _MM_HINT_T0);
      _mm_prefetch(pf + 128, _MM_HINT_T0);
      _mm_prefetch(pf + 192, _MM_HINT_T0);
    }
    for (int j = 0; j < MB; ++j) {
      const int8_t* qa = q + j * K + b * MM_QK;
      __m512i ia = _mm512_set1_epi32(-s[j * nkb + b]);
      if (MB < 4) {  // two dependency chains when few tokens
        __m512i ib = _mm512_setzero_si512();
        ia = _mm512_dpbusd_epi32(ia, w0, _mm512_set1_epi32(mm_ld32(qa + 0)));
        ib = _mm512_dpbusd_epi32(ib, w1, _mm512_set1_epi32(mm_ld32(qa + 4)));
        ia = _mm512_dpbusd_epi32(ia, w2, _mm512_set1_epi32(mm_ld32(qa + 8)));
        ib = _mm512_dpbusd_epi32(ib, w3, _mm512_set1_epi32(mm_ld32(qa + 12)));
        ia = _mm512_dpbusd_epi32(ia, w4, _mm512_set1_epi32(mm_ld32(qa + 16)));
        ib = _mm512_dpbusd_epi32(ib, w5, _mm512_set1_epi32(mm_ld32(qa + 20)));
        ia = _mm512_dpbusd_epi32(ia, w6, _mm512_set1_epi32(mm_ld32(qa + 24)));
        ib = _mm512_dpbusd_epi32(ib, w7, _mm512_set1_epi32(mm_ld32(qa + 28)));
        ia = _mm512_add_epi32(ia, ib);
      } else {
        ia = _mm512_dpbusd_epi32(ia, w0, _mm512_set1_epi32(mm_ld32(qa + 0)));
        ia = _mm512_dpbusd_epi32(ia, w1, _mm512_set1_epi32(mm_ld32(qa + 4)));
        ia = _mm512_dpbusd_epi32(ia, w2, _mm512_set1_epi32(mm_ld32(qa + 8)));
        ia = _mm512_dpbusd_epi32(ia, w3, _mm512_set1_epi32(mm_ld32(qa + 12)));
        ia = _mm512_dpbusd_epi32(ia, w4, _mm512_set1_epi32(mm_ld32(qa + 16)));
        ia = _mm512_dpbusd_epi32(ia, w5, _mm512_set1_epi32(mm_ld32(qa + 20)));
        ia = _mm512_dpbusd_epi32(ia, w6, _mm512_set1_epi32(mm_ld32(qa + 24)));
        ia = _mm512_dpbusd_epi32(ia, w7, _mm512_set1_epi32(mm_ld32(qa + 28)));
      }
      const __m512 dv = _mm512_set1_ps(d[j * nkb + b]);
      const __m512 f = _mm512_cvtepi32_ps(ia);
      acc[j] = WS ? _mm512_fmadd_ps(f, _mm512_mul_ps(sc, dv), acc[j]) : _mm512_fmadd_ps(f, dv, acc[j]);
    }
  }
  if (n_store >= MM_TILE) {
    for (int j = 0; j < MB; ++j) _mm512_storeu_ps(out + j * ldo, acc[j]);
  } else {
    for (int j = 0; j < MB; ++j) _mm512_mask_storeu_ps(out + j * ldo, mask, acc[j]);
  }
}

// Tokens j0 .. j0+mb-1 against one tile, on the register-blocked kernel for mb rows.
template <bool WS>
void tile_group(int64_t mb, const uint8_t* wt, int64_t nkb, const int8_t* q, const float* d, const int32_t* s,
                float* out, int64_t ldo, int n_store) {
#define MM_TK(n) tile_kernel<n, WS>(wt, nkb, q, d, s, out, ldo, n_store)
  switch (mb) {
    case 1: MM_TK(1); break;
    case 2: MM_TK(2); break;
    case 3: MM_TK(3); break;
    case 4: MM_TK(4); break;
    case 5: MM_TK(5); break;
    case 6: MM_TK(6); break;
    case 7: MM_TK(7); break;
    default: MM_TK(8); break;
  }
#undef MM_TK
}

MM_DEFINE_GEMM(8)

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mm_mask16(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, mm512_exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v))));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_mul_ps(v, sig), _mm512_maskz_loadu_ps(m, u + i)));
  }
}

// ---- decode attention: one KV group (its G query heads) per call ----------------------------------
// G (query heads per KV head) and NV = D / 16 are template parameters so the q, score and output
// vectors live in registers.
template <int G, int NV>
void attend_group_t(const float* q, const uint16_t* K, const uint16_t* Vc, int64_t S, int64_t /*D*/,
                    int64_t /*G*/, float* scores, float* out) {
  constexpr int64_t D = NV * 16;
  const __m512 scale = _mm512_set1_ps(1.0f / __builtin_sqrtf((float)D));
  __m512 qv[G][NV];
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < NV; ++c) qv[r][c] = _mm512_loadu_ps(q + r * D + c * 16);
  // The cache comes from DRAM (each token streams ~150 MB of weights through L3): prefetch the key
  // rows 32 ahead and this key's value row for the second pass.
  constexpr int64_t kAhead = 32;
  for (int64_t j = 0; j < S; ++j) {
    for (int64_t b = 0; b < D * 2; b += 64) {
      if (j + kAhead < S) _mm_prefetch((const char*)(K + (j + kAhead) * D) + b, _MM_HINT_T0);
      _mm_prefetch((const char*)(Vc + j * D) + b, _MM_HINT_T0);
    }
    __m512 acc[G];
    for (int r = 0; r < G; ++r) acc[r] = _mm512_setzero_ps();
    for (int c = 0; c < NV; ++c) {
      const __m512 k = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(K + j * D + c * 16)));
      for (int r = 0; r < G; ++r) acc[r] = _mm512_fmadd_ps(qv[r][c], k, acc[r]);
    }
    for (int r = 0; r < G; ++r) scores[r * S + j] = _mm512_reduce_add_ps(_mm512_mul_ps(acc[r], scale));
  }
  // softmax numerators exp(s - max) with the vectorized exp (a scalar exp per score costs more than
  // the dot products); the 1/sum is applied to the output instead.
  float inv[G];
  for (int r = 0; r < G; ++r) {
    float* sr = scores + r * S;
    __m512 vmax = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < S; j += 16) {
      const __mmask16 m = mm_mask16(S - j);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, sr + j));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j += 16) {
      const __mmask16 m = mm_mask16(S - j);
      const __m512 e = mm512_exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sr + j), mx));
      _mm512_mask_storeu_ps(sr + j, m, e);
      vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
    }
    inv[r] = 1.0f / _mm512_reduce_add_ps(vsum);
  }
  __m512 o[G][NV];
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < NV; ++c) o[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < S; ++j) {
    for (int c = 0; c < NV; ++c) {
      const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(Vc + j * D + c * 16)));
      for (int r = 0; r < G; ++r) o[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[r * S + j]), v, o[r][c]);
    }
  }
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < NV; ++c)
      _mm512_storeu_ps(out + r * D + c * 16, _mm512_mul_ps(o[r][c], _mm512_set1_ps(inv[r])));
}

MM_DEFINE_ATTEND_FOR

// ---- router ------------------------------------------------------------------------------------
// Four rows at a time (four independent FMA chains sharing each load of h), prefetching the rows
// ahead (the router is evicted by the ~150 MB of weights each token streams) and a vectorized sigmoid.
void router_rows(const float* h, const float* W, int64_t H, int64_t e0, int64_t e1, int sigmoid, float* out) {
  for (int64_t e = e0; e < e1; e += 4) {
    const int n = e1 - e < 4 ? (int)(e1 - e) : 4;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t i = 0; i < H; i += 16) {
      const __mmask16 m = mm_mask16(H - i);
      const __m512 hv = _mm512_maskz_loadu_ps(m, h + i);
      for (int r = 0; r < n; ++r) {
        const float* row = W + (e + r) * H + i;
        _mm_prefetch((const char*)(row + 4 * H), _MM_HINT_T0);
        acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, row), hv, acc[r]);
      }
    }
    for (int r = 0; r < n; ++r) out[e + r] = _mm512_reduce_add_ps(acc[r]);
  }
  if (!sigmoid) return;
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t e = e0; e < e1; e += 16) {
    const __mmask16 m = mm_mask16(e1 - e);
    const __m512 v = _mm512_maskz_loadu_ps(m, out + e);
    _mm512_mask_storeu_ps(out + e, m, _mm512_div_ps(one, _mm512_add_ps(one, mm512_exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
  }
}
}  // namespace

extern const mm_kernels mm_kernels_avx512 = {"avx512", "avx512", quant_row, gemm, silu_mul, prep_row, quant_scaled,
                                             attend_for, router_rows, 0, 0, nullptr, nullptr};  // no prefill-only entries
