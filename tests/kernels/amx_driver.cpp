// Torch-free driver for the AMX gemm (isa_amx.cpp), built by tests/kernels/test_amx.py with
//   g++ amx_driver.cpp isa_amx.o isa_avx512.o isa_portable.o -lpthread
// (each unit with its own setup.py flags). Modes:
//   check  random packed weights / activations on odd shapes: AMX, AVX-512 VNNI and portable vs a
//          double-precision reference within their derived bounds (see amx_bound / int_bound
//          below: AMX rounds its operands to bf16, so it is no longer bit-identical to VNNI), AMX
//          vs VNNI within the sum of both bounds, untouched output padding, and a fresh thread
//          (one that never loaded a tile configuration) getting the bit-identical AMX result.
//   bench  gemm throughput AMX vs VNNI on prefill shapes, one thread, calls chunked as op_linear.cpp does.
//   bench  also one routed expert stage (MoE-S shapes, all 24 output groups) on the bf16 path vs the
//          int8 VNNI path, activation preparation included.
//   sweep  AMX vs VNNI on one expert group (2 tiles, K=768) for small token counts: the crossover;
//          and the expert stage's bf16 vs int8 crossover (prefill_min_m).
//   tiles  AMX's linear gemm at 4 output tiles per call vs its gemm_tile_block.
// Exit status: 0 ok, 1 mismatch, 77 AMX not usable here (the first line says why).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "amx.h"

namespace {

struct Packed {
  int64_t ntiles, nkb, stride;
  std::vector<uint8_t> raw;  // tiles start at raw + off, 64-byte aligned
  size_t off = 0;
  const uint8_t* data() const { return raw.data() + off; }
};

// Random codes and random exact fp16 scales (normal values (1 + f) * 2^e, e in [-10, -4]).
Packed make_packed(std::mt19937& rng, int64_t ntiles, int64_t nkb, int64_t pad) {
  Packed p;
  p.ntiles = ntiles, p.nkb = nkb;
  p.stride = (nkb * (MM_BLOCK_BYTES + 2 * MM_TILE) + 63) / 64 * 64 + pad * 64;
  p.raw.resize(ntiles * p.stride + 64);
  p.off = (64 - ((uintptr_t)p.raw.data() & 63)) & 63;
  uint8_t* base = p.raw.data() + p.off;
  std::uniform_int_distribution<int> byte(0, 255), mant(0, 1023), ex(5, 11);
  for (int64_t t = 0; t < ntiles; ++t) {
    uint8_t* wt = base + t * p.stride;
    for (int64_t i = 0; i < nkb * MM_BLOCK_BYTES; ++i) wt[i] = (uint8_t)byte(rng);
    uint16_t* ws = (uint16_t*)(wt + nkb * MM_BLOCK_BYTES);
    for (int64_t i = 0; i < nkb * MM_TILE; ++i) ws[i] = (uint16_t)((ex(rng) << 10) | mant(rng));
  }
  return p;
}

// Signed code of (row r of tile t, k) from the documented layout (independent of the kernels).
int code(const Packed& p, int64_t t, int r, int64_t k) {
  const int64_t b = k / 32, kk = k % 32, c = kk / 8, hi = (kk % 8) / 4;
  const uint8_t byte = p.data()[t * p.stride + b * MM_BLOCK_BYTES + c * 64 + r * 4 + kk % 4];
  return (hi ? byte >> 4 : byte & 15) - 8;
}

struct Act {
  int64_t m, nkb;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s;
};

Act make_act(std::mt19937& rng, int64_t m, int64_t nkb) {
  Act a{m, nkb, std::vector<int8_t>(m * nkb * 32), std::vector<float>(m * nkb), std::vector<int32_t>(m * nkb)};
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(nkb * 32);
  for (int64_t j = 0; j < m; ++j) {
    for (auto& v : x) v = nd(rng);
    mm_kernels_portable.quant_row(x.data(), nkb * 32, a.q.data() + j * nkb * 32, a.d.data() + j * nkb,
                                  a.s.data() + j * nkb);
  }
  return a;
}

constexpr float SENTINEL = 12345.f;

std::vector<float> run(const mm_kernels& k, const Packed& p, int ws, int64_t t0, int64_t t1, const Act& a,
                       int64_t ldo, int64_t n_valid) {
  std::vector<float> out(a.m * ldo, SENTINEL);
  k.gemm(p.data(), p.stride, p.nkb, ws, t0, t1, a.q.data(), a.d.data(), a.s.data(), a.m, out.data(), ldo, n_valid);
  return out;
}

struct Case {
  int64_t m, ntiles, nkb, t0, t1, n_valid;
  int ws;
};

// Bounds on |out - exact|, relative to a magnitude of the exact terms.
// Integer gemms (VNNI, portable), relative to the sum over blocks of |scaled block sum|: exact int32
// block sums; per block one rounded fp32 scale product and one rounded (fused or not)
// accumulation: (nkb + 2) * 1.2e-7 (1.2e-7 > 2^-23 covers a rounding of each and their products).
double int_bound(int64_t nkb) { return (nkb + 2) * 1.2e-7; }
// AMX-BF16, relative to the sum over k of |q d code w_scale| (each term rounds on its own):
// bf16 keeps 8 significant bits: rounding (RNE) is off by <= 2^-8 relative. A = bf16(fl32(q * d)):
// <= 2^-8 + 2^-23 (the fp32 rounding of q * d, 2^-24, and its product with 2^-8); B =
// bf16((code - 8) * w_scale) (the fp32 product is exact: 4 x 11 bits): <= 2^-8 (expert B, code - 8,
// is exact). Each product A * B is exact in fp32 (8 x 8 bits) and off by <= (1 + 2^-8 + 2^-23)
// (1 + 2^-8) - 1 < 2^-7 + 2^-15 relative; the fp32 accumulation of the K products (plus the exact
// store/reload of C between K chunks) adds at most K + 1 roundings of 2^-24 of a partial sum
// <= (1 + 2^-6) * mag. So |out - exact| <= (2^-7 + 2^-15 + (K + 1) * 2^-24 * (1 + 2^-6)) * mag.
double amx_bound(int64_t nkb) {
  const double K = 32.0 * nkb;
  return std::ldexp(1.0, -7) + std::ldexp(1.0, -15) + (K + 1) * std::ldexp(1.0, -24) * (1 + std::ldexp(1.0, -6));
}
double g_worst = 0;  // the largest |amx - exact| / mag seen (printed: how close to the bound)
double g_worst_expert = 0;

// Returns the number of failures (printed).
int check_case(std::mt19937& rng, const Case& c) {
  const Packed p = make_packed(rng, c.ntiles, c.nkb, c.ntiles % 2);
  const Act a = make_act(rng, c.m, c.nkb);
  const int64_t ldo = c.ntiles * 16 + 3;
  const auto amx = run(mm_kernels_amx, p, c.ws, c.t0, c.t1, a, ldo, c.n_valid);
  const auto vnni = run(mm_kernels_avx512, p, c.ws, c.t0, c.t1, a, ldo, c.n_valid);
  const auto port = run(mm_kernels_portable, p, c.ws, c.t0, c.t1, a, ldo, c.n_valid);
  std::vector<float> fresh;
  std::thread th([&] { fresh = run(mm_kernels_amx, p, c.ws, c.t0, c.t1, a, ldo, c.n_valid); });
  th.join();
  int bad = 0;
  auto fail = [&](const char* what, int64_t j, int64_t n, double got, double want) {
    if (bad++ < 3)
      std::printf("FAIL m=%ld tiles=%ld nkb=%ld t=[%ld,%ld) n_valid=%ld ws=%d: %s at (%ld,%ld): %.9g vs %.9g\n",
                  (long)c.m, (long)c.ntiles, (long)c.nkb, (long)c.t0, (long)c.t1, (long)c.n_valid, c.ws, what,
                  (long)j, (long)n, got, want);
  };
  for (int64_t j = 0; j < c.m; ++j)
    for (int64_t n = 0; n < ldo; ++n) {
      const size_t i = j * ldo + n;
      const bool written = n >= c.t0 * 16 && n < c.t1 * 16 && n < c.n_valid;
      if (!written) {
        if (amx[i] != SENTINEL) fail("wrote outside its columns", j, n, amx[i], SENTINEL);
        continue;
      }
      if (std::memcmp(&amx[i], &fresh[i], 4) != 0) fail("fresh thread != amx", j, n, fresh[i], amx[i]);
      const int64_t t = n / 16;
      const int r = (int)(n % 16);
      const uint16_t* wsc = (const uint16_t*)(p.data() + t * p.stride + p.nkb * MM_BLOCK_BYTES);
      double ref = 0, mag = 0, mag_terms = 0;  // sum |block sums|, sum |terms| (both scaled)
      for (int64_t b = 0; b < c.nkb; ++b) {
        int64_t isum = 0, iabs = 0;
        for (int64_t k = b * 32; k < b * 32 + 32; ++k) {
          const int64_t v = (int64_t)code(p, t, r, k) * a.q[j * c.nkb * 32 + k];
          isum += v;
          iabs += v < 0 ? -v : v;
        }
        const double sc = (double)a.d[j * c.nkb + b] * (c.ws ? mm_half_to_float(wsc[b * 16 + r]) : 1.0);
        ref += isum * sc;
        mag += std::fabs(isum * sc);
        mag_terms += iabs * std::fabs(sc);
      }
      const double ti = int_bound(c.nkb) * mag + 1e-30, ta = amx_bound(c.nkb) * mag_terms + 1e-30;
      if (std::fabs(amx[i] - ref) > ta) fail("amx vs double reference", j, n, amx[i], ref);
      if (std::fabs(vnni[i] - ref) > ti) fail("avx512 vs double reference", j, n, vnni[i], ref);
      if (std::fabs(port[i] - ref) > ti) fail("portable vs double reference", j, n, port[i], ref);
      if (std::fabs(amx[i] - vnni[i]) > ta + ti) fail("amx vs avx512", j, n, amx[i], vnni[i]);
      if (mag_terms > 0) g_worst = std::max(g_worst, std::fabs(amx[i] - ref) / mag_terms);
    }
  return bad;
}

int check() {
  std::mt19937 rng(1234);
  std::vector<Case> cases;
  for (int64_t m : {1, 16, 20, 33, 100})
    for (int64_t ntiles = 1; ntiles <= 5; ++ntiles)
      for (int64_t nkb : {1, 2, 3, 5, 7})
        for (int ws : {0, 1}) {
          const int64_t t0 = ntiles > 2 ? 1 : 0;
          const int64_t n_valid = (m + ntiles + nkb) % 3 == 0 ? ntiles * 16 : ntiles * 16 - 1 - (m + nkb) % 15;
          cases.push_back({m, ntiles, nkb, t0, ntiles, n_valid, ws});
        }
  // K chunking (> 32 blocks continues partial sums in out) and token groups (> 128 tokens).
  for (int ws : {0, 1}) {
    cases.push_back({40, 2, 33, 0, 2, 32, ws});
    cases.push_back({130, 3, 70, 0, 3, 41, ws});
    cases.push_back({300, 2, 24, 0, 2, 32, ws});
    cases.push_back({30, 3, 5, 0, 3, 40, ws});  // a 14-row tail on AMX tiles (>= MM_AMX_TAIL_MIN)
    cases.push_back({45, 1, 35, 0, 1, 16, ws});  // a 13-row tail over two K chunks
    cases.push_back({25, 4, 17, 0, 4, 57, ws});  // a 9-row tail, two tile pairs, two K chunks
    cases.push_back({136, 3, 9, 1, 3, 48, ws});  // a second token group of 8 rows (>= MM_AMX_TAIL_MIN)
    cases.push_back({64, 2, 48, 0, 2, 20, ws});  // the second tile of the pair only 4 columns wide
  }
  int bad = 0;
  for (const Case& c : cases) bad += check_case(rng, c);
  std::printf("%s: %zu cases, %d mismatches (amx: worst |err| / sum|terms| = %.3g, bound >= %.3g)\n",
              bad ? "FAIL" : "OK", cases.size(), bad, g_worst, amx_bound(1));
  return bad ? 1 : 0;
}

// The bf16 expert entry (expert_gemm_bf16): random expert tiles (no row scales), a random scale row
// [sn | smax] and random bf16 rows (row pitch lda >= K), against a double reference of the exact
// terms a * (code - 8) * sn * smax. A is given in bf16 (exact), B = bf16(fl32((code - 8) *
// fl32(sn * smax))) with sn * smax exact (11 x 11 bits): <= 2^-8 + 2^-23 relative per term (the
// fp32 rounding of the 26-bit product, then bf16), plus the fp32 accumulation as in amx_bound:
// (2^-8 + 2^-22 + (K + 1) * 2^-24 * (1 + 2^-7)) * sum|terms|.
double expert_bound(int64_t nkb) {
  const double K = 32.0 * nkb;
  return std::ldexp(1.0, -8) + std::ldexp(1.0, -22) + (K + 1) * std::ldexp(1.0, -24) * (1 + std::ldexp(1.0, -7));
}

uint16_t to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
double from_bf16(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

int check_expert_case(std::mt19937& rng, int64_t m, int64_t ntiles, int64_t nkb, int64_t t0, int64_t n_valid,
                      int64_t lda_pad) {
  Packed p = make_packed(rng, ntiles, nkb, 0);
  const int64_t K = nkb * 32, lda = K + lda_pad, ldo = ntiles * 16 + 5;
  std::uniform_int_distribution<int> mant(0, 1023), ex(10, 15);
  std::vector<uint16_t> srow(K + nkb);
  for (auto& v : srow) v = (uint16_t)((ex(rng) << 10) | mant(rng));  // sn in [2^-5, 2), smax in [2^-5, 2)
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> a(m * lda);
  for (auto& v : a) v = to_bf16(nd(rng));
  auto go = [&] {
    std::vector<float> out(m * ldo, SENTINEL);
    mm_kernels_amx.expert_gemm_bf16(p.data(), p.stride, nkb, srow.data(), t0, ntiles, a.data(), lda, m, out.data(),
                                    ldo, n_valid);
    return out;
  };
  const auto got = go();
  std::vector<float> fresh;
  std::thread th([&] { fresh = go(); });
  th.join();
  int bad = 0;
  for (int64_t j = 0; j < m; ++j)
    for (int64_t n = 0; n < ldo; ++n) {
      const size_t i = j * ldo + n;
      const bool written = n >= t0 * 16 && n < ntiles * 16 && n < n_valid;
      bool ok = written || got[i] == SENTINEL;
      if (written) {
        double ref = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double t = from_bf16(a[j * lda + k]) * code(p, n / 16, (int)(n % 16), k) *
                           mm_half_to_float(srow[k]) * mm_half_to_float(srow[K + k / 32]);
          ref += t;
          mag += std::fabs(t);
        }
        ok = std::fabs(got[i] - ref) <= expert_bound(nkb) * mag + 1e-30 && std::memcmp(&got[i], &fresh[i], 4) == 0;
        if (mag > 0) g_worst_expert = std::max(g_worst_expert, std::fabs(got[i] - ref) / mag);
      }
      if (!ok && bad++ < 3)
        std::printf("FAIL expert m=%ld tiles=%ld nkb=%ld t0=%ld n_valid=%ld lda=%ld at (%ld,%ld): %.9g\n", (long)m,
                    (long)ntiles, (long)nkb, (long)t0, (long)n_valid, (long)lda, (long)j, (long)n, got[i]);
    }
  return bad;
}

int check_experts() {
  std::mt19937 rng(4321);
  int bad = 0, n = 0;
  for (int64_t m : {5, 12, 16, 17, 31, 32, 67, 128, 130})
    for (int64_t nkb : {1, 3, 12, 24, 40}) {
      bad += check_expert_case(rng, m, 2, nkb, 0, 32, 0);
      bad += check_expert_case(rng, m, 4, nkb, 2, 64 - (m + nkb) % 9, m % 2 ? 32 : 0);
      n += 2;
    }
  std::printf("%s: %d expert cases, %d mismatches (worst |err| / sum|terms| = %.3g, bound >= %.3g)\n",
              bad ? "FAIL" : "OK", n, bad, g_worst_expert, expert_bound(1));
  return bad;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// One linear forward as op_linear.cpp issues it on one thread: jobs of 128 tokens x the table's
// gemm_tile_block tiles (from its prefill_min_m tokens on; else 4), or `tb` tiles if given.
void linear_calls(const mm_kernels& k, const Packed& p, const Act& a, float* out, int64_t N, int ws, int64_t tb = 0) {
  const int64_t K = p.nkb * 32;
  if (tb <= 0) tb = k.gemm_tile_block > 4 && a.m >= k.prefill_min_m ? k.gemm_tile_block : 4;
  for (int64_t m0 = 0; m0 < a.m; m0 += 128)
    for (int64_t t0 = 0; t0 < p.ntiles; t0 += tb) {
      const int64_t m1 = std::min<int64_t>(a.m, m0 + 128), t1 = std::min<int64_t>(p.ntiles, t0 + tb);
      k.gemm(p.data(), p.stride, p.nkb, ws, t0, t1, a.q.data() + m0 * K, a.d.data() + m0 * p.nkb,
             a.s.data() + m0 * p.nkb, m1 - m0, out + m0 * N, N, N);
    }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median and best seconds of `reps` alternating runs of f(amx) / f(avx512) (the best is the
// steadier figure on a loaded machine).
struct Timing {
  double amx_med, vnni_med, amx_min, vnni_min;
};

template <typename F>
Timing alternate(int reps, const F& f) {
  std::vector<double> ta, tv;
  for (int i = 0; i < reps; ++i) {
    double t = now();
    f(mm_kernels_amx);
    ta.push_back(now() - t);
    t = now();
    f(mm_kernels_avx512);
    tv.push_back(now() - t);
  }
  return {median(ta), median(tv), *std::min_element(ta.begin(), ta.end()), *std::min_element(tv.begin(), tv.end())};
}

// Random expert scale rows [G][K + K/32] (sn in (0, 1], smax), as pack_experts stores them.
std::vector<uint16_t> make_scale_rows(std::mt19937& rng, int64_t G, int64_t K) {
  std::uniform_int_distribution<int> mant(0, 1023), ex(10, 14);
  std::vector<uint16_t> v(G * (K + K / 32));
  for (auto& h : v) h = (uint16_t)((ex(rng) << 10) | mant(rng));
  return v;
}

// One routed expert's stage as op_moe.cpp runs it on one thread for m rows (K in, G = N / 32
// output groups). int8 path (table k): prep_row per row, then per group quant_scaled per row and
// the gemm. bf16 path: rows_to_bf16 per row, then per group expert_gemm_bf16.
struct ExpertStage {
  int64_t m, K, G;
  Packed p;
  std::vector<uint16_t> srow;
  std::vector<float> x, u, xd, d, smax, out;
  std::vector<int8_t> q;
  std::vector<int32_t> s;
  std::vector<uint16_t> xb;
  ExpertStage(std::mt19937& rng, int64_t m_, int64_t K_, int64_t N)
      : m(m_), K(K_), G(N / 32), p(make_packed(rng, N / 16, K_ / 32, 0)), srow(make_scale_rows(rng, N / 32, K_)),
        x(m_ * K_), u(m_ * K_), xd(m_ * K_ / 32), d(m_ * K_ / 32), smax(K_ / 32), out(m_ * N), q(m_ * K_),
        s(m_ * K_ / 32), xb(m_ * K_) {
    p.stride = (K / 32) * MM_BLOCK_BYTES;  // expert tiles carry no row scales
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& v : x) v = nd(rng);
  }
  void run_int8(const mm_kernels& k) {
    const int64_t nkb = K / 32, N = G * 32;
    for (int64_t r = 0; r < m; ++r) k.prep_row(x.data() + r * K, K, u.data() + r * K, xd.data() + r * nkb);
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* sn = srow.data() + g * (K + nkb);
      for (int64_t b = 0; b < nkb; ++b) smax[b] = mm_half_to_float(sn[K + b]);
      for (int64_t r = 0; r < m; ++r) {
        k.quant_scaled(u.data() + r * K, sn, K, q.data() + r * K, s.data() + r * nkb);
        for (int64_t b = 0; b < nkb; ++b) d[r * nkb + b] = xd[r * nkb + b] * smax[b];
      }
      k.gemm(p.data(), p.stride, nkb, 0, 2 * g, 2 * g + 2, q.data(), d.data(), s.data(), m, out.data(), N, N);
    }
  }
  void run_bf16(const mm_kernels& k) {
    const int64_t nkb = K / 32, N = G * 32;
    for (int64_t r = 0; r < m; ++r) k.rows_to_bf16(x.data() + r * K, K, xb.data() + r * K);
    for (int64_t g = 0; g < G; ++g)
      k.expert_gemm_bf16(p.data(), p.stride, nkb, srow.data() + g * (K + nkb), 2 * g, 2 * g + 2, xb.data(), K, m,
                         out.data(), N, N);
  }
};

int bench() {
  std::mt19937 rng(7);
  std::printf("one thread, MoE-S routed expert stage (m rows, all %d groups)   us: amx-bf16 vnni-int8 (median)  (best)  speedup med/best\n", 24);
  for (int64_t m : {16, 32, 68, 128})
    for (int64_t K : {768, 384}) {
      ExpertStage st(rng, m, K, 768);
      std::vector<double> ta, tv;
      for (int i = 0; i < 41; ++i) {
        double t = now();
        st.run_bf16(mm_kernels_amx);
        ta.push_back(now() - t);
        t = now();
        st.run_int8(mm_kernels_avx512);
        tv.push_back(now() - t);
      }
      const double am = median(ta), vm = median(tv), ab = *std::min_element(ta.begin(), ta.end()),
                   vb = *std::min_element(tv.begin(), tv.end());
      std::printf("m=%-4ld K=%-4ld N=768 %44.1f %7.1f %9.1f %7.1f %8.2fx %5.2fx\n", (long)m, (long)K, am * 1e6, vm * 1e6,
                  ab * 1e6, vb * 1e6, vm / am, vb / ab);
    }
  std::printf("one thread, linear (wscaled), op_linear chunking   GMAC/s: amx vnni (median)  amx vnni (best)  speedup med/best\n");
  for (int64_t m : {256, 1024})
    for (int64_t N : {1536, 2048}) {
      const int64_t K = 768;
      const Packed p = make_packed(rng, N / 16, K / 32, 0);
      const Act a = make_act(rng, m, K / 32);
      std::vector<float> out(m * N);
      const Timing t = alternate(m >= 1024 ? 15 : 41, [&](const mm_kernels& k) { linear_calls(k, p, a, out.data(), N, 1); });
      const double g = (double)m * N * K * 1e-9;
      std::printf("m=%-5ld K=%ld N=%-5ld %28.0f %5.0f %12.0f %5.0f %10.2fx %5.2fx\n", (long)m, (long)K, (long)N,
                  g / t.amx_med, g / t.vnni_med, g / t.amx_min, g / t.vnni_min, t.vnni_med / t.amx_med,
                  t.vnni_min / t.amx_min);
    }
  return 0;
}

// AMX's linear gemm at 4 vs its own tile block per call (the activation conversion per call).
int tiles() {
  std::mt19937 rng(8);
  for (int64_t N : {768, 2048}) {
    const int64_t K = 768, m = 512;
    const Packed p = make_packed(rng, N / 16, K / 32, 0);
    const Act a = make_act(rng, m, K / 32);
    std::vector<float> out(m * N);
    std::vector<double> t4, tw;
    for (int i = 0; i < 31; ++i) {
      double t = now();
      linear_calls(mm_kernels_amx, p, a, out.data(), N, 1, 4);
      t4.push_back(now() - t);
      t = now();
      linear_calls(mm_kernels_amx, p, a, out.data(), N, 1, 0);
      tw.push_back(now() - t);
    }
    std::printf("m=%ld K=%ld N=%ld amx: 4 tiles/call %.0f us, %ld tiles/call %.0f us (median), %.2fx\n", (long)m,
                (long)K, (long)N, median(t4) * 1e6, (long)mm_kernels_amx.gemm_tile_block, median(tw) * 1e6,
                median(t4) / median(tw));
  }
  return 0;
}

int sweep() {
  std::mt19937 rng(9);
  const int64_t K = 768;
  const Packed p = make_packed(rng, 2, K / 32, 0);
  // AMX vs VNNI gemm on `tiles` output tiles of one packed weight for each token count in `ms`.
  auto crossover = [&](const char* what, int64_t tiles, int wscaled, std::initializer_list<int64_t> ms, int best_of,
                       int calls) {
    const Packed pk = make_packed(rng, tiles, K / 32, 0);
    std::printf("%s, best of %d:   m  amx us  vnni us  speedup\n", what, best_of);
    for (int64_t m : ms) {
      const Act a = make_act(rng, m, K / 32);
      const int64_t n = tiles * 16;
      std::vector<float> out(m * n);
      const Timing t = alternate(best_of, [&](const mm_kernels& k) {
        for (int i = 0; i < calls; ++i)
          k.gemm(pk.data(), pk.stride, pk.nkb, wscaled, 0, tiles, a.q.data(), a.d.data(), a.s.data(), m, out.data(),
                 n, n);
      });
      std::printf("%8ld %7.2f %8.2f %7.2fx\n", (long)m, t.amx_min / calls * 1e6, t.vnni_min / calls * 1e6,
                  t.vnni_min / t.amx_min);
    }
  };
  crossover("expert group (2 tiles, K=768, wscaled=0)", 2, 0, {4, 8, 12, 15, 16, 17, 20, 24, 32, 48, 64, 128}, 301, 20);
  crossover("linear call (16 tiles, K=768, wscaled=1)", 16, 1, {4, 8, 12, 16, 24, 32, 48}, 101, 5);
  std::printf("expert stage (K=768, 24 groups): bf16 path vs int8 VNNI path, best of 101:   m  bf16 us  int8 us  speedup\n");
  for (int64_t m : {1, 2, 4, 8, 12, 16, 24, 32}) {
    ExpertStage st(rng, m, K, 768);
    double ba = 1e9, bv = 1e9;
    for (int i = 0; i < 101; ++i) {
      double t0 = now();
      st.run_bf16(mm_kernels_amx);
      const double t1 = now();
      st.run_int8(mm_kernels_avx512);
      ba = std::min(ba, t1 - t0), bv = std::min(bv, now() - t1);
    }
    std::printf("%78ld %8.1f %8.1f %7.2fx\n", (long)m, ba * 1e6, bv * 1e6, bv / ba);
  }
  return 0;
}

// ns per (16 x 16 x 32) block product of one call (4 tiles, K=768) for m tokens: the cost model.
int blocks() {
  std::mt19937 rng(5);
  const Packed p = make_packed(rng, 4, 24, 0);
  for (int64_t m : {16, 32, 64, 128}) {
    const Act a = make_act(rng, m, 24);
    std::vector<float> out(m * 64);
    const Timing t = alternate(201, [&](const mm_kernels& k) {
      for (int i = 0; i < 10; ++i)
        k.gemm(p.data(), p.stride, p.nkb, 1, 0, 4, a.q.data(), a.d.data(), a.s.data(), m, out.data(), 64, 64);
    });
    const double nb = 10.0 * (m / 16) * 4 * 24;
    std::printf("m=%3ld: amx %.2f ns/block, vnni %.2f ns/block (best)\n", (long)m, t.amx_min / nb * 1e9, t.vnni_min / nb * 1e9);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  if (!mm_amx_cpu_has()) {
    std::printf("SKIP: this CPU (or its OS) has no AMX-BF16 tile support (or no AVX512-BF16)\n");
    return 77;
  }
  if (!mm_amx_enable()) {
    std::printf("SKIP: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) was refused\n");
    return 77;
  }
  if (mode == "check") {
    const int r = check();
    return check_experts() || r ? 1 : 0;
  }
  if (mode == "bench") return bench();
  if (mode == "tiles") return tiles();
  if (mode == "sweep") return sweep();
  if (mode == "blocks") return blocks();
  std::printf("usage: amx_driver [check|bench|sweep|blocks|tiles]\n");
  return 2;
}
