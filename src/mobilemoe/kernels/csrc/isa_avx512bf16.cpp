// Causal prefill attention with AVX-512 BF16 dot products (see flash_attn.h for the layouts).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16; only called after a runtime check.
//
// Why: ATen's fp32 (and bf16) scaled_dot_product_attention ran at ~65 GFLOP/s per core here, a
// third of MoE-S prefill at 1K tokens, while vdpbf16ps does 32 multiply-adds per instruction.
// Per key block of 64 and MR query rows: s = q k^T in 16 fp32 registers, the online-softmax update
// (running max m, sum l, rescale alpha), p rounded to bf16, then o = alpha o + p v with o in
// registers for the block.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "flash_attn.h"
#include "vec_math.h"

namespace {

constexpr int BK = MM_ATTN_KEY_BLOCK;  // keys per block: 4 vectors of 16 scores per row

// 16 fp32 -> 16 bf16 (round to nearest even) widened into the low halves of 16 32-bit lanes.
inline __m512i bf16_lanes(__m512 x) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)); }

inline __m512 load_half16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

// Lanes of key vector c (keys j0 + 16c ...) allowed for a row whose last allowed key is j0 + lim.
inline __mmask16 key_mask(int64_t lim, int c) {
  const int64_t n = lim - 16 * c + 1;  // allowed lanes in this vector
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

// One key block for MR query rows: scores, online softmax, and o = alpha o + p v.
// qb: MR rows of D/2 bf16 pairs; kb/vb: the block's packed keys/values; lim[r]: last allowed key of
// row r relative to the block start; m, l: running max and sum; o: MR rows of D fp32.
template <int NV, int MR>
inline void block_rows(const uint32_t* qb, const uint32_t* kb, const uint32_t* vb, const int64_t* lim, float* m,
                       float* l, float* o) {
  constexpr int D = NV * 16, D2 = D / 2;
  __m512 s[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
  for (int d2 = 0; d2 < D2; ++d2) {
    __m512i kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = _mm512_loadu_si512(kb + d2 * BK + c * 16);
    for (int r = 0; r < MR; ++r) {
      const __m512i qv = _mm512_set1_epi32((int)qb[r * D2 + d2]);
      for (int c = 0; c < 4; ++c) s[r][c] = dot_pairs(s[r][c], qv, kv[c]);
    }
  }
  alignas(64) uint32_t pb[MR][BK / 2];
  float alpha[MR];
  for (int r = 0; r < MR; ++r) {
    __mmask16 mk[4];
    __m512 vmax = _mm512_set1_ps(-__builtin_inff());
    for (int c = 0; c < 4; ++c) {
      mk[c] = key_mask(lim[r], c);
      vmax = _mm512_mask_max_ps(vmax, mk[c], vmax, s[r][c]);
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    const float mnew = mx > m[r] ? mx : m[r];
    alpha[r] = __builtin_expf(m[r] - mnew);  // exp(-inf) = 0 on a row's first block
    const __m512 mv = _mm512_set1_ps(mnew);
    __m512 p[4], sum = _mm512_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      p[c] = _mm512_maskz_mov_ps(mk[c], mm512_exp_ps(_mm512_sub_ps(s[r][c], mv)));
      sum = _mm512_add_ps(sum, p[c]);
    }
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
    m[r] = mnew;
    _mm512_store_si512(pb[r], (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
    _mm512_store_si512(pb[r] + 16, (__m512i)_mm512_cvtne2ps_pbh(p[3], p[2]));
  }
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(o + r * D + c * 16), _mm512_set1_ps(alpha[r]));
  for (int j2 = 0; j2 < BK / 2; ++j2) {
    __m512i vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_si512(vb + j2 * D + c * 16);
    for (int r = 0; r < MR; ++r) {
      const __m512i pv = _mm512_set1_epi32((int)pb[r][j2]);
      for (int c = 0; c < NV; ++c) acc[r][c] = dot_pairs(acc[r][c], pv, vv[c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) _mm512_store_ps(o + r * D + c * 16, acc[r][c]);
}

template <int NV>
void attn_rows(const float* q, int64_t q_stride, int64_t t0, int64_t t1, int64_t G, int64_t start,
               const uint16_t* kp, const uint16_t* vp, float* out, int64_t out_stride) {
  constexpr int D = NV * 16, D2 = D / 2;
  constexpr int MR = NV <= 4 ? 4 : 2;  // o accumulators MR x NV stay within the 32 registers
  const int64_t R = (t1 - t0) * G, Rp = (R + MR - 1) / MR * MR;
  alignas(64) uint32_t qb[MM_ATTN_MAX_ROWS * D2];
  alignas(64) float o[MM_ATTN_MAX_ROWS * D];
  float m[MM_ATTN_MAX_ROWS], l[MM_ATTN_MAX_ROWS];
  int64_t last[MM_ATTN_MAX_ROWS];  // absolute index of each row's last allowed key
  const __m512 scale = _mm512_set1_ps(1.0f / __builtin_sqrtf((float)D));
  for (int64_t r = 0; r < Rp; ++r) {
    const int64_t rr = r < R ? r : R - 1;  // padding rows repeat the last row (their output is dropped)
    const int64_t t = t0 + rr / G, h = rr % G;
    const float* qr = q + t * q_stride + h * D;
    for (int c = 0; c < NV; c += 2) {  // 32 floats -> 16 pairs (one 16-float tail when NV is odd)
      const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qr + c * 16), scale);
      const __m512 b = c + 1 < NV ? _mm512_mul_ps(_mm512_loadu_ps(qr + c * 16 + 16), scale) : _mm512_setzero_ps();
      const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(b, a);
      if (c + 1 < NV)
        _mm512_storeu_si512(qb + r * D2 + c * 8, pairs);
      else
        _mm256_storeu_si256((__m256i*)(qb + r * D2 + c * 8), _mm512_castsi512_si256(pairs));
    }
    last[r] = start + t;
    m[r] = -__builtin_inff();
    l[r] = 0.f;
    for (int c = 0; c < NV; ++c) _mm512_store_ps(o + r * D + c * 16, _mm512_setzero_ps());
  }
  const uint32_t* kp32 = (const uint32_t*)kp;
  const uint32_t* vp32 = (const uint32_t*)vp;
  const int64_t nblk = last[Rp - 1] / BK + 1;
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t j0 = blk * BK;
    const uint32_t* kb = kp32 + blk * D2 * BK;
    const uint32_t* vb = vp32 + blk * (BK / 2) * D;
    for (int64_t r0 = 0; r0 < Rp; r0 += MR) {
      if (j0 > last[r0 + MR - 1]) continue;  // rows ascend in position: all MR rows are past this block
      int64_t lim[MR];
      for (int r = 0; r < MR; ++r) lim[r] = last[r0 + r] - j0;
      block_rows<NV, MR>(qb + r0 * D2, kb, vb, lim, m + r0, l + r0, o + r0 * D);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = t0 + r / G, h = r % G;
    const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
    for (int c = 0; c < NV; ++c)
      _mm512_storeu_ps(out + t * out_stride + h * D + c * 16, _mm512_mul_ps(_mm512_load_ps(o + r * D + c * 16), inv));
  }
}

using RowsFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*,
                        float*, int64_t);

// The kernel instance for head_dim D, or nullptr (the one list of supported head dims).
RowsFn rows_for(int64_t D) {
  switch (D) {
    case 16: return attn_rows<1>;
    case 32: return attn_rows<2>;
    case 48: return attn_rows<3>;
    case 64: return attn_rows<4>;
    case 128: return attn_rows<8>;
    default: return nullptr;
  }
}

}  // namespace

extern "C" int mm_attn_supports_bf16(int64_t D) { return rows_for(D) != nullptr; }

extern "C" void mm_attn_pack_kv_bf16(const uint16_t* k, const uint16_t* v, int64_t S, int64_t D, uint16_t* kp,
                                     uint16_t* vp) {
  const int64_t Sp = mm_attn_padded_keys(S), D2 = D / 2;
  uint32_t* kp32 = (uint32_t*)kp;
  uint32_t* vp32 = (uint32_t*)vp;
  // keys: row j's 16-value chunk c gives pairs i = 8c .. 8c+7, stored at [block][i][j % BK]
  for (int64_t j = 0; j < Sp; ++j) {
    uint32_t* kb = kp32 + (j / BK) * D2 * BK + j % BK;
    for (int64_t c = 0; c < D / 16; ++c) {
      alignas(32) uint32_t pairs[8];
      const __m512 x = j < S ? load_half16(k + j * D + c * 16) : _mm512_setzero_ps();
      _mm256_store_si256((__m256i*)pairs, (__m256i)_mm512_cvtneps_pbh(x));
      for (int i = 0; i < 8; ++i) kb[(c * 8 + i) * BK] = pairs[i];
    }
  }
  // values: keys 2i and 2i+1 interleaved per d
  for (int64_t j = 0; j < Sp; j += 2) {
    for (int64_t c = 0; c < D / 16; ++c) {
      const __m512 a = j < S ? load_half16(v + j * D + c * 16) : _mm512_setzero_ps();
      const __m512 b = j + 1 < S ? load_half16(v + (j + 1) * D + c * 16) : _mm512_setzero_ps();
      const __m512i w = _mm512_or_si512(bf16_lanes(a), _mm512_slli_epi32(bf16_lanes(b), 16));
      _mm512_storeu_si512(vp32 + (j / 2) * D + c * 16, w);
    }
  }
}

extern "C" void mm_attn_rows_bf16(const float* q, int64_t q_stride, int64_t t0, int64_t t1, int64_t G, int64_t D,
                                  int64_t start, const uint16_t* kp, const uint16_t* vp, float* out,
                                  int64_t out_stride) {
  rows_for(D)(q, q_stride, t0, t1, G, start, kp, vp, out, out_stride);  // D checked by mm_attn_supports_bf16
}

