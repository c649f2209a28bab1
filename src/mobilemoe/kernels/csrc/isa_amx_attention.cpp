// Causal prefill attention on AMX-BF16 tiles: the flash kernel of isa_avx512bf16.cpp (same packed
// K/V, flash_attn.h; same bf16 roundings of q / sqrt(D), k, v and p) with its two products on tiles.
// Compiled with the AMX unit's flags; only called once mm_amx_enable() returned 1.
//
// Why: with the prefill GEMMs on AMX, the vdpbf16ps attention was 21-28% of prefill at 1K tokens
// (BENCHMARKS.md); a TDPBF16PS does 16 x 16 x 32 multiply-adds, 256 vdpbf16ps' worth.
//
// Per key block of 64 and chunk of 16 query rows:
//   S = Q K^T   4 C tiles (16 rows x 16 keys), D/32 A tiles of q, B = the packed keys as they are
//               (kp's [D/2][64 keys] pairs: 16 pair-rows x 16 keys at a 256-byte stride);
//   online softmax on S in vector registers (running max, sum, alpha per row), p rounded to bf16;
//   O_blk = P V 2 A tiles of p (32 keys each), B = the packed values (vp's [32 key pairs][D] rows:
//               16 pair-rows x 16 dims at a D * 4-byte stride), up to 4 C tiles at a time;
//   o = alpha o + O_blk in fp32 memory (a tile cannot be rescaled in place).
// Results differ from the vdpbf16ps kernel only in fp32 summation order.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "amx_tiles.h"
#include "flash_attn.h"
#include "vec_math.h"

namespace {

constexpr int BK = MM_ATTN_KEY_BLOCK;  // 64 keys per block: 4 score tiles
constexpr int TR = 16;                 // query rows per tile

// Lanes of key vector c (keys j0 + 16c ...) allowed for a row whose last allowed key is j0 + lim.
inline __mmask16 key_mask(int64_t lim, int c) {
  const int64_t n = lim - 16 * c + 1;
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

// S (tmm0-3) = the chunk's q rows (A, tmm4) x the block's keys (B, tmm6/7), stored to s[16][64].
template <int D>
inline void scores(const uint16_t* qc, const uint32_t* kb, float* s) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int dc = 0; dc < D / 32; ++dc) {
    const uint32_t* kd = kb + dc * 16 * BK;  // pair-rows 16 dc .. 16 dc + 15
    MM_TILE_LOADD(4, qc + dc * 32, D * 2);
    MM_TILE_LOADD(6, kd, BK * 4);
    _tile_dpbf16ps(0, 4, 6);
    MM_TILE_LOADD(7, kd + 16, BK * 4);
    _tile_dpbf16ps(1, 4, 7);
    MM_TILE_LOADD(6, kd + 32, BK * 4);
    _tile_dpbf16ps(2, 4, 6);
    MM_TILE_LOADD(7, kd + 48, BK * 4);
    _tile_dpbf16ps(3, 4, 7);
  }
  MM_TILE_STORED(0, s, BK * 4);
  MM_TILE_STORED(1, s + 16, BK * 4);
  MM_TILE_STORED(2, s + 32, BK * 4);
  MM_TILE_STORED(3, s + 48, BK * 4);
}

// Online softmax of one chunk's scores s[16][64] (lim[r]: row r's last allowed key in the block):
// updates m, l, returns alpha per row and p[16][64] as bf16 (zero where masked).
inline void softmax_rows(const float* s, const int64_t* lim, float* m, float* l, float* alpha, uint16_t* p) {
  for (int r = 0; r < TR; ++r) {
    __mmask16 mk[4];
    __m512 sv[4], vmax = _mm512_set1_ps(-__builtin_inff());
    for (int c = 0; c < 4; ++c) {
      mk[c] = key_mask(lim[r], c);
      sv[c] = _mm512_load_ps(s + r * BK + c * 16);
      vmax = _mm512_mask_max_ps(vmax, mk[c], vmax, sv[c]);
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    const float mnew = mx > m[r] ? mx : m[r];
    alpha[r] = __builtin_expf(m[r] - mnew);  // exp(-inf) = 0 on a row's first block
    const __m512 mv = _mm512_set1_ps(mnew);
    __m512 pv[4], sum = _mm512_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      pv[c] = _mm512_maskz_mov_ps(mk[c], mm512_exp_ps(_mm512_sub_ps(sv[c], mv)));
      sum = _mm512_add_ps(sum, pv[c]);
    }
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
    m[r] = mnew;
    _mm512_store_si512(p + r * BK, (__m512i)_mm512_cvtne2ps_pbh(pv[1], pv[0]));
    _mm512_store_si512(p + r * BK + 32, (__m512i)_mm512_cvtne2ps_pbh(pv[3], pv[2]));
  }
}

// Output tiles [n0, n0 + NT) (16 dims each) of P V for one chunk: A = p's two 32-key halves
// (tmm4/5), B = the block's value pair-rows 0-15 / 16-31 (tmm6/7), C = tmm0..NT-1 -> pv[16][D].
template <int D, int NT>
inline void values_part(const uint16_t* p, const uint32_t* vb, int n0, float* pv) {
  static_assert(NT >= 1 && NT <= 4, "at most 4 C tiles beside 2 A and 2 B");
  _tile_zero(0);
  if (NT > 1) _tile_zero(1);
  if (NT > 2) _tile_zero(2);
  if (NT > 3) _tile_zero(3);
  MM_TILE_LOADD(4, p, BK * 2);
  MM_TILE_LOADD(5, p + 32, BK * 2);
#define MM_PV_TILE(n, bt)                                                     \
  if (NT > n) {                                                               \
    MM_TILE_LOADD(bt, vb + (n0 + n) * 16, D * 4);                             \
    _tile_dpbf16ps(n, 4, bt);                                                 \
    MM_TILE_LOADD(bt, vb + 16 * D + (n0 + n) * 16, D * 4);                    \
    _tile_dpbf16ps(n, 5, bt);                                                 \
  }
  MM_PV_TILE(0, 6)
  MM_PV_TILE(1, 7)
  MM_PV_TILE(2, 6)
  MM_PV_TILE(3, 7)
#undef MM_PV_TILE
  MM_TILE_STORED(0, pv + n0 * 16, D * 4);
  if (NT > 1) MM_TILE_STORED(1, pv + (n0 + 1) * 16, D * 4);
  if (NT > 2) MM_TILE_STORED(2, pv + (n0 + 2) * 16, D * 4);
  if (NT > 3) MM_TILE_STORED(3, pv + (n0 + 3) * 16, D * 4);
}

template <int D>
void attn_rows(const float* q, int64_t q_stride, int64_t t0, int64_t t1, int64_t G, int64_t start,
               const uint16_t* kp, const uint16_t* vp, float* out, int64_t out_stride) {
  constexpr int NV = D / 16, D2 = D / 2;
  const int64_t R = (t1 - t0) * G, Rp = (R + TR - 1) / TR * TR;
  alignas(64) uint16_t qb[MM_ATTN_MAX_ROWS * D];  // bf16(q / sqrt(D)), one row per query row
  alignas(64) float o[MM_ATTN_MAX_ROWS * D];
  alignas(64) float s[TR * BK], pv[TR * D];
  alignas(64) uint16_t p[TR * BK];
  float m[MM_ATTN_MAX_ROWS], l[MM_ATTN_MAX_ROWS], alpha[TR];
  int64_t last[MM_ATTN_MAX_ROWS];  // absolute index of each row's last allowed key
  const __m512 scale = _mm512_set1_ps(1.0f / __builtin_sqrtf((float)D));
  for (int64_t r = 0; r < Rp; ++r) {
    const int64_t rr = r < R ? r : R - 1;  // padding rows repeat the last row (their output is dropped)
    const int64_t t = t0 + rr / G, h = rr % G;
    const float* qr = q + t * q_stride + h * D;
    for (int c = 0; c < NV; c += 2) {
      const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qr + c * 16), scale);
      const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(qr + c * 16 + 16), scale);
      _mm512_store_si512(qb + r * D + c * 16, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    last[r] = start + t;
    m[r] = -__builtin_inff();
    l[r] = 0.f;
    for (int c = 0; c < NV; ++c) _mm512_store_ps(o + r * D + c * 16, _mm512_setzero_ps());
  }
  const uint32_t* kp32 = (const uint32_t*)kp;
  const uint32_t* vp32 = (const uint32_t*)vp;
  const int64_t nblk = last[Rp - 1] / BK + 1;
  mm_amx_load_config();
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t j0 = blk * BK;
    const uint32_t* kb = kp32 + blk * D2 * BK;
    const uint32_t* vb = vp32 + blk * (BK / 2) * D;
    for (int64_t r0 = 0; r0 < Rp; r0 += TR) {
      if (j0 > last[r0 + TR - 1]) continue;  // rows ascend in position: the whole chunk is past this block
      int64_t lim[TR];
      for (int r = 0; r < TR; ++r) lim[r] = last[r0 + r] - j0;
      scores<D>(qb + r0 * D, kb, s);
      softmax_rows(s, lim, m + r0, l + r0, alpha, p);
      if (NV >= 4) values_part<D, 4>(p, vb, 0, pv);
      if (NV >= 8) values_part<D, 4>(p, vb, 4, pv);
      if (NV == 2) values_part<D, 2>(p, vb, 0, pv);
      for (int r = 0; r < TR; ++r) {
        const __m512 a = _mm512_set1_ps(alpha[r]);
        float* orow = o + (r0 + r) * D;
        for (int c = 0; c < NV; ++c)
          _mm512_store_ps(orow + c * 16, _mm512_fmadd_ps(_mm512_load_ps(orow + c * 16), a,
                                                         _mm512_load_ps(pv + r * D + c * 16)));
      }
    }
  }
  _tile_release();  // no tile state outlives the call
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = t0 + r / G, h = r % G;
    const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
    for (int c = 0; c < NV; ++c)
      _mm512_storeu_ps(out + t * out_stride + h * D + c * 16, _mm512_mul_ps(_mm512_load_ps(o + r * D + c * 16), inv));
  }
}

using RowsFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*,
                        float*, int64_t);

// Head dims whose q rows fill whole A tiles (32 bf16); 16 and 48 stay on the vdpbf16ps kernel.
RowsFn rows_for(int64_t D) {
  switch (D) {
    case 32: return attn_rows<32>;
    case 64: return attn_rows<64>;
    case 128: return attn_rows<128>;
    default: return nullptr;
  }
}

}  // namespace

extern "C" int mm_attn_supports_amx(int64_t D) { return rows_for(D) != nullptr; }

extern "C" void mm_attn_rows_amx(const float* q, int64_t q_stride, int64_t t0, int64_t t1, int64_t G, int64_t D,
                                 int64_t start, const uint16_t* kp, const uint16_t* vp, float* out,
                                 int64_t out_stride) {
  rows_for(D)(q, q_stride, t0, t1, G, start, kp, vp, out, out_stride);  // D checked by mm_attn_supports_amx
}
