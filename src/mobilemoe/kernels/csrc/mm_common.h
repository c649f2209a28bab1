// Shared, torch-free definitions for the per-ISA kernel translation units.
//
// The ISA units are compiled with their own -m flags. They must NOT include torch or any C++
// standard-library template header: an inline function instantiated there with AVX-512 enabled
// could be picked by the linker for the whole extension and crash a CPU without AVX-512. Everything
// they define is either `static`/anonymous-namespace or one exported `const mm_kernels` table.
//
// Runtime weight layout ("mobilemoe-q4t16"), built once at load time by mobilemoe.kernels.pack:
//   Rows (output features) are grouped in tiles of 16, K (input features, multiple of 32) in
//   blocks of 32. Tile t occupies `tile_stride` bytes (a multiple of 64) starting at t*tile_stride:
//     [nkb blocks x 256 bytes of codes][nkb x 16 fp16 row scales]   (scales only for linear weights)
//   Inside a (tile, block) the 256 code bytes are 4 chunks of 64 bytes; chunk c, byte r*4+kk holds
//     low nibble  = code(row r, k = 32*b + 8*c + kk) + 8        (k-group 2c)
//     high nibble = code(row r, k = 32*b + 8*c + 4 + kk) + 8    (k-group 2c+1)
//   so one 64-byte vector holds a 16 rows x 4 k slab: exactly what vpdpbusd consumes against a
//   broadcast of 4 int8 activations (one int32 lane per output row).
//   Codes are stored biased (unsigned 0..15); the bias is removed with 8*sum(q) per activation
//   block (the llama.cpp Q4_0 x Q8_0 trick).
// Activations are quantized per row to int8 per block of 32 (Q8_0): q[K], d[nkb] (fp32 scale),
//   s[nkb] = 8 * sum(q in block).
// Routed experts keep their scales along `out` (the checkpoint format), so output group g needs the
//   activation x[k] * scale[k, g]. Its int8 form is q = round(u[k] * sn[k]) with u = x * 127 / max|x|_b
//   (prep_row, once per token row) and sn = scale / max|scale|_b, i.e. step d = max|x|_b *
//   max|scale|_b / 127 per block b: the product of the two block maxima instead of max|x * scale|_b.
//   That is at most slightly coarser (the scales of one group vary little along k) and lets all
//   tokens of a group share one scale row instead of a max-reduction per (token, group), which at
//   prefill would cost as much as the GEMMs.
//   The scale rows are normalised at pack time (mobilemoe.kernels.pack.pack_experts): expert e,
//   group g holds K + K/32 fp16 values, [sn (K, rounded to fp16) | smax (K/32, exact)], so a decode
//   step reads them instead of re-deriving them per group.
#pragma once
#include <stdint.h>
#include <string.h>

#define MM_TILE 16
#define MM_QK 32
#define MM_BLOCK_BYTES 256

// Decode attention over one KV head: q [G, D] fp32 (the G query heads of the group), K and V
// [S, D] fp16, scores scratch [G, S] -> out [G, D] = softmax(q K^T / sqrt(D)) V.
typedef void (*mm_attend_fn)(const float* q, const uint16_t* K, const uint16_t* V, int64_t S, int64_t D, int64_t G,
                             float* scores, float* out);

typedef struct mm_kernels {
  const char* name;
  // The ISA of the non-GEMM vector kernels below (amx uses avx512's, the three aarch64 tables neon's,
  // avx2 the portable ones).
  const char* vector_isa;
  // One activation row: x[K] -> q, d, s.
  void (*quant_row)(const float* x, int64_t K, int8_t* q, float* d, int32_t* s);
  // out[j*ldo + 16*t + r] = sum_k x_j[k] * W[16t + r, k] for tiles t in [t0, t1), tokens j < m,
  // columns >= n_valid are not written. q/d/s hold m rows (row stride K = 32*nkb, nkb).
  void (*gemm)(const uint8_t* W, int64_t tile_stride, int64_t nkb, int wscaled, int64_t t0, int64_t t1,
               const int8_t* q, const float* d, const int32_t* s, int64_t m, float* out, int64_t ldo,
               int64_t n_valid);
  // out[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i] for i < n (the SwiGLU activation).
  void (*silu_mul)(const float* g, const float* u, float* out, int64_t n);
  // Expert activations (see above): u[k] = x[k] * 127 / max|x|_b, xd[b] = max|x|_b / 127 (0: zero block).
  void (*prep_row)(const float* x, int64_t K, float* u, float* xd);
  // q[k] = round(u[k] * sn[k]) in [-127, 127] (sn fp16), s[b] = 8 * sum(q in b).
  void (*quant_scaled)(const float* u, const uint16_t* sn, int64_t K, int8_t* q, int32_t* s);
  // The decode attention kernel for G query heads per KV head of width D (never NULL: a unit without
  // an instance for (G, D) returns mm_attend_portable).
  mm_attend_fn (*attend_for)(int64_t G, int64_t D);
  // Router logits of one token: out[e] = h . W[e] (W [E, H] fp32) for e in [e0, e1), each summed in a
  // fixed order; then out[e] = sigmoid(out[e]) when `sigmoid`.
  void (*router_rows)(const float* h, const float* W, int64_t H, int64_t e0, int64_t e1, int sigmoid, float* out);

  // ---- optional entries: a table that leaves them out of its initialiser gets 0 / NULL ----
  // From prefill_min_m tokens on, linear layers run gemm_tile_block output tiles per gemm call (if
  // > 0; the operators' default is TILE_BLOCK) and routed experts expert_gemm_bf16 (if not NULL)
  // for an expert's token chunk; below it (decode) the int8 paths above keep their job shapes. A
  // gemm that converts a call's activations once per call (AMX) wants wider calls than one that
  // streams them.
  int64_t prefill_min_m;
  int64_t gemm_tile_block;
  // Routed experts on bf16 activations (else the int8 path above, prep_row + quant_scaled + gemm).
  // The expert scale rides on the weights instead of the activations, so one bf16 copy of the rows
  // (rows_to_bf16, round to nearest even) serves every output group:
  //   out[j*ldo + 16*t + r] = sum_k a_j[k] * code(16t + r, k) * sn[k] * smax[k/32]
  // for tiles t in [t0, t1) (one output group: t0 = 2g), m rows a_j = a + j*lda (bf16 bits),
  // srow = the group's scale row [sn (K) | smax (K/32)] (fp16), columns >= n_valid not written.
  void (*rows_to_bf16)(const float* x, int64_t n, uint16_t* out);
  void (*expert_gemm_bf16)(const uint8_t* W, int64_t tile_stride, int64_t nkb, const uint16_t* srow, int64_t t0,
                           int64_t t1, const uint16_t* a, int64_t lda, int64_t m, float* out, int64_t ldo,
                           int64_t n_valid);
} mm_kernels;

// The portable attention and router (isa_portable.cpp), which the other units fall back to.
void mm_attend_portable(const float* q, const uint16_t* K, const uint16_t* V, int64_t S, int64_t D, int64_t G,
                        float* scores, float* out);
mm_attend_fn mm_attend_for_portable(int64_t G, int64_t D);
void mm_router_rows_portable(const float* h, const float* W, int64_t H, int64_t e0, int64_t e1, int sigmoid,
                             float* out);

// One-token GEMVs prefetch each whole 256-byte block this many blocks (16 KB) ahead (AVX-512 and
// AVX2 kernels): far enough ahead that DRAM latency is hidden at full bandwidth (the distances
// tried are in BENCHMARKS.md, "Kernel design measurements").
#define MM_PREFETCH_BLOCKS 64

// The lookahead's first stretch, requested at once when a one-token call starts (nothing is in
// flight then, and a decode call is only a 12-24 KB job): one burst of misses in parallel instead
// of demand misses the loop only slowly runs ahead of.
static inline void mm_prefetch_lookahead(const uint8_t* start) {
  for (int64_t o = 0; o < MM_PREFETCH_BLOCKS * MM_BLOCK_BYTES; o += 64) __builtin_prefetch(start + o, 0, 3);
}

// The tile loop every SIMD unit's gemm entry shares: tiles t in [t0, t1), tokens in groups of up
// to MBMAX per tile (the tile stays in L1/L2 across groups), each group on the unit's own
// tile_group<WS>(mb, ...), WS = linear weights with row scales. A macro so that it expands inside
// the unit's anonymous namespace and compiles with the unit's -m flags (see the note at the top).
#define MM_DEFINE_GEMM(MBMAX)                                                                          \
  template <bool WS>                                                                                   \
  void gemm_t(const uint8_t* W, int64_t tile_stride, int64_t nkb, int64_t t0, int64_t t1,              \
              const int8_t* q, const float* d, const int32_t* s, int64_t m, float* out, int64_t ldo,   \
              int64_t n_valid) {                                                                       \
    const int64_t K = nkb * MM_QK;                                                                     \
    if (m == 1) mm_prefetch_lookahead(W + t0 * tile_stride);                                           \
    for (int64_t t = t0; t < t1; ++t) {                                                                \
      const int64_t rem = n_valid - t * MM_TILE;                                                       \
      if (rem <= 0) continue;                                                                          \
      const int n_store = rem >= MM_TILE ? MM_TILE : (int)rem;                                         \
      for (int64_t j0 = 0; j0 < m; j0 += (MBMAX)) {                                                    \
        const int64_t mb = m - j0 < (MBMAX) ? m - j0 : (MBMAX);                                        \
        tile_group<WS>(mb, W + t * tile_stride, nkb, q + j0 * K, d + j0 * nkb, s + j0 * nkb,           \
                       out + j0 * ldo + t * MM_TILE, ldo, n_store);                                    \
      }                                                                                                \
    }                                                                                                  \
  }                                                                                                    \
  void gemm(const uint8_t* W, int64_t tile_stride, int64_t nkb, int wscaled, int64_t t0, int64_t t1,   \
            const int8_t* q, const float* d, const int32_t* s, int64_t m, float* out, int64_t ldo,     \
            int64_t n_valid) {                                                                         \
    if (wscaled)                                                                                       \
      gemm_t<true>(W, tile_stride, nkb, t0, t1, q, d, s, m, out, ldo, n_valid);                        \
    else                                                                                               \
      gemm_t<false>(W, tile_stride, nkb, t0, t1, q, d, s, m, out, ldo, n_valid);                       \
  }

// MM_DEFINE_GEMM with the tile_group of a unit whose tile_kernel<MB, WS> blocks up to 4 tokens.
#define MM_DEFINE_GEMM_4                                                                               \
  template <bool WS>                                                                                   \
  void tile_group(int64_t mb, const uint8_t* wt, int64_t nkb, const int8_t* q, const float* d,         \
                  const int32_t* s, float* out, int64_t ldo, int n_store) {                            \
    switch (mb) {                                                                                      \
      case 1: tile_kernel<1, WS>(wt, nkb, q, d, s, out, ldo, n_store); break;                          \
      case 2: tile_kernel<2, WS>(wt, nkb, q, d, s, out, ldo, n_store); break;                          \
      case 3: tile_kernel<3, WS>(wt, nkb, q, d, s, out, ldo, n_store); break;                          \
      default: tile_kernel<4, WS>(wt, nkb, q, d, s, out, ldo, n_store); break;                         \
    }                                                                                                  \
  }                                                                                                    \
  MM_DEFINE_GEMM(4)

// The attend_for entry of a unit whose decode attention is attend_group_t<G, NV> (NV = D / 16):
// instances for G in 1..8 and D in {16, 32, 48, 64}, mm_attend_portable for any other shape. A macro
// so that it expands inside the unit's anonymous namespace (see the note at the top).
#define MM_DEFINE_ATTEND_FOR                                                                           \
  template <int G>                                                                                     \
  mm_attend_fn attend_for_nv(int64_t nv) {                                                             \
    switch (nv) {                                                                                      \
      case 1: return attend_group_t<G, 1>;                                                             \
      case 2: return attend_group_t<G, 2>;                                                             \
      case 3: return attend_group_t<G, 3>;                                                             \
      case 4: return attend_group_t<G, 4>;                                                             \
      default: return nullptr;                                                                         \
    }                                                                                                  \
  }                                                                                                    \
  mm_attend_fn attend_instance(int64_t G, int64_t D) {                                                 \
    if (D % 16 != 0) return nullptr;                                                                   \
    switch (G) {                                                                                       \
      case 1: return attend_for_nv<1>(D / 16);                                                         \
      case 2: return attend_for_nv<2>(D / 16);                                                         \
      case 3: return attend_for_nv<3>(D / 16);                                                         \
      case 4: return attend_for_nv<4>(D / 16);                                                         \
      case 5: return attend_for_nv<5>(D / 16);                                                         \
      case 6: return attend_for_nv<6>(D / 16);                                                         \
      case 7: return attend_for_nv<7>(D / 16);                                                         \
      case 8: return attend_for_nv<8>(D / 16);                                                         \
      default: return nullptr;                                                                         \
    }                                                                                                  \
  }                                                                                                    \
  mm_attend_fn attend_for(int64_t G, int64_t D) {                                                      \
    const mm_attend_fn f = attend_instance(G, D);                                                      \
    return f ? f : mm_attend_portable;                                                                 \
  }

extern const mm_kernels mm_kernels_portable;
#if defined(__x86_64__) || defined(_M_X64)
extern const mm_kernels mm_kernels_avx2;    // built only on x86-64 (see setup.py)
extern const mm_kernels mm_kernels_avx512;
#endif

static inline float mm_half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; --exp; }
      man &= 0x3FFu;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// ---- generic (any ISA) versions of the expert-activation steps; the ISA units may override ----
// GCC builtins instead of <math.h>: this header stays free of C++ library inline templates.

static inline void mm_prep_row_generic(const float* x, int64_t K, float* u, float* xd) {
  for (int64_t b = 0; b < K / MM_QK; ++b) {
    float amax = 0.f;
    for (int i = 0; i < MM_QK; ++i) {
      const float a = __builtin_fabsf(x[b * MM_QK + i]);
      amax = a > amax ? a : amax;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int i = 0; i < MM_QK; ++i) u[b * MM_QK + i] = x[b * MM_QK + i] * inv;
    xd[b] = amax / 127.f;
  }
}

static inline void mm_quant_scaled_generic(const float* u, const uint16_t* sn, int64_t K, int8_t* q, int32_t* s) {
  for (int64_t b = 0; b < K / MM_QK; ++b) {
    int32_t sum = 0;
    for (int i = 0; i < MM_QK; ++i) {
      int v = (int)__builtin_nearbyintf(u[b * MM_QK + i] * mm_half_to_float(sn[b * MM_QK + i]));
      v = v > 127 ? 127 : (v < -127 ? -127 : v);
      q[b * MM_QK + i] = (int8_t)v;
      sum += v;
    }
    s[b] = 8 * sum;
  }
}

static inline int32_t mm_ld32(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}
