// AMX-INT8 prefill gemm on the mobilemoe-q4t16 layout (see mm_common.h, amx.h).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mamx-tile -mamx-int8 -mfma -mf16c;
// only called after a runtime check (mm_amx_enable).
//
// Tile mapping: C[token][n] (16 x 16 int32) += A[token][k] (int8 activations, 16 rows x 32 bytes:
// one Q8_0 block, loaded straight from q with stride K) . B[k/4][n*4+k%4] (int8 weights). After
// nibble unpacking, each 64-byte half of a packed (tile, block) chunk is one 16-column x 4-k VNNI
// row, i.e. exactly a B-tile row, so a (tile, block) is an 8-row B tile once its codes are
// un-biased (-8) to signed int8 -- TDPBSSD then needs no 8*sum(q) correction.
// Every 32-k block has its own scales (d per token, w_scale per output row), so each block's
// int32 tile is stored and folded into fp32 accumulators held in 16 zmm registers (one per
// token row): acc[r] = fma(float(C[r]), w_scale * d[r], acc[r]) -- the same formula and order as
// the AVX-512 VNNI gemm, so both give bit-identical results. Weight nibbles are unpacked once per
// (tile, block) and reused by every token tile; the per-token scales of a K chunk are transposed
// once into [token tile][block][16] and reused by every output tile.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "amx.h"

#define MM_ARCH_GET_XCOMP_PERM 0x1022
#define MM_ARCH_REQ_XCOMP_PERM 0x1023
#define MM_XFEATURE_XTILEDATA 18

// Below 16 tokens the VNNI gemm is used, and a token tail of fewer than 12 rows goes to it too: an
// AMX pass costs a whole 16-row tile (plus a configuration load for a tail), VNNI only its rows
// (tests/kernels/amx_driver.cpp `sweep` measures the crossover).
#define MM_AMX_MIN_M 16
#define MM_AMX_TAIL_MIN 12
// K blocks per chunk: the unpacked weights of one output tile (KC * 512 B = 16 KB) and the
// activations of a token tile (KC * 512 B) stay in L1 while every token/output tile pair reuses them.
#define MM_AMX_KC 32
// Tokens per group: the transposed per-token scales of a group (MG * KC * 4 B = 16 KB).
#define MM_AMX_MG 128

// Tile loads and the configuration load with their memory reads declared. GCC 12's intrinsics
// declare none for tileloadd and only 8 bytes for ldtilecfg, so at -O2 it dropped stores the
// tiles then read (unpacked weights, most of the config) and tilezero raised SIGILL.
#define MM_TILE_LOADD(t, base, stride)                                                  \
  __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm" #t "|tileloadd\t%%tmm" #t ", [%0+%1*1]}" \
                   ::"r"((const void*)(base)), "r"((long)(stride))                    \
                   : "memory")

namespace {

int g_amx_state = 0;  // 0 = not asked yet, 1 = granted, -1 = refused / unsupported

// 64-byte LDTILECFG operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0-3: C (a ring over blocks), tmm4/5: A, tmm6/7: B (alternating blocks); `rows` tokens
// (16, or a tail's count: a tail gets its own configuration, loaded once per call).
void load_config(int rows) {
  TileConfig c;
  memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int i = 0; i < 4; ++i) c.rows[i] = (uint8_t)rows, c.colsb[i] = 64;  // C: tokens x 16 int32
  for (int i = 4; i < 6; ++i) c.rows[i] = (uint8_t)rows, c.colsb[i] = 32;  // A: tokens x 32 int8 (a block)
  for (int i = 6; i < 8; ++i) c.rows[i] = 8, c.colsb[i] = 64;              // B: 8 k-groups x (16 cols x 4)
  __asm__ volatile("ldtilecfg\t%X0" ::"m"(c) : "memory");
}

// Unpacks blocks [0, kc) of one packed tile (codes at wt) into kc B tiles of 8 x 64 signed int8.
inline void unpack_tile(const uint8_t* wt, int64_t kc, int8_t* wb) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int64_t b = 0; b < kc; ++b)
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(wt + b * MM_BLOCK_BYTES + c * 64);
      const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(v, m4), eight);
      const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), eight);
      _mm512_store_si512(wb + b * 512 + (2 * c) * 64, lo);
      _mm512_store_si512(wb + b * 512 + (2 * c + 1) * 64, hi);
    }
}

// C tile I (block b, I = b % 4) = A . B with A/B tiles b % 2. (The tile intrinsics paste their
// register numbers into the instruction text, hence literal numbers and one macro per tile.)
#define MM_AMX_PRODUCT(C, A, B)       \
  do {                                \
    _tile_zero(C);                    \
    MM_TILE_LOADD(A, qa, K);          \
    MM_TILE_LOADD(B, wb, 64);         \
    _tile_dpbssd(C, A, B);            \
  } while (0)

template <int I>
inline void product(const int8_t* qa, int64_t K, const int8_t* wb) {
  if (I == 0) MM_AMX_PRODUCT(0, 4, 6);
  if (I == 1) MM_AMX_PRODUCT(1, 5, 7);
  if (I == 2) MM_AMX_PRODUCT(2, 4, 6);
  if (I == 3) MM_AMX_PRODUCT(3, 5, 7);
}

template <int I>
inline void store_c(int32_t* cb) {
  if (I == 0) _tile_stored(0, cb, 64);
  if (I == 1) _tile_stored(1, cb, 64);
  if (I == 2) _tile_stored(2, cb, 64);
  if (I == 3) _tile_stored(3, cb, 64);
}

// acc[r] += float(cb[r]) * (w_scale * ds[r]) for the 16 rows of one stored C tile: the AVX-512
// gemm's formula, fma(f, sc * d, acc), so both round alike.
template <bool WS>
inline void fold_block(const int32_t* cb, const float* ds, const uint16_t* ws, __m512* acc) {
  __m512 sc = _mm512_set1_ps(1.f);
  if (WS) sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)ws));
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    const __m512 f = _mm512_cvtepi32_ps(_mm512_load_si512(cb + r * 16));
    const __m512 dv = _mm512_set1_ps(ds[r]);
    acc[r] = WS ? _mm512_fmadd_ps(f, _mm512_mul_ps(sc, dv), acc[r]) : _mm512_fmadd_ps(f, dv, acc[r]);
  }
}

// Iteration b (I = b % 4) of the block pipeline: start block b+2's product, fold block b (stored
// one iteration ago), then store block b+1. The fold's loads thus come before, in program order,
// the one tile store still waiting for its product, and never stall behind it (with store right
// after product, AMX and the vector fold ran strictly one after the other).
template <bool WS, int I>
inline void step(int64_t b, int64_t kc, const int8_t* qa, int64_t K, const int8_t* wb, const uint16_t* ws,
                 const float* ds, int32_t* cbuf, __m512* acc) {
  if (b >= kc) return;
  if (b + 2 < kc) product<(I + 2) & 3>(qa + (b + 2) * MM_QK, K, wb + (b + 2) * 512);
  fold_block<WS>(cbuf + I * 256, ds + b * 16, ws + b * MM_TILE, acc);
  if (b + 1 < kc) store_c<(I + 1) & 3>(cbuf + ((I + 1) & 3) * 256);
}

// One output tile x one token tile (rows <= 16, as configured) over the kc blocks of a K chunk.
// out points at (token 0 of the tile, column 0 of the output tile); first: the chunk starts at
// k = 0 (else the partial sums already in out are continued).
template <bool WS>
inline void tile_pass(const int8_t* qa, int64_t K, const int8_t* wb, const uint16_t* ws, const float* ds,
                      int64_t kc, int rows, bool first, float* out, int64_t ldo, __mmask16 mask) {
  alignas(64) int32_t cbuf[4 * 256];
  __m512 acc[16];
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r)
    acc[r] = (first || r >= rows) ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, out + r * ldo);
  product<0>(qa, K, wb);
  if (kc > 1) product<1>(qa + MM_QK, K, wb + 512);
  store_c<0>(cbuf);
  for (int64_t b = 0; b < kc; b += 4) {
    step<WS, 0>(b, kc, qa, K, wb, ws, ds, cbuf, acc);
    step<WS, 1>(b + 1, kc, qa, K, wb, ws, ds, cbuf, acc);
    step<WS, 2>(b + 2, kc, qa, K, wb, ws, ds, cbuf, acc);
    step<WS, 3>(b + 3, kc, qa, K, wb, ws, ds, cbuf, acc);
  }
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r)
    if (r < rows) _mm512_mask_storeu_ps(out + r * ldo, mask, acc[r]);
}

// Token rows [j0, j1) (whole tiles of 16, or one tail tile) of one token group against output
// tiles [t0, t1), K chunk kc0 (kc blocks); ds = the group's scales [token tile][block][16].
template <bool WS>
void group_pass(const uint8_t* W, int64_t tile_stride, int64_t nkb, int64_t kc0, int64_t kc, int64_t t0,
                int64_t t1, const int8_t* q, const float* ds, int64_t j0, int64_t j1, float* out, int64_t ldo,
                int64_t n_valid, int8_t* wb) {
  const int64_t K = nkb * MM_QK;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t rem = n_valid - t * MM_TILE;
    if (rem <= 0) continue;
    const __mmask16 mask = (__mmask16)(rem >= MM_TILE ? 0xFFFFu : ((1u << rem) - 1u));
    const uint8_t* wt = W + t * tile_stride;
    const uint16_t* ws = (const uint16_t*)(wt + nkb * MM_BLOCK_BYTES) + kc0 * MM_TILE;
    unpack_tile(wt + kc0 * MM_BLOCK_BYTES, kc, wb);
    for (int64_t j = j0; j < j1; j += 16) {
      const int rows = j1 - j < 16 ? (int)(j1 - j) : 16;
      tile_pass<WS>(q + j * K + kc0 * MM_QK, K, wb, ws, ds + (j / 16) * kc * 16, kc, rows, kc0 == 0,
                    out + j * ldo + t * MM_TILE, ldo, mask);
    }
  }
}

// The AMX body; the full-tile configuration is loaded.
template <bool WS>
void gemm_tiles(const uint8_t* W, int64_t tile_stride, int64_t nkb, int64_t t0, int64_t t1, const int8_t* q,
                const float* d, int64_t m, float* out, int64_t ldo, int64_t n_valid) {
  alignas(64) int8_t wb[MM_AMX_KC * 512];
  alignas(64) float ds[MM_AMX_MG * MM_AMX_KC];  // [token tile][block][16 tokens]
  for (int64_t kc0 = 0; kc0 < nkb; kc0 += MM_AMX_KC) {
    const int64_t kc = nkb - kc0 < MM_AMX_KC ? nkb - kc0 : MM_AMX_KC;
    for (int64_t g0 = 0; g0 < m; g0 += MM_AMX_MG) {
      const int64_t mg = m - g0 < MM_AMX_MG ? m - g0 : MM_AMX_MG;
      for (int64_t j = 0; j < (mg + 15) / 16 * 16; ++j) {  // zero scales for a tail's padding rows
        float* dj = ds + (j / 16) * kc * 16 + j % 16;
        const float* src = d + (g0 + j) * nkb + kc0;
        for (int64_t b = 0; b < kc; ++b) dj[b * 16] = j < mg ? src[b] : 0.f;
      }
      const int64_t full = mg / 16 * 16;
      group_pass<WS>(W, tile_stride, nkb, kc0, kc, t0, t1, q + g0 * nkb * MM_QK, ds, 0, full, out + g0 * ldo,
                     ldo, n_valid, wb);
      if (full < mg) {  // the tail tile, under its own row count
        load_config((int)(mg - full));
        group_pass<WS>(W, tile_stride, nkb, kc0, kc, t0, t1, q + g0 * nkb * MM_QK, ds, full, mg, out + g0 * ldo,
                       ldo, n_valid, wb);
        load_config(16);
      }
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
  // This thread's tile configuration is (re)loaded on every call: job-pool helpers never ran
  // ldtilecfg, and other code (oneDNN) may have loaded its own in between.
  // A short token tail costs a whole tile pass (and two configuration loads) on AMX, but only its
  // own rows on VNNI: the tail goes to VNNI below MM_AMX_TAIL_MIN rows.
  const int64_t tail = m % 16, m_amx = tail >= MM_AMX_TAIL_MIN ? m : m - tail;
  load_config(16);
  if (wscaled)
    gemm_tiles<true>(W, tile_stride, nkb, t0, t1, q, d, m_amx, out, ldo, n_valid);
  else
    gemm_tiles<false>(W, tile_stride, nkb, t0, t1, q, d, m_amx, out, ldo, n_valid);
  _tile_release();  // back to the init state: no 8 KB of tile data to save at context switches
  if (m_amx < m)
    mm_kernels_avx512.gemm(W, tile_stride, nkb, wscaled, t0, t1, q + m_amx * nkb * MM_QK, d + m_amx * nkb,
                           s + m_amx * nkb, m - m_amx, out + m_amx * ldo, ldo, n_valid);
}

}  // namespace

extern "C" int mm_amx_cpu_has(void) {
  unsigned a, b, c, dx;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &dx)) return 0;
  if (!(dx & (1u << 24)) || !(dx & (1u << 25))) return 0;  // AMX-TILE, AMX-INT8
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

extern const mm_kernels mm_kernels_amx = {"amx", "avx512", quant_row, gemm, silu_mul, prep_row, quant_scaled,
                                          attend_for, router_rows};
