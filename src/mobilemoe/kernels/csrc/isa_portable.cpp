// Portable (baseline x86-64 / any CPU) kernels on the mobilemoe-q4t16 layout. See mm_common.h.
#include <math.h>

#include "mm_common.h"

namespace {

void quant_row(const float* x, int64_t K, int8_t* q, float* d, int32_t* s) {
  const int64_t nkb = K / MM_QK;
  for (int64_t b = 0; b < nkb; ++b) {
    float a[MM_QK];
    float amax = 0.f;
    for (int i = 0; i < MM_QK; ++i) {
      const float v = x[b * MM_QK + i];
      a[i] = v;
      float av = fabsf(v);
      amax = av > amax ? av : amax;
    }
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int i = 0; i < MM_QK; ++i) {
      int v = (int)nearbyintf(a[i] * id);
      v = v > 127 ? 127 : (v < -127 ? -127 : v);
      q[b * MM_QK + i] = (int8_t)v;
      sum += v;
    }
    d[b] = amax / 127.f;
    s[b] = 8 * sum;
  }
}

// Per (tile, block): decode the 16x32 codes once to signed int8, then plain dot products per token
// (a shape compilers auto-vectorize on any target).
void gemm(const uint8_t* W, int64_t tile_stride, int64_t nkb, int wscaled, int64_t t0, int64_t t1,
          const int8_t* q, const float* d, const int32_t* s, int64_t m, float* out, int64_t ldo,
          int64_t n_valid) {
  (void)s;  // codes are un-biased here, so the 8*sum(q) correction is not needed
  const int64_t K = nkb * MM_QK;
  enum { MCH = 32 };
  float acc[MCH][MM_TILE];
  int8_t w8[MM_TILE][MM_QK];
  float wsc[MM_TILE];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = W + t * tile_stride;
    const uint16_t* ws = (const uint16_t*)(wt + nkb * MM_BLOCK_BYTES);
    for (int64_t j0 = 0; j0 < m; j0 += MCH) {
      const int64_t mc = m - j0 < MCH ? m - j0 : MCH;
      for (int64_t j = 0; j < mc; ++j)
        for (int r = 0; r < MM_TILE; ++r) acc[j][r] = 0.f;
      for (int64_t b = 0; b < nkb; ++b) {
        const uint8_t* wb = wt + b * MM_BLOCK_BYTES;
        for (int c = 0; c < 4; ++c)
          for (int r = 0; r < MM_TILE; ++r)
            for (int kk = 0; kk < 4; ++kk) {
              const uint8_t byte = wb[c * 64 + r * 4 + kk];
              w8[r][8 * c + kk] = (int8_t)((byte & 15) - 8);
              w8[r][8 * c + 4 + kk] = (int8_t)((byte >> 4) - 8);
            }
        for (int r = 0; r < MM_TILE; ++r) wsc[r] = wscaled ? mm_half_to_float(ws[b * MM_TILE + r]) : 1.f;
        for (int64_t j = 0; j < mc; ++j) {
          const int8_t* qa = q + (j0 + j) * K + b * MM_QK;
          const float dj = d[(j0 + j) * nkb + b];
          for (int r = 0; r < MM_TILE; ++r) {
            int32_t isum = 0;
            for (int i = 0; i < MM_QK; ++i) isum += (int32_t)w8[r][i] * (int32_t)qa[i];
            acc[j][r] += (float)isum * (wsc[r] * dj);
          }
        }
      }
      for (int64_t j = 0; j < mc; ++j)
        for (int r = 0; r < MM_TILE; ++r)
          if (t * MM_TILE + r < n_valid) out[(j0 + j) * ldo + t * MM_TILE + r] = acc[j][r];
    }
  }
}

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

}  // namespace

// scores[r][j] = q_r . k_j / sqrt(D); p = softmax; out_r = sum_j p[r][j] v_j. Each key and value
// row is read once for all G heads of its group.
void mm_attend_portable(const float* q, const uint16_t* K, const uint16_t* V, int64_t S, int64_t D, int64_t G,
                        float* scores, float* out) {
  const float scale = 1.0f / sqrtf((float)D);
  for (int64_t j = 0; j < S; ++j)
    for (int64_t r = 0; r < G; ++r) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += q[r * D + d] * mm_half_to_float(K[j * D + d]);
      scores[r * S + j] = acc * scale;
    }
  for (int64_t r = 0; r < G; ++r) {
    float* sr = scores + r * S;
    float mx = sr[0];
    for (int64_t j = 1; j < S; ++j) mx = sr[j] > mx ? sr[j] : mx;
    float total = 0.f;
    for (int64_t j = 0; j < S; ++j) total += (sr[j] = expf(sr[j] - mx));
    for (int64_t j = 0; j < S; ++j) sr[j] /= total;
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = 0.f;
  }
  for (int64_t j = 0; j < S; ++j)
    for (int64_t d = 0; d < D; ++d) {
      const float v = mm_half_to_float(V[j * D + d]);
      for (int64_t r = 0; r < G; ++r) out[r * D + d] += scores[r * S + j] * v;
    }
}

mm_attend_fn mm_attend_for_portable(int64_t G, int64_t D) {
  (void)G, (void)D;
  return mm_attend_portable;
}

void mm_router_rows_portable(const float* h, const float* W, int64_t H, int64_t e0, int64_t e1, int sigmoid,
                             float* out) {
  for (int64_t e = e0; e < e1; ++e) {
    float acc = 0.f;
    for (int64_t i = 0; i < H; ++i) acc += h[i] * W[e * H + i];
    out[e] = sigmoid ? 1.f / (1.f + expf(-acc)) : acc;
  }
}

extern const mm_kernels mm_kernels_portable = {"portable", "portable", quant_row, gemm, silu_mul,
                                               mm_prep_row_generic, mm_quant_scaled_generic,
                                               mm_attend_for_portable, mm_router_rows_portable,
                                               0, 0, nullptr, nullptr};  // no prefill-only entries
