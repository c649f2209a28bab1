// aarch64 kernels on the mobilemoe-q4t16 layout (see mm_common.h), shared by three units:
//   isa_neon.cpp          MM_NEON_LEVEL 0  -march=armv8-a                  (vmull/vmlal int16 products)
//   isa_neon_dotprod.cpp  MM_NEON_LEVEL 1  -march=armv8.2-a+dotprod        (SDOT, vdotq_laneq_s32)
//   isa_neon_i8mm.cpp     MM_NEON_LEVEL 2  -march=armv8.2-a+dotprod+i8mm   (SMMLA for token pairs)
// The -march levels enable only the extension each unit needs (not e.g. armv8.6-a, which would let the
// compiler emit v8.3-8.6 instructions that i8mm CPUs such as Neoverse V1, an Armv8.4 core, lack).
// Each unit defines MM_NEON_LEVEL, includes this header once and exports one table. Like every ISA unit
// it must not include C++ standard-library headers (see mm_common.h); everything here is internal.
//
// The packed layout serves every ISA: a 16-byte load from chunk c of a (tile, block) holds 4 rows x 4 k
// (byte 4r' + kk), low nibble k = 8c + kk, high nibble k = 8c + 4 + kk. The codes stay biased (0..15,
// i.e. non-negative int8) and every integer dot starts from -s = -8 * sum(q), so all three variants
// produce the same int32 dot per (token, row, block) as the portable kernel, bit for bit.
// The float part then follows the portable order: acc += float(isum) * (scale[r] * d[b]), block by
// block (fused multiply-add here, so the fp32 outputs agree to rounding, not bit for bit).
// Decode attention and the router logits are baseline Advanced SIMD in all three variants (their
// own orders of summation and a vectorized exp: they agree with portable to rounding, see below).
#pragma once
#if !defined(__aarch64__)
#error "neon_kernels.h is for aarch64 only (setup.py builds the NEON units only there)"
#endif
#ifndef MM_NEON_LEVEL
#error "define MM_NEON_LEVEL (0 neon, 1 dotprod, 2 i8mm) before including neon_kernels.h"
#endif
#include <arm_neon.h>

#include "mm_common.h"

namespace {

// ---------------------------------------------------------------- activations (exact vs portable)

// max|v| over one block of 32 floats.
inline float block_absmax(const float* v) {
  float32x4_t m = vabsq_f32(vld1q_f32(v));
  for (int i = 4; i < MM_QK; i += 4) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(v + i)));
  return vmaxvq_f32(m);
}

// Stores round(p[i] * f[i]) clamped to [-127, 127] as int8 for one block (p and f: 8 vectors of 4),
// returns the sum of the stored values. vcvtnq rounds to nearest even, as nearbyintf does.
inline int32_t store_block(const float32x4_t* p, int8_t* q) {
  const int32x4_t lim = vdupq_n_s32(127);
  int32x4_t sum = vdupq_n_s32(0);
  int16x8_t h[4];
  for (int i = 0; i < 4; ++i) {
    int32x4_t a = vcvtnq_s32_f32(p[2 * i]), b = vcvtnq_s32_f32(p[2 * i + 1]);
    a = vmaxq_s32(vminq_s32(a, lim), vnegq_s32(lim));
    b = vmaxq_s32(vminq_s32(b, lim), vnegq_s32(lim));
    sum = vaddq_s32(sum, vaddq_s32(a, b));
    h[i] = vcombine_s16(vmovn_s32(a), vmovn_s32(b));
  }
  vst1q_s8(q, vcombine_s8(vmovn_s16(h[0]), vmovn_s16(h[1])));
  vst1q_s8(q + 16, vcombine_s8(vmovn_s16(h[2]), vmovn_s16(h[3])));
  return vaddvq_s32(sum);
}

// Linear activations (Q8_0): d = max|x|_b / 127, q = round(x * 127 / max|x|_b), s = 8 * block sums.
void quant_row(const float* x, int64_t K, int8_t* q, float* d, int32_t* s) {
  for (int64_t b = 0; b < K / MM_QK; ++b) {
    const float* xb = x + b * MM_QK;
    const float amax = block_absmax(xb);
    const float32x4_t id = vdupq_n_f32(amax > 0.f ? 127.f / amax : 0.f);
    float32x4_t p[8];
    for (int i = 0; i < 8; ++i) p[i] = vmulq_f32(vld1q_f32(xb + 4 * i), id);
    s[b] = 8 * store_block(p, q + b * MM_QK);
    d[b] = amax / 127.f;
  }
}

// Expert activations: u = x * 127 / max|x|_b, xd = max|x|_b / 127.
void prep_row(const float* x, int64_t K, float* u, float* xd) {
  for (int64_t b = 0; b < K / MM_QK; ++b) {
    const float* xb = x + b * MM_QK;
    const float amax = block_absmax(xb);
    const float32x4_t inv = vdupq_n_f32(amax > 0.f ? 127.f / amax : 0.f);
    for (int i = 0; i < MM_QK; i += 4) vst1q_f32(u + b * MM_QK + i, vmulq_f32(vld1q_f32(xb + i), inv));
    xd[b] = amax / 127.f;
  }
}

// q = round(u * sn) (sn fp16; FCVTL is exact for every finite half), s = 8 * block sums.
void quant_scaled(const float* u, const uint16_t* sn, int64_t K, int8_t* q, int32_t* s) {
  for (int64_t b = 0; b < K / MM_QK; ++b) {
    const int64_t o = b * MM_QK;
    float32x4_t p[8];
    for (int i = 0; i < 8; ++i) {
      const float32x4_t f = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sn + o + 4 * i)));
      p[i] = vmulq_f32(vld1q_f32(u + o + 4 * i), f);
    }
    s[b] = 8 * store_block(p, q + o);
  }
}

// ---------------------------------------------------------------- SwiGLU

// exp(x) with Cephes' expf scheme (as vec_math.h for x86): clamp to [-87.3, 88.3], n = round(x/ln2),
// two-constant reduction, degree-6 polynomial, times 2^n from exponent bits (n in [-126, 127]).
inline float32x4_t exp_f32x4(float32x4_t x) {
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3f)), vdupq_n_f32(88.3f));
  const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
  r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.9875691500E-4f);
  p = vfmaq_f32(vdupq_n_f32(1.3981999507E-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(8.3334519073E-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(4.1665795894E-2f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.6666665459E-1f), p, r);
  p = vfmaq_f32(vdupq_n_f32(5.0000001201E-1f), p, r);
  p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.f)), p, vmulq_f32(r, r));
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

inline float32x4_t silu_mul4(float32x4_t g, float32x4_t u) {
  const float32x4_t den = vaddq_f32(vdupq_n_f32(1.f), exp_f32x4(vnegq_f32(g)));
  return vmulq_f32(vdivq_f32(g, den), u);
}

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(out + i, silu_mul4(vld1q_f32(g + i), vld1q_f32(u + i)));
  if (i < n) {  // tail through a zero-padded vector, so it gets the same math as the body
    float gt[4] = {0.f, 0.f, 0.f, 0.f}, ut[4] = {0.f, 0.f, 0.f, 0.f}, ot[4];
    for (int64_t j = i; j < n; ++j) gt[j - i] = g[j], ut[j - i] = u[j];
    vst1q_f32(ot, silu_mul4(vld1q_f32(gt), vld1q_f32(ut)));
    for (int64_t j = i; j < n; ++j) out[j] = ot[j - i];
  }
}

// ---------------------------------------------------------------- decode attention
// One KV group (its G query heads) per call, as the AVX-512 kernel: G and NV = D / 16 are template
// parameters (G in 1..8, D in {16, 32, 48, 64}; anything else runs mm_attend_portable), so the loops
// over the D / 4 vectors of a row unroll and the q and output vectors are fixed-size arrays (GCC keeps
// what fits of them in the 32 vector registers and the rest in L1-resident stack slots). Differences
// from the portable kernel, all rounding-level: FMA dot products over 4 lanes then a pairwise lane sum,
// the Cephes exp above (<= ~3 ulp, clamped at -87.3, so a score more than 87 below the maximum gets
// weight ~1e-38 instead of 0), and 1/sum applied once to each output instead of to every weight.

// Row j of an fp16 [S, D] matrix as D / 4 fp32 vectors (FCVTL is exact for every half).
template <int NC>
inline void load_half_row(const uint16_t* p, float32x4_t* v) {
  for (int c = 0; c < NC; c += 2) {
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(p + 4 * c));
    v[c] = vcvt_f32_f16(vget_low_f16(h));
    v[c + 1] = vcvt_high_f32_f16(h);
  }
}

template <int G, int NV>
void attend_group_t(const float* q, const uint16_t* K, const uint16_t* Vc, int64_t S, int64_t /*D*/,
                    int64_t /*G*/, float* scores, float* out) {
  constexpr int D = NV * 16, NC = D / 4;
  const float scale = 1.0f / __builtin_sqrtf((float)D);
  float32x4_t qv[G][NC];
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < NC; ++c) qv[r][c] = vld1q_f32(q + r * D + 4 * c);
  // The cache streams from DRAM at decode: prefetch the key rows 32 ahead (and the value rows 32 ahead
  // in the second pass).
  constexpr int64_t kAhead = 32;
  for (int64_t j = 0; j < S; ++j) {
    if (j + kAhead < S)
      for (int b = 0; b < D * 2; b += 64) __builtin_prefetch((const char*)(K + (j + kAhead) * D) + b, 0, 3);
    float32x4_t k[NC];
    load_half_row<NC>(K + j * D, k);
    for (int r = 0; r < G; ++r) {  // two chains per head (NC is even)
      float32x4_t a0 = vmulq_f32(qv[r][0], k[0]), a1 = vmulq_f32(qv[r][1], k[1]);
      for (int c = 2; c < NC; c += 2) {
        a0 = vfmaq_f32(a0, qv[r][c], k[c]);
        a1 = vfmaq_f32(a1, qv[r][c + 1], k[c + 1]);
      }
      scores[r * S + j] = vaddvq_f32(vaddq_f32(a0, a1)) * scale;
    }
  }
  // Softmax numerators exp(s - max) with the vectorized exp; the tail (S % 4 scores) goes through a
  // padded vector so that it gets the same math, and only its valid lanes are stored and summed.
  float inv[G];
  for (int r = 0; r < G; ++r) {
    float* sr = scores + r * S;
    float32x4_t vmax = vdupq_n_f32(-__builtin_inff());
    int64_t j = 0;
    for (; j + 4 <= S; j += 4) vmax = vmaxq_f32(vmax, vld1q_f32(sr + j));
    float mx = vmaxvq_f32(vmax);
    for (int64_t t = j; t < S; ++t) mx = sr[t] > mx ? sr[t] : mx;
    const float32x4_t mxv = vdupq_n_f32(mx);
    float32x4_t vsum = vdupq_n_f32(0.f);
    for (j = 0; j + 4 <= S; j += 4) {
      const float32x4_t e = exp_f32x4(vsubq_f32(vld1q_f32(sr + j), mxv));
      vst1q_f32(sr + j, e);
      vsum = vaddq_f32(vsum, e);
    }
    float total = vaddvq_f32(vsum);
    if (j < S) {
      float t[4] = {mx, mx, mx, mx};
      for (int64_t i = j; i < S; ++i) t[i - j] = sr[i];
      vst1q_f32(t, exp_f32x4(vsubq_f32(vld1q_f32(t), mxv)));
      for (int64_t i = j; i < S; ++i) total += (sr[i] = t[i - j]);
    }
    inv[r] = 1.0f / total;
  }
  float32x4_t o[G][NC];
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < NC; ++c) o[r][c] = vdupq_n_f32(0.f);
  for (int64_t j = 0; j < S; ++j) {
    if (j + kAhead < S)
      for (int b = 0; b < D * 2; b += 64) __builtin_prefetch((const char*)(Vc + (j + kAhead) * D) + b, 0, 3);
    float32x4_t v[NC];
    load_half_row<NC>(Vc + j * D, v);
    for (int r = 0; r < G; ++r) {
      const float p = scores[r * S + j];
      for (int c = 0; c < NC; ++c) o[r][c] = vfmaq_n_f32(o[r][c], v[c], p);
    }
  }
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < NC; ++c) vst1q_f32(out + r * D + 4 * c, vmulq_n_f32(o[r][c], inv[r]));
}

MM_DEFINE_ATTEND_FOR

// ---------------------------------------------------------------- router

// out[r] = h . w[r * H ..] for R <= 4 consecutive rows at w: one FMA chain (4 lanes) per row, all
// sharing each load of h, then a pairwise lane sum and the H % 4 tail in order. The rows of the next
// group (4 H floats on) are prefetched a cache line per 16 floats: the ~150 MB of weights each token
// streams evict the router between tokens.
template <int R>
inline void router_block(const float* h, const float* w, int64_t H, float* out) {
  const int64_t H4 = H & ~(int64_t)3;
  float32x4_t acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vdupq_n_f32(0.f);
  for (int64_t i0 = 0; i0 < H4; i0 += 16) {
    for (int r = 0; r < R; ++r) __builtin_prefetch(w + (r + 4) * H + i0, 0, 3);
    const int64_t i1 = H4 - i0 < 16 ? H4 : i0 + 16;
    for (int64_t i = i0; i < i1; i += 4) {
      const float32x4_t hv = vld1q_f32(h + i);
      for (int r = 0; r < R; ++r) acc[r] = vfmaq_f32(acc[r], vld1q_f32(w + r * H + i), hv);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = vaddvq_f32(acc[r]);
    for (int64_t i = H4; i < H; ++i) s += h[i] * w[r * H + i];
    out[r] = s;
  }
}

inline float32x4_t sigmoid4(float32x4_t x) {
  const float32x4_t one = vdupq_n_f32(1.f);
  return vdivq_f32(one, vaddq_f32(one, exp_f32x4(vnegq_f32(x))));
}

void router_rows(const float* h, const float* W, int64_t H, int64_t e0, int64_t e1, int sigmoid, float* out) {
  int64_t e = e0;
  for (; e + 4 <= e1; e += 4) router_block<4>(h, W + e * H, H, out + e);
  switch (e1 - e) {
    case 1: router_block<1>(h, W + e * H, H, out + e); break;
    case 2: router_block<2>(h, W + e * H, H, out + e); break;
    case 3: router_block<3>(h, W + e * H, H, out + e); break;
    default: break;
  }
  if (!sigmoid) return;
  for (e = e0; e + 4 <= e1; e += 4) vst1q_f32(out + e, sigmoid4(vld1q_f32(out + e)));
  if (e < e1) {  // tail through a zero-padded vector (same math as the body)
    float t[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t i = e; i < e1; ++i) t[i - e] = out[i];
    vst1q_f32(t, sigmoid4(vld1q_f32(t)));
    for (int64_t i = e; i < e1; ++i) out[i] = t[i - e];
  }
}

// ---------------------------------------------------------------- INT4 x INT8 GEMM

// Code vector v of a (tile, block) at wb: v = 4c + i holds rows 4i..4i+3 of chunk c. Each token loads
// them again from L1 (16 loads next to 32 dot instructions) rather than pinning 16 of the 32 vector
// registers, which the 4 tokens' 16 accumulators need.
inline uint8x16_t codes(const uint8_t* wb, int v) { return vld1q_u8(wb + 16 * v); }

inline int8x16_t lo_nib(uint8x16_t v) { return vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))); }
inline int8x16_t hi_nib(uint8x16_t v) { return vreinterpretq_s8_u8(vshrq_n_u8(v, 4)); }

#if MM_NEON_LEVEL >= 1
// isum[i] (rows 4i..4i+3) = -s + sum_k code * q for one token: SDOT against each 4-activation group.
inline void token_dots(const uint8_t* wb, const int8_t* qa, int32_t s, int32x4_t isum[4]) {
  const int8x16_t a0 = vld1q_s8(qa), a1 = vld1q_s8(qa + 16);  // 32-bit lanes: k-groups 0-3, 4-7
  int32x4_t acc[4], acc2[4];  // two chains per row quad (low / high nibble)
  for (int i = 0; i < 4; ++i) acc[i] = vdupq_n_s32(-s), acc2[i] = vdupq_n_s32(0);
  for (int i = 0; i < 4; ++i) {
    acc[i] = vdotq_laneq_s32(acc[i], lo_nib(codes(wb, 0 + i)), a0, 0);
    acc2[i] = vdotq_laneq_s32(acc2[i], hi_nib(codes(wb, 0 + i)), a0, 1);
    acc[i] = vdotq_laneq_s32(acc[i], lo_nib(codes(wb, 4 + i)), a0, 2);
    acc2[i] = vdotq_laneq_s32(acc2[i], hi_nib(codes(wb, 4 + i)), a0, 3);
    acc[i] = vdotq_laneq_s32(acc[i], lo_nib(codes(wb, 8 + i)), a1, 0);
    acc2[i] = vdotq_laneq_s32(acc2[i], hi_nib(codes(wb, 8 + i)), a1, 1);
    acc[i] = vdotq_laneq_s32(acc[i], lo_nib(codes(wb, 12 + i)), a1, 2);
    acc2[i] = vdotq_laneq_s32(acc2[i], hi_nib(codes(wb, 12 + i)), a1, 3);
    isum[i] = vaddq_s32(acc[i], acc2[i]);
  }
}
#else
// Without SDOT: int8 x int8 -> int16 products (vmull/vmlal). Per (row, kk) lane the 8 products of a
// block (4 chunks x 2 nibbles) sum to at most 8 * 15 * 127 = 15240, so int16 holds them exactly;
// then pairwise widening adds reduce the 4 kk lanes of each row.
inline void token_dots(const uint8_t* wb, const int8_t* qa, int32_t s, int32x4_t isum[4]) {
  const int32x4_t a0 = vreinterpretq_s32_s8(vld1q_s8(qa)), a1 = vreinterpretq_s32_s8(vld1q_s8(qa + 16));
  int8x16_t arep[8];  // arep[g]: the 4 activations of k-group g repeated 4 times
  arep[0] = vreinterpretq_s8_s32(vdupq_laneq_s32(a0, 0));
  arep[1] = vreinterpretq_s8_s32(vdupq_laneq_s32(a0, 1));
  arep[2] = vreinterpretq_s8_s32(vdupq_laneq_s32(a0, 2));
  arep[3] = vreinterpretq_s8_s32(vdupq_laneq_s32(a0, 3));
  arep[4] = vreinterpretq_s8_s32(vdupq_laneq_s32(a1, 0));
  arep[5] = vreinterpretq_s8_s32(vdupq_laneq_s32(a1, 1));
  arep[6] = vreinterpretq_s8_s32(vdupq_laneq_s32(a1, 2));
  arep[7] = vreinterpretq_s8_s32(vdupq_laneq_s32(a1, 3));
  for (int i = 0; i < 4; ++i) {
    int16x8_t plo = vdupq_n_s16(0), phi = vdupq_n_s16(0);  // rows 4i, 4i+1 | rows 4i+2, 4i+3
    for (int c = 0; c < 4; ++c) {
      const int8x16_t wl = lo_nib(codes(wb, 4 * c + i)), wh = hi_nib(codes(wb, 4 * c + i));
      plo = vmlal_s8(plo, vget_low_s8(wl), vget_low_s8(arep[2 * c]));
      phi = vmlal_high_s8(phi, wl, arep[2 * c]);
      plo = vmlal_s8(plo, vget_low_s8(wh), vget_low_s8(arep[2 * c + 1]));
      phi = vmlal_high_s8(phi, wh, arep[2 * c + 1]);
    }
    // [r0 k01, r0 k23, r1 k01, r1 k23] and the same for rows 2-3 -> [r0, r1, r2, r3]
    const int32x4_t rows = vpaddq_s32(vpaddlq_s16(plo), vpaddlq_s16(phi));
    isum[i] = vsubq_s32(rows, vdupq_n_s32(s));
  }
}
#endif

#if MM_NEON_LEVEL >= 2
// Two tokens at once with SMMLA: a 2x8 weight operand (rows r, r+1, 8 consecutive k each) against a
// 2x8 activation operand (tokens j, j+1) accumulates the 2x2 block [r j, r j+1, r+1 j, r+1 j+1].
// zip1/zip2 of the low and high nibbles put each row's 8 k values of a chunk next to each other.
inline void pair_dots(const uint8_t* wb, const int8_t* qa, const int8_t* qb, int32_t sa, int32_t sb,
                      int32x4_t isa[4], int32x4_t isb[4]) {
  int32x4_t acc[8];  // acc[p]: rows 2p, 2p+1 x tokens a, b
  const int32x4_t init = {-sa, -sb, -sa, -sb};
  for (int p = 0; p < 8; ++p) acc[p] = init;
  for (int c = 0; c < 4; ++c) {
    const int8x16_t av = vcombine_s8(vld1_s8(qa + 8 * c), vld1_s8(qb + 8 * c));
    for (int i = 0; i < 4; ++i) {
      const int32x4_t l = vreinterpretq_s32_s8(lo_nib(codes(wb, 4 * c + i)));
      const int32x4_t h = vreinterpretq_s32_s8(hi_nib(codes(wb, 4 * c + i)));
      acc[2 * i] = vmmlaq_s32(acc[2 * i], vreinterpretq_s8_s32(vzip1q_s32(l, h)), av);
      acc[2 * i + 1] = vmmlaq_s32(acc[2 * i + 1], vreinterpretq_s8_s32(vzip2q_s32(l, h)), av);
    }
  }
  for (int i = 0; i < 4; ++i) {  // rows 4i..4i+3 of each token
    isa[i] = vuzp1q_s32(acc[2 * i], acc[2 * i + 1]);
    isb[i] = vuzp2q_s32(acc[2 * i], acc[2 * i + 1]);
  }
}
#endif

// acc[i] += float(isum[i]) * (scale[i] * d): the portable kernel's order (scale * d first).
inline void accumulate(float32x4_t acc[4], const int32x4_t isum[4], const float32x4_t sc[4], float d) {
  for (int i = 0; i < 4; ++i) acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(isum[i]), vmulq_n_f32(sc[i], d));
}

// One 16-row tile for MB <= 4 tokens over all K blocks (WS: the tile has row scales). MB and WS are
// template parameters: no branch in the block loop, and fixed-size accumulator arrays GCC mostly keeps in registers.
template <int MB, bool WS>
void tile_kernel(const uint8_t* wt, int64_t nkb, const int8_t* q, const float* d, const int32_t* s,
                 float* out, int64_t ldo, int n_store) {
  const int64_t K = nkb * MM_QK;
  const uint16_t* ws = (const uint16_t*)(wt + nkb * MM_BLOCK_BYTES);
  float32x4_t acc[MB][4];
  for (int j = 0; j < MB; ++j)
    for (int i = 0; i < 4; ++i) acc[j][i] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < nkb; ++b) {
    const uint8_t* wb = wt + b * MM_BLOCK_BYTES;
    if (MB == 1) {  // decode is memory-bound: keep a 16 KB lookahead in flight (see mm_common.h)
      const uint8_t* pf = wb + MM_PREFETCH_BLOCKS * MM_BLOCK_BYTES;
      for (int o = 0; o < MM_BLOCK_BYTES; o += 64) __builtin_prefetch(pf + o, 0, 3);
    }
    float32x4_t sc[4];
    for (int i = 0; i < 4; ++i)
      sc[i] = WS ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(ws + b * MM_TILE + 4 * i))) : vdupq_n_f32(1.f);
    int j = 0;
#if MM_NEON_LEVEL >= 2
    for (; j + 2 <= MB; j += 2) {
      int32x4_t ia[4], ib[4];
      pair_dots(wb, q + j * K + b * MM_QK, q + (j + 1) * K + b * MM_QK, s[j * nkb + b], s[(j + 1) * nkb + b], ia, ib);
      accumulate(acc[j], ia, sc, d[j * nkb + b]);
      accumulate(acc[j + 1], ib, sc, d[(j + 1) * nkb + b]);
    }
#endif
    for (; j < MB; ++j) {
      int32x4_t is[4];
      token_dots(wb, q + j * K + b * MM_QK, s[j * nkb + b], is);
      accumulate(acc[j], is, sc, d[j * nkb + b]);
    }
  }
  for (int j = 0; j < MB; ++j) {
    float* o = out + j * ldo;
    if (n_store >= MM_TILE) {
      for (int i = 0; i < 4; ++i) vst1q_f32(o + 4 * i, acc[j][i]);
    } else {
      float tmp[MM_TILE];
      for (int i = 0; i < 4; ++i) vst1q_f32(tmp + 4 * i, acc[j][i]);
      for (int r = 0; r < n_store; ++r) o[r] = tmp[r];
    }
  }
}

MM_DEFINE_GEMM_4

}  // namespace

#if MM_NEON_LEVEL == 0
#define MM_NEON_TABLE mm_kernels_neon
#define MM_NEON_NAME "neon"
#elif MM_NEON_LEVEL == 1
#define MM_NEON_TABLE mm_kernels_dotprod
#define MM_NEON_NAME "dotprod"
#else
#define MM_NEON_TABLE mm_kernels_i8mm
#define MM_NEON_NAME "i8mm"
#endif

// vector_isa "neon" in all three: the non-GEMM kernels (activations, SwiGLU, attention, router) are
// baseline Armv8.0 Advanced SIMD, the same code in every variant.
extern const mm_kernels MM_NEON_TABLE = {MM_NEON_NAME, "neon", quant_row, gemm, silu_mul, prep_row,
                                        quant_scaled, attend_for, router_rows,
                                        0, 0, nullptr, nullptr};  // no prefill-only entries
