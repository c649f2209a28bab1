// Torch-free test driver for the aarch64 kernel tables (neon_kernels.h), run under qemu-aarch64 by
// scripts/test_arm.sh. Every table entry of each variant this CPU supports (arm_features.h) is compared
// with mm_kernels_portable on odd shapes (tails, K not a multiple of 16 blocks, M = 1 and M > the
// 4-token group, partial last tiles, tile sub-ranges):
//   quant_row, prep_row, quant_scaled  bit-exact (same operations in the same order)
//   gemm, integer part                 bit-exact: with d = 1 and power-of-two scales every float step
//                                      is exact, so out == the int64 reference == portable
//   gemm, fp32 output                  |out - ref| <= (nkb + 4) * 2^-23 * sum|terms| (ref in double;
//                                      FMA vs the portable multiply-add changes only roundings)
//   silu_mul                           <= 4 ulp of portable for |g| <= 80; beyond, <= 1e-30 * |u|
//                                      (both underflow; the kernels clamp exp like the x86 ones)
//   attention, router (+ sigmoid)      within rounding-error bounds of a double reference and of
//                                      portable (derived at test_attention_and_router); a (G, D)
//                                      without a NEON instance gets mm_attend_portable, bit-exact
// and nothing is written outside [16 t0, min(16 t1, n_valid)) of each output row.
// Usage: driver [--expect neon|dotprod|i8mm]  (the variant the runtime detection must pick as best).
// Prints a pytest-like closing line "N passed, M failed"; exit status 1 on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "arm_features.h"
#include "mm_common.h"

namespace {

int g_pass = 0, g_fail = 0;
int64_t g_worst_ulp = 0;    // silu_mul, |g| <= 80, over the variant
double g_worst_gemm = 0.;  // gemm fp32 error / tolerance, over the variant

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_pass;
  } else {
    ++g_fail;
    std::printf("FAILED %s\n", what.c_str());
  }
}

std::mt19937 rng(12345);
float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
int irand(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

uint32_t bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Distance in units in the last place (monotone integer order of the float bit patterns).
int64_t ulp_diff(float a, float b) {
  auto key = [](float f) {
    const int32_t i = (int32_t)bits(f);
    return i < 0 ? (int64_t)INT32_MIN - i : (int64_t)i;
  };
  const int64_t d = key(a) - key(b);
  return d < 0 ? -d : d;
}

uint16_t half_bits(int exp, int man) { return (uint16_t)((exp << 10) | man); }

// Activation rows with the hard cases: a zero block, rounding ties (x.5 with max|x| = 127 so the
// scale is exactly 1), a block whose max sits at the last lane, and wide dynamic range.
std::vector<float> make_x(int64_t K, int kind) {
  std::vector<float> x(K);
  for (int64_t i = 0; i < K; ++i) x[i] = uniform(-3.f, 3.f) * (kind == 1 ? 1e-20f : kind == 2 ? 1e20f : 1.f);
  const int64_t nkb = K / MM_QK;
  if (nkb > 1)
    for (int i = 0; i < MM_QK; ++i) x[MM_QK + i] = 0.f;
  for (int i = 0; i < MM_QK; ++i) x[i] = (i == 5) ? 127.f : (float)(i - 16) + 0.5f;
  if (nkb > 2) x[3 * MM_QK - 1] = -50.f;
  return x;
}

const int64_t KS[] = {32, 96, 32 * 17, 32 * 33};

void test_quant_row(const mm_kernels* v) {
  const mm_kernels* p = &mm_kernels_portable;
  for (int64_t K : KS)
    for (int kind = 0; kind < 3; ++kind) {
      const int64_t nkb = K / MM_QK;
      std::vector<float> x = make_x(K, kind), d0(nkb), d1(nkb);
      std::vector<int8_t> q0(K), q1(K);
      std::vector<int32_t> s0(nkb), s1(nkb);
      p->quant_row(x.data(), K, q0.data(), d0.data(), s0.data());
      v->quant_row(x.data(), K, q1.data(), d1.data(), s1.data());
      const bool ok = q0 == q1 && s0 == s1 && std::memcmp(d0.data(), d1.data(), 4 * nkb) == 0;
      check(ok, std::string(v->name) + " quant_row K=" + std::to_string(K) + " kind=" + std::to_string(kind));
    }
}

void test_prep_and_quant_scaled(const mm_kernels* v) {
  const mm_kernels* p = &mm_kernels_portable;
  for (int64_t K : KS) {
    const int64_t nkb = K / MM_QK;
    std::vector<float> x = make_x(K, 0), u0(K), u1(K), xd0(nkb), xd1(nkb);
    p->prep_row(x.data(), K, u0.data(), xd0.data());
    v->prep_row(x.data(), K, u1.data(), xd1.data());
    check(std::memcmp(u0.data(), u1.data(), 4 * K) == 0 && std::memcmp(xd0.data(), xd1.data(), 4 * nkb) == 0,
          std::string(v->name) + " prep_row K=" + std::to_string(K));
    // sn in [0, 1] as fp16, subnormals and exact 1.0 included (then |q| reaches 127: the clamp)
    std::vector<uint16_t> sn(K);
    for (int64_t i = 0; i < K; ++i) sn[i] = half_bits(irand(0, 14), irand(0, 1023));
    sn[5] = half_bits(15, 0);
    if (K > 64) sn[40] = half_bits(0, 1);
    for (int64_t i = 7; i < K; i += 29) sn[i] = half_bits(16, 0);  // 2.0: outside the contract, hits the clamp
    std::vector<int8_t> q0(K), q1(K);
    std::vector<int32_t> s0(nkb), s1(nkb);
    p->quant_scaled(u0.data(), sn.data(), K, q0.data(), s0.data());
    v->quant_scaled(u0.data(), sn.data(), K, q1.data(), s1.data());
    check(q0 == q1 && s0 == s1, std::string(v->name) + " quant_scaled K=" + std::to_string(K));
  }
}

// Decode attention and router (baseline NEON in every variant) against a double-precision reference
// and the portable kernels; u = 2^-24 (fp32 unit roundoff).
// Attention, out[r][d] = sum_j p_j v_jd: with A_j = sum_d |q_d k_jd|, every score either kernel
// computes is within delta_j = (D + 4) u scale A_j + 2 u |s_j| + u |s_j - max| of the exact one (fp32
// sums of D products in any order, the scale, the subtraction of the max), so each softmax weight is
// within a relative 2 Delta (Delta = max_j delta_j, to first order) of the exact weight; the exps
// (<= 4 ulp), the sum of S weights, the reciprocal and the fp32 sum of S weighted values add
// (2 S + 16) u. Hence, with M_d = sum_j p_j |v_jd|:
//   |out - ref| <= tol = 1.1 M_d (2 Delta + (2 S + 16) u) + 1e-36 S max|v|
// (the absolute term: the NEON exp clamps at -87.3, so a score more than 87 below the maximum weighs
// ~1e-38 instead of ~0), for NEON and portable alike, and |neon - portable| <= 2 tol.
// Router logits: NEON sums 4 lanes of H/4 FMAs, then the lanes pairwise, then the H % 4 tail, so
//   |logit - ref| <= tol_n = 1.01 (H/4 + 8) u sum_i |h_i W_ei|,  portable (serial): tol_p = (H + 2) u ...
// and sigmoid(logit) is within s_ref (tol_n + 8 u) * 1.01 + 1e-37 of sigmoid(ref) (|s'| <= s, exp
// <= 4 ulp, add and divide; the absolute term covers the exp clamp below a logit of -87.3).
// Shapes: S = 1 and S % 4 != 0, G in {1, 3, 6, 8}, all four instantiated D, E % 4 != 0, H % 4 == 0 and
// H % 16 != 0 (plus one H % 4 != 0), e-ranges not starting at 0, logits far into the sigmoid's
// saturation; nothing is written outside out[G*D], scores[G*S] or out[e0, e1). A (G, D) without an
// instance must get mm_attend_portable itself (bit-identical results).
double g_worst_attn = 0., g_worst_attn_u = 0., g_worst_router = 0., g_worst_sig = 0.;

uint16_t rand_half() {  // random sign, exponent 0 (zero / subnormal) .. 16 (up to ~4), random mantissa
  return (uint16_t)((irand(0, 1) << 15) | half_bits(irand(0, 16), irand(0, 1023)));
}

void test_attention_case(const mm_kernels* v, int64_t G, int64_t D, int64_t S, float amp) {
  const mm_kernels* p = &mm_kernels_portable;
  const double u = std::ldexp(1., -24);
  const float sentinel = -777.f;
  std::vector<float> q(G * D), sc0(G * S + 4, sentinel), sc1(G * S + 4, sentinel), o0(G * D + 4, sentinel),
      o1(G * D + 4, sentinel);
  std::vector<uint16_t> k(S * D), val(S * D);
  for (auto& x : q) x = uniform(-2.f, 2.f) * amp;
  for (int64_t i = 0; i < S * D; ++i) k[i] = rand_half(), val[i] = rand_half();
  char what[200];
  std::snprintf(what, sizeof what, "%s attention G=%lld D=%lld S=%lld amp=%g", v->name, (long long)G, (long long)D,
                (long long)S, amp);
  const mm_attend_fn fv = v->attend_for(G, D);
  check(fv != nullptr && fv != mm_attend_portable, std::string(what) + ": no NEON instance");
  if (!fv) return;
  p->attend_for(G, D)(q.data(), k.data(), val.data(), S, D, G, sc0.data(), o0.data());
  fv(q.data(), k.data(), val.data(), S, D, G, sc1.data(), o1.data());
  bool ok = bits(sc1[G * S]) == bits(sentinel) && bits(o1[G * D]) == bits(sentinel);
  double worst = 0., worst_u = 0., vmax = 0.;
  for (int64_t i = 0; i < S * D; ++i) vmax = std::max(vmax, (double)std::fabs(mm_half_to_float(val[i])));
  const double scale = 1. / std::sqrt((double)D);
  for (int64_t r = 0; r < G; ++r) {
    std::vector<double> s(S), a(S), w(S);
    double mx = -INFINITY;
    for (int64_t j = 0; j < S; ++j) {
      double acc = 0., mag = 0.;
      for (int64_t d = 0; d < D; ++d) {
        const double t = (double)q[r * D + d] * mm_half_to_float(k[j * D + d]);
        acc += t, mag += std::fabs(t);
      }
      s[j] = acc * scale, a[j] = mag * scale, mx = std::max(mx, s[j]);
    }
    double total = 0., delta = 0.;
    for (int64_t j = 0; j < S; ++j) {
      total += (w[j] = std::exp(s[j] - mx));
      delta = std::max(delta, (D + 4) * u * a[j] + 2 * u * std::fabs(s[j]) + u * (std::fabs(s[j] - mx) + 1.));
    }
    for (int64_t d = 0; d < D; ++d) {
      double ref = 0., m = 0.;
      for (int64_t j = 0; j < S; ++j) {
        const double vv = mm_half_to_float(val[j * D + d]);
        ref += w[j] / total * vv, m += w[j] / total * std::fabs(vv);
      }
      const double tol = 1.1 * m * (2 * delta + (2 * S + 16) * u) + 1e-36 * S * vmax;
      const double got = o1[r * D + d], port = o0[r * D + d];
      const double err = std::fabs(got - ref);
      ok = ok && std::isfinite(got) && err <= tol && std::fabs(port - ref) <= tol && std::fabs(got - port) <= 2 * tol;
      worst = std::max(worst, err / tol);
      if (m > 0.) worst_u = std::max(worst_u, std::fabs(got - port) / (m * u));
    }
  }
  g_worst_attn = std::max(g_worst_attn, worst);
  g_worst_attn_u = std::max(g_worst_attn_u, worst_u);
  std::snprintf(what + std::strlen(what), sizeof what - std::strlen(what), " err/tol=%.3g", worst);
  check(ok, what);
}

void test_attention_and_router(const mm_kernels* v) {
  const mm_kernels* p = &mm_kernels_portable;
  for (int64_t G : {1, 3, 6, 8})
    for (int64_t D : {16, 32, 48, 64})
      for (int64_t S : {1, 3, 7, 33, 130})
        for (float amp : {1.f, 12.f}) test_attention_case(v, G, D, S, amp);
  bool inst = true;  // every (G, D) the kernel table promises has a NEON instance
  for (int64_t G = 1; G <= 8; ++G)
    for (int64_t D : {16, 32, 48, 64}) inst = inst && v->attend_for(G, D) != mm_attend_portable;
  check(inst, std::string(v->name) + " attend_for has an instance for every G in 1..8, D in {16, 32, 48, 64}");
  // no instance: the portable function itself, bit-identical outputs and scores
  const int64_t none[][2] = {{3, 40}, {9, 64}, {2, 128}, {4, 8}, {1, 24}};
  for (const auto& gd : none) {
    const int64_t G = gd[0], D = gd[1], S = 9;
    std::vector<float> q(G * D), sc0(G * S), sc1(G * S), o0(G * D), o1(G * D);
    std::vector<uint16_t> k(S * D), val(S * D);
    for (auto& x : q) x = uniform(-2.f, 2.f);
    for (int64_t i = 0; i < S * D; ++i) k[i] = rand_half(), val[i] = rand_half();
    const mm_attend_fn fv = v->attend_for(G, D);
    const bool same = fv == mm_attend_portable;
    if (same) {
      p->attend_for(G, D)(q.data(), k.data(), val.data(), S, D, G, sc0.data(), o0.data());
      fv(q.data(), k.data(), val.data(), S, D, G, sc1.data(), o1.data());
    }
    check(same && std::memcmp(o0.data(), o1.data(), 4 * G * D) == 0 && std::memcmp(sc0.data(), sc1.data(), 4 * G * S) == 0,
          std::string(v->name) + " attention without instance G=" + std::to_string(G) + " D=" + std::to_string(D) +
              " is the portable kernel");
  }
  check(v->router_rows != mm_router_rows_portable, std::string(v->name) + " router_rows is the NEON kernel");
  const double u = std::ldexp(1., -24);
  const float sentinel = -555.f;
  for (int64_t E : {1, 3, 5, 7, 61})
    for (int64_t H : {4, 20, 37, 40, 52, 64})
      for (float amp : {1.f, 40.f})
        for (int sub = 0; sub < 2; ++sub) {
          const int64_t e0 = sub && E > 2 ? 1 : 0, e1 = sub && E > 2 ? E - 1 : E;
          if (sub && E <= 2) continue;
          std::vector<float> h(H), W(E * H);
          for (auto& x : h) x = uniform(-1.f, 1.f) * amp;
          for (auto& x : W) x = uniform(-1.f, 1.f);
          for (int sig = 0; sig < 2; ++sig) {
            std::vector<float> r0(E + 1, sentinel), r1(E + 1, sentinel);
            p->router_rows(h.data(), W.data(), H, e0, e1, sig, r0.data());
            v->router_rows(h.data(), W.data(), H, e0, e1, sig, r1.data());
            bool ok = true;
            double worst = 0.;
            for (int64_t e = 0; e <= E; ++e) {
              if (e < e0 || e >= e1) {
                ok = ok && bits(r1[e]) == bits(sentinel);
                continue;
              }
              double ref = 0., mag = 0.;
              for (int64_t i = 0; i < H; ++i) {
                const double t = (double)h[i] * W[e * H + i];
                ref += t, mag += std::fabs(t);
              }
              const double tol_n = 1.01 * (H / 4 + 8) * u * mag + 1e-38, tol_p = (H + 2) * u * mag + 1e-38;
              const double got = r1[e], port = r0[e];
              double err, tol, tol_port;
              if (!sig) {
                err = std::fabs(got - ref), tol = tol_n, tol_port = tol_p;
              } else {
                const double sref = 1. / (1. + std::exp(-ref));
                err = std::fabs(got - sref);
                tol = 1.01 * sref * (tol_n + 8 * u) + 1e-37;
                tol_port = 1.01 * sref * (tol_p + 8 * u) + 1e-37;
              }
              const double ref_used = sig ? 1. / (1. + std::exp(-ref)) : ref;
              ok = ok && std::isfinite(got) && err <= tol && std::fabs(port - ref_used) <= tol_port &&
                   std::fabs(got - port) <= tol + tol_port;
              worst = std::max(worst, err / tol);
            }
            (sig ? g_worst_sig : g_worst_router) = std::max(sig ? g_worst_sig : g_worst_router, worst);
            char what[160];
            std::snprintf(what, sizeof what, "%s router E=%lld H=%lld e=[%lld,%lld) amp=%g sigmoid=%d err/tol=%.3g",
                          v->name, (long long)E, (long long)H, (long long)e0, (long long)e1, amp, sig, worst);
            check(ok, what);
          }
        }
}

void test_silu_mul(const mm_kernels* v) {
  const mm_kernels* p = &mm_kernels_portable;
  for (int64_t n : {0, 1, 3, 4, 5, 17, 1003}) {
    for (int wide = 0; wide < 2; ++wide) {
      std::vector<float> g(n), u(n), o0(n + 1, 7.f), o1(n + 1, 7.f);  // o[n]: sentinel
      for (int64_t i = 0; i < n; ++i) {
        g[i] = wide ? uniform(-1e4f, 1e4f) : uniform(-80.f, 80.f);
        u[i] = uniform(-4.f, 4.f);
      }
      if (n > 2) g[0] = 0.f, g[1] = -0.f;
      p->silu_mul(g.data(), u.data(), o0.data(), n);
      v->silu_mul(g.data(), u.data(), o1.data(), n);
      int64_t worst = 0;
      bool ok = o1[n] == 7.f;
      for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(o1[i])) ok = false;
        if (std::fabs(g[i]) <= 80.f)
          worst = std::max(worst, ulp_diff(o0[i], o1[i]));
        else if (std::fabs(o0[i] - o1[i]) > 1e-30f * std::fabs(u[i]))
          ok = false;
      }
      g_worst_ulp = std::max(g_worst_ulp, worst);
      check(ok && worst <= 4, std::string(v->name) + " silu_mul n=" + std::to_string(n) + " wide=" +
                                  std::to_string(wide) + " worst_ulp=" + std::to_string(worst));
    }
  }
}

// A packed mobilemoe-q4t16 weight (see mm_common.h) with its codes (-8..7) and fp16 row scales.
struct Packed {
  int64_t N, nkb, tile_stride;
  std::vector<int> codes;       // [N][K]
  std::vector<uint16_t> scale;  // [N][nkb]
  std::vector<uint8_t> bytes;
};

Packed pack(int64_t N, int64_t nkb, bool pow2_scales, int code_mode) {
  Packed w{N, nkb, 0, {}, {}, {}};
  const int64_t K = nkb * MM_QK, ntiles = (N + MM_TILE - 1) / MM_TILE;
  w.codes.resize(N * K);
  w.scale.resize(N * nkb);
  for (auto& c : w.codes) c = code_mode == 0 ? irand(-8, 7) : code_mode == 1 ? 7 : -8;
  for (auto& s : w.scale) s = pow2_scales ? half_bits(irand(13, 17), 0) : half_bits(irand(10, 16), irand(0, 1023));
  w.tile_stride = (nkb * (MM_BLOCK_BYTES + 2 * MM_TILE) + 63) / 64 * 64;
  w.bytes.assign(ntiles * w.tile_stride, 0x88);  // padding rows: code 0
  for (int64_t t = 0; t < ntiles; ++t) {
    uint8_t* wt = w.bytes.data() + t * w.tile_stride;
    uint16_t* ws = (uint16_t*)(wt + nkb * MM_BLOCK_BYTES);
    for (int64_t b = 0; b < nkb; ++b)
      for (int r = 0; r < MM_TILE; ++r) {
        const int64_t n = t * MM_TILE + r;
        ws[b * MM_TILE + r] = n < N ? w.scale[n * nkb + b] : 0;
        if (n >= N) continue;
        for (int c = 0; c < 4; ++c)
          for (int kk = 0; kk < 4; ++kk) {
            const int lo = w.codes[n * K + 32 * b + 8 * c + kk] + 8;
            const int hi = w.codes[n * K + 32 * b + 8 * c + 4 + kk] + 8;
            wt[b * MM_BLOCK_BYTES + c * 64 + r * 4 + kk] = (uint8_t)(lo | (hi << 4));
          }
      }
  }
  return w;
}

struct Acts {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s;
};

// exact: random int8 q with d = 1 (every float step of the GEMM is then exact); else quant_row of x.
Acts make_acts(int64_t m, int64_t nkb, int mode) {
  const int64_t K = nkb * MM_QK;
  Acts a{std::vector<int8_t>(m * K), std::vector<float>(m * nkb), std::vector<int32_t>(m * nkb)};
  for (int64_t j = 0; j < m; ++j) {
    if (mode == 2) {
      std::vector<float> x(K);
      for (auto& e : x) e = uniform(-2.f, 2.f);
      mm_kernels_portable.quant_row(x.data(), K, &a.q[j * K], &a.d[j * nkb], &a.s[j * nkb]);
      continue;
    }
    for (int64_t b = 0; b < nkb; ++b) {
      int32_t sum = 0;
      for (int i = 0; i < MM_QK; ++i) {
        const int v = mode == 1 ? (j % 2 ? -127 : 127) : irand(-127, 127);  // mode 1: extreme magnitudes
        a.q[j * K + b * MM_QK + i] = (int8_t)v;
        sum += v;
      }
      a.d[j * nkb + b] = 1.f;
      a.s[j * nkb + b] = 8 * sum;
    }
  }
  return a;
}

void test_gemm_case(const mm_kernels* v, int64_t N, int64_t nkb, int64_t m, int wscaled, int mode, int64_t t0,
                    int64_t t1, int64_t n_valid) {
  const bool exact = mode != 2;
  Packed w = pack(N, nkb, exact, mode == 1 ? irand(1, 2) : 0);
  Acts a = make_acts(m, nkb, mode);
  const int64_t K = nkb * MM_QK, ldo = N + 3;
  const float sentinel = -12345.f;
  const int64_t pad = 2 * MM_TILE;  // past the last row: a store there would be a bug too
  std::vector<float> o0(m * ldo + pad, sentinel), o1(m * ldo + pad, sentinel);
  mm_kernels_portable.gemm(w.bytes.data(), w.tile_stride, nkb, wscaled, t0, t1, a.q.data(), a.d.data(), a.s.data(),
                           m, o0.data(), ldo, n_valid);
  v->gemm(w.bytes.data(), w.tile_stride, nkb, wscaled, t0, t1, a.q.data(), a.d.data(), a.s.data(), m, o1.data(),
          ldo, n_valid);
  bool ok = true;
  double worst = 0.;
  for (int64_t j = 0; j < m; ++j)
    for (int64_t c = 0; c < ldo; ++c) {
      const float got = o1[j * ldo + c];
      const bool written = c >= t0 * MM_TILE && c < t1 * MM_TILE && c < n_valid && c < N;
      if (!written) {
        ok = ok && bits(got) == bits(sentinel);
        continue;
      }
      double ref = 0., mag = 0.;
      for (int64_t b = 0; b < nkb; ++b) {
        int64_t isum = 0;
        for (int i = 0; i < MM_QK; ++i) isum += (int64_t)w.codes[c * K + b * MM_QK + i] * a.q[j * K + b * MM_QK + i];
        const double sc = wscaled ? (double)mm_half_to_float(w.scale[c * nkb + b]) : 1.;
        const double term = (double)isum * (double)(float)(sc * a.d[j * nkb + b]);
        ref += term;
        mag += std::fabs(term);
      }
      if (exact) {
        ok = ok && (double)got == ref && bits(got) == bits(o0[j * ldo + c]);
      } else {
        const double tol = (nkb + 4) * std::ldexp(1., -23) * mag + 1e-30;
        const double err = std::fabs(got - ref);
        ok = ok && err <= tol && std::fabs(o0[j * ldo + c] - ref) <= tol;
        worst = std::max(worst, err / tol);
      }
    }
  for (int64_t i = m * ldo; i < m * ldo + pad; ++i) ok = ok && bits(o1[i]) == bits(sentinel);
  g_worst_gemm = std::max(g_worst_gemm, worst);
  char what[200];
  std::snprintf(what, sizeof what, "%s gemm N=%lld nkb=%lld m=%lld wscaled=%d mode=%d t=[%lld,%lld) n_valid=%lld err/tol=%.3f",
                v->name, (long long)N, (long long)nkb, (long long)m, wscaled, mode, (long long)t0, (long long)t1,
                (long long)n_valid, worst);
  check(ok, what);
}

void test_gemm(const mm_kernels* v) {
  for (int64_t N : {16, 37, 100})
    for (int64_t nkb : {1, 3, 9})
      for (int64_t m : {1, 2, 3, 5, 8, 13})
        for (int mode = 0; mode < 3; ++mode)
          for (int wscaled = 0; wscaled < 2; ++wscaled) {
            const int64_t ntiles = (N + MM_TILE - 1) / MM_TILE;
            test_gemm_case(v, N, nkb, m, wscaled, mode, 0, ntiles, N);
            if (ntiles > 2 && mode == 2)  // a sub-range of tiles, and n_valid cutting the middle tile
              test_gemm_case(v, N, nkb, m, wscaled, mode, 1, ntiles, 2 * MM_TILE + 5);
          }
}

}  // namespace

int main(int argc, char** argv) {
  std::string expect;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--expect") expect = argv[i + 1];
  const bool dp = mm_arm_dotprod_supported(), mm = mm_arm_i8mm_supported();
  const char* best = mm_arm_best_kernels()->name;
  std::printf("cpu features: dotprod=%d i8mm=%d -> best %s\n", dp, mm, best);
  if (!expect.empty()) check(expect == best, "runtime detection picked " + std::string(best) + ", expected " + expect);
  check(std::string(mm_kernels_neon.name) == "neon" && std::string(mm_kernels_dotprod.name) == "dotprod" &&
            std::string(mm_kernels_i8mm.name) == "i8mm" && std::string(mm_kernels_neon.vector_isa) == "neon" &&
            std::string(mm_kernels_dotprod.vector_isa) == "neon" && std::string(mm_kernels_i8mm.vector_isa) == "neon",
        "table names");
  const struct {
    const mm_kernels* k;
    bool supported;
  } variants[] = {{&mm_kernels_neon, mm_arm_neon_supported()}, {&mm_kernels_dotprod, dp}, {&mm_kernels_i8mm, mm}};
  for (const auto& var : variants) {
    if (!var.supported) {
      std::printf("skipped %s: not supported by this CPU\n", var.k->name);
      continue;
    }
    const int before = g_fail;
    g_worst_ulp = 0, g_worst_gemm = 0.;
    g_worst_attn = g_worst_attn_u = g_worst_router = g_worst_sig = 0.;
    test_quant_row(var.k);
    test_prep_and_quant_scaled(var.k);
    test_silu_mul(var.k);
    test_attention_and_router(var.k);
    test_gemm(var.k);
    std::printf("variant %s: %s (silu_mul worst %lld ulp, gemm worst error %.3f of tolerance)\n", var.k->name,
                g_fail == before ? "ok" : "FAILED", (long long)g_worst_ulp, g_worst_gemm);
    std::printf("variant %s: attention worst error %.3g of tolerance (|neon - portable| <= %.3g u M_d), router "
                "logits %.3g, sigmoid %.3g of tolerance\n",
                var.k->name, g_worst_attn, g_worst_attn_u, g_worst_router, g_worst_sig);
  }
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
