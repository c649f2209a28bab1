// AMX-BF16 prefill gemm on the mobilemoe-q4t16 layout (see mm_common.h, amx.h).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512bf16 -mamx-tile -mamx-bf16
// -mfma -mf16c; only called after a runtime check (mm_amx_enable).
//
// Why BF16 and not INT8 tiles: the format scales every 32-k block (the activation scale d per token
// and block, the weight scale per output row and block for linear weights), so an INT8 tile product
// can only cover one block (half a TDPBSSD's depth) and each block's int32 tile must be stored and
// folded into fp32 with its scales by vector code -- which costs as much as the product itself.
// With BF16 operands the scales are folded into the operands instead, and the whole K accumulates
// in fp32 tiles (TDPBF16PS) with nothing per block outside the tile unit:
//   A[j][k] = bf16(q[j][k] * d[j][k/32])            converted once per call and token row,
//   B[k][n] = bf16((code[n][k] - 8) * w_scale[n][k/32])   (linear weights; experts: code - 8),
//            dequantized once per (output tile, K chunk) of a call and reused by every token tile.
// The codes (|q| <= 127, code - 8 in [-8, 7]) are exact in bf16, and so is an int8-path expert B
// (code - 8, its scale being in the activations); the products with the scales are rounded to
// bf16 (8 significant bits: relative error <= 2^-8 each), so the result is not bit-identical to
// the AVX-512 VNNI gemm (whose integer block sums are exact): per output,
//   |out - exact| <= (2^-7 + 2^-15) * sum_k |q d code ws| + fp32 accumulation error
// (amx_bound in tests/kernels/amx_driver.cpp derives the bound the test checks).
//
// Routed experts have a second entry, expert_gemm_bf16 (mm_common.h): their scales run along k (one
// row per output group), so they are folded into B instead, B[k][n] = bf16((code - 8) * sn[k] *
// smax[k/32]), and A is one bf16 copy of the token rows made once per layer for every expert and
// group: per call only B is converted (the int8 path quantizes the rows again for every group).
//
// Tiles (all 16 rows x 64 bytes): tmm0-3 = C (fp32, 2 token tiles x 2 output tiles), tmm4/5 = A
// (the two token tiles' 16 x 32 bf16 of one block), tmm6/7 = B (the two output tiles' 16 k-pairs
// x 16 columns x 2 bf16 of one block, the VNNI-pair layout TDPBF16PS needs). Each block step loads
// 2 A + 2 B tiles for 4 products: each loaded tile feeds two products.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <cpuid.h>
#include <immintrin.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "amx.h"
#include "amx_tiles.h"

#define MM_ARCH_GET_XCOMP_PERM 0x1022
#define MM_ARCH_REQ_XCOMP_PERM 0x1023
#define MM_XFEATURE_XTILEDATA 18

// Below MM_AMX_MIN_M tokens the VNNI gemm is used, and a token tail of fewer than MM_AMX_TAIL_MIN
// rows goes to it too: an AMX pass costs whole 16-row tiles (a tail is zero-padded to 16 rows) and
// the per-call conversions, VNNI only its rows; a lone 16-row tile also leaves the tile unit half
// idle (2 C tiles in flight instead of 4). A padded tail still runs in the 2 x 2 blocking, so it
// pays off from a few rows on. The routed experts' bf16 path (no per-group quantization of the
// rows) pays off from fewer rows: MM_AMX_EXPERT_MIN_M (mm_kernels.prefill_min_m).
// (tests/kernels/amx_driver.cpp `sweep` measures the three crossovers.)
#define MM_AMX_MIN_M 20
#define MM_AMX_TAIL_MIN 4
#define MM_AMX_EXPERT_MIN_M 12
// K blocks per chunk: the dequantized B of an output tile pair (2 x KC x 1 KB) stays in L1 while
// every token tile pair of the group streams its A past it. Small: B is read back by tile loads
// right after the vector stores wrote it, and a B chunk (and B_K's tables) that outgrows L1 costs
// more than the C tiles' extra store / reload per chunk (the driver's bench measures both).
#define MM_AMX_KC 4
// Tokens per group (A of a group: MG x K bf16, in L2; the fp32 C of an output tile pair: MG x 32).
#define MM_AMX_MG 128
// Output tiles per linear gemm call (mm_kernels.gemm_tile_block): each call converts its activations
// once, so a wide call spreads that over more columns (the operators' default is 4 tiles).
#define MM_AMX_TILE_BLOCK 16

namespace {

int g_amx_state = 0;  // 0 = not asked yet, 1 = granted, -1 = refused / unsupported

// The converted activations of one token group, per thread, grown on demand (heap: a group's A is
// MG x K x 2 bytes, too large for a stack). Plain malloc/free and no C++ library templates: the
// unit is compiled with AMX/AVX-512 flags, and an inline template instantiated here could be the
// copy the linker keeps for units running on CPUs without them.
struct ABuf {
  uint16_t* p = nullptr;
  size_t cap = 0;
  ~ABuf() { free(p); }
  uint16_t* get(size_t n) {
    if (n > cap) {
      free(p);
      p = (uint16_t*)aligned_alloc(64, (n * 2 + 63) / 64 * 64);
      cap = p ? n : 0;
    }
    return p;
  }
};
thread_local ABuf tls_a;

// A of token rows [0, rows) (rows <= MG) into [token tile][block][16 rows][32 bf16]; the padding
// rows of the last tile are zero. bf16(q * d): q * d is rounded once to fp32, then to bf16 (RNE).
void convert_a(const int8_t* q, const float* d, int64_t nkb, int64_t rows, uint16_t* a) {
  const int64_t K = nkb * MM_QK, nti = (rows + 15) / 16;
  for (int64_t j = 0; j < nti * 16; ++j) {
    uint16_t* aj = a + ((j / 16) * nkb * 16 + j % 16) * MM_QK;
    if (j >= rows) {
      for (int64_t b = 0; b < nkb; ++b) _mm512_store_si512(aj + b * 16 * MM_QK, _mm512_setzero_si512());
      continue;
    }
    const int8_t* qj = q + j * K;
    const float* dj = d + j * nkb;
    for (int64_t b = 0; b < nkb; ++b) {
      const __m512 dv = _mm512_set1_ps(dj[b]);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qj + b * MM_QK))));
      const __m512 hi =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qj + b * MM_QK + 16))));
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, dv), _mm512_mul_ps(lo, dv));
      _mm512_store_si512(aj + b * 16 * MM_QK, (__m512i)v);
    }
  }
}

// How B's scales are applied: none (experts on int8 activations: the scale is in the activations),
// per output row and block (linear weights, w_scale), or per k (experts on bf16 activations: the
// group's scale row sn[k] * smax[k/32], the same for every column of the group's two tiles).
enum BScale { B_PLAIN, B_ROW, B_K };

// B_K's lookup tables for blocks [0, kc) of a K chunk (srow = the group's scale row, kc0 = the
// chunk's first block): per k-pair row p of block b, 32 bf16 = bf16((code - 8) * s[k]) for code
// 0..15 at k = 2p (entries 0-15) and k = 2p + 1 (entries 16-31), s = sn * smax (exact in fp32:
// 11 x 11 bits; the product with code - 8 rounds once to fp32, then to bf16). Every column of a
// row shares its scales, so one table serves the whole row, and both tiles of the pair.
void k_luts(const uint16_t* srow, int64_t nkb, int64_t kc0, int64_t kc, uint16_t* lut) {
  const int64_t K = nkb * MM_QK;
  const __m512 cm8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t b = 0; b < kc; ++b) {
    const float sm = mm_half_to_float(srow[K + kc0 + b]);
    alignas(64) float sk[MM_QK];
    const uint16_t* sn = srow + (kc0 + b) * MM_QK;
    _mm512_store_ps(sk, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sn)), _mm512_set1_ps(sm)));
    _mm512_store_ps(sk + 16,
                    _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sn + 16))), _mm512_set1_ps(sm)));
    for (int p = 0; p < 16; ++p)
      _mm512_store_si512(lut + (b * 16 + p) * MM_QK,
                         (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(cm8, _mm512_set1_ps(sk[2 * p + 1])),
                                                      _mm512_mul_ps(cm8, _mm512_set1_ps(sk[2 * p]))));
  }
}

// B of blocks [0, kc) of one packed tile (codes at wt; ws = its fp16 row scales for B_ROW, luts =
// k_luts' tables for B_K) into kc tiles of 16 rows (k-pairs p: k = 2p, 2p + 1 of the block) x 16
// columns x 2 bf16. Packed chunk c holds k-pairs 4c..4c+3: low nibbles kk 0-1 / 2-3 are pairs 4c /
// 4c+1, high nibbles pairs 4c+2 / 4c+3; in-lane byte shuffles pick a pair's two codes of each column
// (one column = one dword) into a 16-bit pair, and a word permute looks each code up: as bf16(code
// - 8), exact (B_PLAIN, B_ROW), or in the row's table (B_K: the odd k of a pair indexes entries
// 16-31, its code byte carrying 0x10). B_ROW is then widened to fp32 (exact), multiplied by its row
// scale (exact: 4 x 11 bits) and rounded back to bf16.
template <int BS>
inline void dequant_tile(const uint8_t* wt, const uint16_t* ws, const uint16_t* luts, int64_t kc, uint16_t* bt) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i pick01 = _mm512_set4_epi32((int)0x800D800C, (int)0x80098008, (int)0x80058004, (int)0x80018000);
  const __m512i pick23 = _mm512_set4_epi32((int)0x800F800E, (int)0x800B800A, (int)0x80078006, (int)0x80038002);
  // bf16 bit patterns of code - 8 for code = 0..15 (-8 .. 7), indexed by the 16-bit code.
  const __m512i lut = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  //
                                       0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,
                                       (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080,
                                       (short)0xC0A0, (short)0xC0C0, (short)0xC0E0, (short)0xC100);
  const __m512i dup_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i dup_hi = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  // B_K: 0x10 into the code bytes of odd k (kk = 1, 3 of each column's dword).
  const __m512i odd = _mm512_set1_epi32(BS == B_K ? 0x10001000 : 0);
  for (int64_t b = 0; b < kc; ++b) {
    __m512 s_lo, s_hi;  // B_ROW: the row scales of columns 0-7 / 8-15, each twice (a k-pair shares it)
    if (BS == B_ROW) {
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ws + b * MM_TILE)));
      s_lo = _mm512_permutexvar_ps(dup_lo, s);
      s_hi = _mm512_permutexvar_ps(dup_hi, s);
    }
    uint16_t* bb = bt + b * 16 * MM_QK;
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(wt + b * MM_BLOCK_BYTES + c * 64);
      // (v & m4) | odd, one ternary-logic op (imm 0xEA = (A & B) | C)
      const __m512i lo = _mm512_ternarylogic_epi32(v, m4, odd, 0xEA);
      const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), m4, odd, 0xEA);
      const __m512i rows[4] = {_mm512_shuffle_epi8(lo, pick01), _mm512_shuffle_epi8(lo, pick23),
                               _mm512_shuffle_epi8(hi, pick01), _mm512_shuffle_epi8(hi, pick23)};
      for (int p = 0; p < 4; ++p) {
        __m512i w;
        if (BS == B_K) {
          w = _mm512_permutexvar_epi16(rows[p], _mm512_load_si512(luts + (b * 16 + 4 * c + p) * MM_QK));
        } else {
          w = _mm512_permutexvar_epi16(rows[p], lut);
          if (BS == B_ROW) {  // bf16 -> fp32 is exact (the bits in the upper half)
            const __m512 f0 =
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
            const __m512 f1 =
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
            w = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(f1, s_hi), _mm512_mul_ps(f0, s_lo));
          }
        }
        _mm512_store_si512(bb + (4 * c + p) * MM_QK, w);
      }
    }
  }
}

// The tile register numbers are pasted into the instruction text, hence literal numbers.
#define MM_DP(C, A, B) _tile_dpbf16ps(C, A, B)

// Where the A tiles of a token group lie: token tile i's block b starts at ptr(i) + b * ak (bf16
// elements), its 16 rows stride(i) bytes apart. The int8 path converts into [tile][block][16][32]
// (ak = 512, stride 64, the tail zero-padded); the bf16 expert path reads the rows where they are
// (ak = 32, stride = the row pitch) and only a token tail goes through a zero-padded copy.
struct AView {
  const uint16_t* base;
  int64_t tile_step, stride, ak, nfull;  // tiles i < nfull at base + i * tile_step
  const uint16_t* tail;                  // tile nfull (if any): 16 rows, tail_stride bytes apart
  int64_t tail_stride;
  const uint16_t* ptr(int64_t i) const { return i < nfull ? base + i * tile_step : tail; }
  int64_t rs(int64_t i) const { return i < nfull ? stride : tail_stride; }
};

// NI token tiles (1-2) x NJ output tiles (1-2) over the kc blocks of one K chunk. a0/a1: the token
// tiles' first block (rows sa0/sa1 bytes apart, ak elements per block), b: output tile 0's first
// block (tile 1 at +b_step), c: the fp32 C scratch of token tile 0 ([j][16][16], token tile 1 at +512
// floats); first: the chunk starts at k = 0 (C starts at zero, else it continues the scratch).
template <int NI, int NJ>
inline void micro(const uint16_t* a0, int64_t sa0, const uint16_t* a1, int64_t sa1, int64_t ak, const uint16_t* b,
                  int64_t b_step, int64_t kc, float* c, bool first) {
  if (first) {
    _tile_zero(0);
    if (NJ > 1) _tile_zero(1);
    if (NI > 1) _tile_zero(2);
    if (NI > 1 && NJ > 1) _tile_zero(3);
  } else {
    MM_TILE_LOADD(0, c, 64);
    if (NJ > 1) MM_TILE_LOADD(1, c + 256, 64);
    if (NI > 1) MM_TILE_LOADD(2, c + 512, 64);
    if (NI > 1 && NJ > 1) MM_TILE_LOADD(3, c + 768, 64);
  }
  for (int64_t k = 0; k < kc; ++k) {
    MM_TILE_LOADD(4, a0 + k * ak, sa0);
    MM_TILE_LOADD(6, b + k * 512, 64);
    MM_DP(0, 4, 6);
    if (NJ > 1) {
      MM_TILE_LOADD(7, b + b_step + k * 512, 64);
      MM_DP(1, 4, 7);
    }
    if (NI > 1) {
      MM_TILE_LOADD(5, a1 + k * ak, sa1);
      MM_DP(2, 5, 6);
      if (NJ > 1) MM_DP(3, 5, 7);
    }
  }
  MM_TILE_STORED(0, c, 64);
  if (NJ > 1) MM_TILE_STORED(1, c + 256, 64);
  if (NI > 1) MM_TILE_STORED(2, c + 512, 64);
  if (NI > 1 && NJ > 1) MM_TILE_STORED(3, c + 768, 64);
}

// One token group (rows <= MG tokens) against output tiles [t0, t1), in tile pairs: per pair and K
// chunk the pair's B is dequantized once and every token tile pair runs past it; C lives in an
// fp32 scratch between K chunks and is copied (n_valid-masked) to out at the end. srow: B_K's
// scale row (sn | smax), else unused.
template <int BS>
void group_pass(const uint8_t* W, int64_t tile_stride, int64_t nkb, int64_t t0, int64_t t1, const AView& A,
                int64_t rows, const uint16_t* srow, float* out, int64_t ldo, int64_t n_valid) {
  alignas(64) uint16_t bt[2 * MM_AMX_KC * 16 * MM_QK];  // [tile of the pair][block][16][32]
  alignas(64) float cs[(MM_AMX_MG / 16) * 2 * 256];     // [token tile][tile of the pair][16][16]
  alignas(64) uint16_t luts[BS == B_K ? MM_AMX_KC * 16 * MM_QK : 1];  // B_K: k_luts' tables
  const int64_t nti = (rows + 15) / 16, bstep = MM_AMX_KC * 16 * MM_QK;
  for (int64_t t = t0; t < t1; t += 2) {
    if (n_valid - t * MM_TILE <= 0) break;
    const int nj = (t + 1 < t1 && n_valid - (t + 1) * MM_TILE > 0) ? 2 : 1;
    for (int64_t kc0 = 0; kc0 < nkb; kc0 += MM_AMX_KC) {
      const int64_t kc = nkb - kc0 < MM_AMX_KC ? nkb - kc0 : MM_AMX_KC;
      if (BS == B_K) k_luts(srow, nkb, kc0, kc, luts);
      for (int j = 0; j < nj; ++j) {
        const uint8_t* wt = W + (t + j) * tile_stride;
        dequant_tile<BS>(wt + kc0 * MM_BLOCK_BYTES, (const uint16_t*)(wt + nkb * MM_BLOCK_BYTES) + kc0 * MM_TILE, luts,
                         kc, bt + j * bstep);
      }
      for (int64_t i = 0; i < nti; i += 2) {
        const uint16_t* p0 = A.ptr(i) + kc0 * A.ak;
        const uint16_t* p1 = i + 1 < nti ? A.ptr(i + 1) + kc0 * A.ak : p0;
        const int64_t s0 = A.rs(i), s1 = A.rs(i + 1);
        float* ci = cs + i * 512;
        const bool first = kc0 == 0;
        if (i + 1 < nti) {
          if (nj > 1) micro<2, 2>(p0, s0, p1, s1, A.ak, bt, bstep, kc, ci, first);
          else micro<2, 1>(p0, s0, p1, s1, A.ak, bt, bstep, kc, ci, first);
        } else {
          if (nj > 1) micro<1, 2>(p0, s0, p1, s1, A.ak, bt, bstep, kc, ci, first);
          else micro<1, 1>(p0, s0, p1, s1, A.ak, bt, bstep, kc, ci, first);
        }
      }
    }
    for (int j = 0; j < nj; ++j) {
      const int64_t rem = n_valid - (t + j) * MM_TILE;
      const __mmask16 mask = (__mmask16)(rem >= MM_TILE ? 0xFFFFu : ((1u << rem) - 1u));
      for (int64_t r = 0; r < rows; ++r)
        _mm512_mask_storeu_ps(out + r * ldo + (t + j) * MM_TILE, mask,
                              _mm512_load_ps(cs + (r / 16) * 512 + j * 256 + (r % 16) * 16));
    }
  }
}

void gemm(const uint8_t* W, int64_t tile_stride, int64_t nkb, int wscaled, int64_t t0, int64_t t1,
          const int8_t* q, const float* d, const int32_t* s, int64_t m, float* out, int64_t ldo,
          int64_t n_valid) {
  if (m < MM_AMX_MIN_M || __atomic_load_n(&g_amx_state, __ATOMIC_ACQUIRE) != 1) {
    mm_kernels_avx512.gemm(W, tile_stride, nkb, wscaled, t0, t1, q, d, s, m, out, ldo, n_valid);
    return;
  }
  // A short token tail costs a whole (zero-padded) tile pass on AMX, but only its own rows on VNNI:
  // the tail goes to VNNI below MM_AMX_TAIL_MIN rows.
  const int64_t tail = m % 16, m_amx = tail >= MM_AMX_TAIL_MIN ? m : m - tail;
  const int64_t K = nkb * MM_QK;
  uint16_t* a = tls_a.get((size_t)MM_AMX_MG * K);
  if (!a) {  // out of memory for the converted activations: the VNNI gemm needs none
    mm_kernels_avx512.gemm(W, tile_stride, nkb, wscaled, t0, t1, q, d, s, m, out, ldo, n_valid);
    return;
  }
  // This thread's tile configuration is (re)loaded on every call: job-pool helpers never ran
  // ldtilecfg, and other code (oneDNN) may have loaded its own in between.
  mm_amx_load_config();
  for (int64_t g0 = 0; g0 < m_amx; g0 += MM_AMX_MG) {
    const int64_t mg = m_amx - g0 < MM_AMX_MG ? m_amx - g0 : MM_AMX_MG;
    convert_a(q + g0 * K, d + g0 * nkb, nkb, mg, a);
    const AView A{a, nkb * 16 * MM_QK, 64, 16 * MM_QK, (mg + 15) / 16, nullptr, 0};
    if (wscaled)
      group_pass<B_ROW>(W, tile_stride, nkb, t0, t1, A, mg, nullptr, out + g0 * ldo, ldo, n_valid);
    else
      group_pass<B_PLAIN>(W, tile_stride, nkb, t0, t1, A, mg, nullptr, out + g0 * ldo, ldo, n_valid);
  }
  _tile_release();  // back to the init state: no 8 KB of tile data to save at context switches
  if (m_amx < m)
    mm_kernels_avx512.gemm(W, tile_stride, nkb, wscaled, t0, t1, q + m_amx * K, d + m_amx * nkb, s + m_amx * nkb,
                           m - m_amx, out + m_amx * ldo, ldo, n_valid);
}

void rows_to_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
  for (; i < n; i += 16) {
    const __mmask16 mk = (__mmask16)(n - i >= 16 ? 0xFFFFu : ((1u << (n - i)) - 1u));
    _mm256_mask_storeu_epi16(out + i, mk, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, x + i)));
  }
}

// Scalar stand-in where tiles are refused (the amx table is not selected then, but stays callable):
// the same bf16 operands, summed in double.
void expert_bf16_scalar(const uint8_t* W, int64_t tile_stride, int64_t nkb, const uint16_t* srow, int64_t t0,
                        int64_t t1, const uint16_t* a, int64_t lda, int64_t m, float* out, int64_t ldo,
                        int64_t n_valid) {
  const int64_t K = nkb * MM_QK;
  auto bf = [](uint16_t h) { const uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; };
  for (int64_t t = t0; t < t1; ++t)
    for (int r = 0; r < MM_TILE && t * MM_TILE + r < n_valid; ++r)
      for (int64_t j = 0; j < m; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t b = k / 32, kk = k % 32, c = kk / 8;
          const uint8_t byte = W[t * tile_stride + b * MM_BLOCK_BYTES + c * 64 + r * 4 + kk % 4];
          const int code = ((kk % 8) / 4 ? byte >> 4 : byte & 15) - 8;
          const float w = (float)code * (mm_half_to_float(srow[k]) * mm_half_to_float(srow[K + b]));
          uint16_t wb;
          _mm_storeu_si16(&wb, (__m128i)_mm_cvtneps_pbh(_mm_set1_ps(w)));
          acc += (double)bf(a[j * lda + k]) * bf(wb);
        }
        out[j * ldo + t * MM_TILE + r] = (float)acc;
      }
}

// Routed experts on bf16 rows (mm_kernels.expert_gemm_bf16): B = bf16(code * sn[k] * smax[k/32]),
// A = the rows as they are, so nothing but B is converted per call.
void expert_gemm_bf16(const uint8_t* W, int64_t tile_stride, int64_t nkb, const uint16_t* srow, int64_t t0,
                      int64_t t1, const uint16_t* a, int64_t lda, int64_t m, float* out, int64_t ldo,
                      int64_t n_valid) {
  const int64_t K = nkb * MM_QK;
  uint16_t* tailbuf = m % 16 ? tls_a.get((size_t)16 * K) : nullptr;
  if (__atomic_load_n(&g_amx_state, __ATOMIC_ACQUIRE) != 1 || (m % 16 && !tailbuf)) {
    expert_bf16_scalar(W, tile_stride, nkb, srow, t0, t1, a, lda, m, out, ldo, n_valid);
    return;
  }
  mm_amx_load_config();  // per call, as in gemm
  for (int64_t g0 = 0; g0 < m; g0 += MM_AMX_MG) {
    const int64_t mg = m - g0 < MM_AMX_MG ? m - g0 : MM_AMX_MG, full = mg / 16;
    const uint16_t* ag = a + g0 * lda;
    if (mg % 16) {  // the token tail, zero-padded to a whole tile
      for (int64_t r = 0; r < 16; ++r) {
        if (r < mg % 16)
          memcpy(tailbuf + r * K, ag + (full * 16 + r) * lda, K * 2);
        else
          memset(tailbuf + r * K, 0, K * 2);
      }
    }
    const AView A{ag, 16 * lda, 2 * lda, MM_QK, full, tailbuf, 2 * K};
    group_pass<B_K>(W, tile_stride, nkb, t0, t1, A, mg, srow, out + g0 * ldo, ldo, n_valid);
  }
  _tile_release();
}

}  // namespace

extern "C" int mm_amx_cpu_has(void) {
  unsigned a, b, c, dx;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &dx)) return 0;
  if (!(dx & (1u << 24)) || !(dx & (1u << 22))) return 0;  // AMX-TILE, AMX-BF16
  // AVX512-BF16 (the vector conversions to bf16): CPUID.(7,1):EAX bit 5.
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &dx) || !(a & (1u << 5))) return 0;
  if (!__get_cpuid(1, &a, &b, &c, &dx) || !(c & (1u << 27))) return 0;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & (3u << 17)) == (3u << 17);  // XTILECFG and XTILEDATA enabled by the OS
}

extern "C" int mm_amx_enable(void) {
  int st = __atomic_load_n(&g_amx_state, __ATOMIC_ACQUIRE);
  if (st != 0) return st == 1;
  // Racing first calls may both ask: the request is idempotent, and both store the same answer.
  int ok = 0;
  if (mm_amx_cpu_has() && syscall(SYS_arch_prctl, MM_ARCH_REQ_XCOMP_PERM, MM_XFEATURE_XTILEDATA) == 0) {
    unsigned long perm = 0;
    ok = syscall(SYS_arch_prctl, MM_ARCH_GET_XCOMP_PERM, &perm) == 0 && (perm & (1ul << MM_XFEATURE_XTILEDATA));
  }
  __atomic_store_n(&g_amx_state, ok ? 1 : -1, __ATOMIC_RELEASE);
  return ok;
}

// The other entries forward to the AVX-512 ones. Wrappers, not copies of the avx512 table's
// pointers: a table initialised from another unit's object would be dynamically initialised, and
// could still be all-null if another unit's static initialiser selected it first.
namespace {
void quant_row(const float* x, int64_t K, int8_t* q, float* d, int32_t* s) { mm_kernels_avx512.quant_row(x, K, q, d, s); }
void silu_mul(const float* g, const float* u, float* out, int64_t n) { mm_kernels_avx512.silu_mul(g, u, out, n); }
void prep_row(const float* x, int64_t K, float* u, float* xd) { mm_kernels_avx512.prep_row(x, K, u, xd); }
void quant_scaled(const float* u, const uint16_t* sn, int64_t K, int8_t* q, int32_t* s) {
  mm_kernels_avx512.quant_scaled(u, sn, K, q, s);
}
mm_attend_fn attend_for(int64_t G, int64_t D) { return mm_kernels_avx512.attend_for(G, D); }
void router_rows(const float* h, const float* W, int64_t H, int64_t e0, int64_t e1, int sigmoid, float* out) {
  mm_kernels_avx512.router_rows(h, W, H, e0, e1, sigmoid, out);
}
}  // namespace

extern const mm_kernels mm_kernels_amx = {"amx",        "avx512",         quant_row,        gemm,
                                          silu_mul,     prep_row,         quant_scaled,     attend_for,
                                          router_rows,  MM_AMX_EXPERT_MIN_M, MM_AMX_TILE_BLOCK, rows_to_bf16,
                                          expert_gemm_bf16};
