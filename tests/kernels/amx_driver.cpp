// Torch-free driver for the AMX gemm (isa_amx.cpp), built by tests/kernels/test_amx.py with
//   g++ amx_driver.cpp isa_amx.o isa_avx512.o isa_portable.o -lpthread
// (each unit with its own setup.py flags). Modes:
//   check  random packed weights / activations on odd shapes: AMX vs the AVX-512 VNNI gemm
//          (bit-identical: same integer sums, same fp32 formula and order), AMX and portable vs a
//          double-precision reference (relative to the sum of |terms|), untouched output padding,
//          and a fresh thread (one that never loaded a tile configuration) getting the same result.
//   bench  gemm throughput AMX vs VNNI on prefill shapes, one thread, calls chunked as op_linear.cpp does.
//   sweep  AMX vs VNNI on one expert group (2 tiles, K=768) for small token counts: the crossover.
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
      if (std::memcmp(&amx[i], &vnni[i], 4) != 0) fail("amx != avx512 (bitwise)", j, n, amx[i], vnni[i]);
      if (std::memcmp(&amx[i], &fresh[i], 4) != 0) fail("fresh thread != amx", j, n, fresh[i], amx[i]);
      const int64_t t = n / 16;
      const int r = (int)(n % 16);
      const uint16_t* wsc = (const uint16_t*)(p.data() + t * p.stride + p.nkb * MM_BLOCK_BYTES);
      double ref = 0, mag = 0;
      for (int64_t b = 0; b < c.nkb; ++b) {
        int64_t isum = 0;
        for (int64_t k = b * 32; k < b * 32 + 32; ++k) isum += (int64_t)code(p, t, r, k) * a.q[j * c.nkb * 32 + k];
        const double sc = (double)a.d[j * c.nkb + b] * (c.ws ? mm_half_to_float(wsc[b * 16 + r]) : 1.0);
        ref += isum * sc;
        mag += std::fabs(isum * sc);
      }
      // fp32: per block one rounded scale product and one rounded (fused or not) accumulation.
      const double tol = (c.nkb + 2) * 1.2e-7 * mag + 1e-30;
      if (std::fabs(amx[i] - ref) > tol) fail("amx vs double reference", j, n, amx[i], ref);
      if (std::fabs(port[i] - ref) > tol) fail("portable vs double reference", j, n, port[i], ref);
    }
  return bad;
}

int check() {
  std::mt19937 rng(1234);
  std::vector<Case> cases;
  for (int64_t m : {1, 15, 16, 17, 100})
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
  }
  int bad = 0;
  for (const Case& c : cases) bad += check_case(rng, c);
  std::printf("%s: %zu cases, %d mismatches\n", bad ? "FAIL" : "OK", cases.size(), bad);
  return bad ? 1 : 0;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// One linear forward as op_linear.cpp issues it: jobs of 4 tiles x 128 tokens (here on one thread).
void linear_calls(const mm_kernels& k, const Packed& p, const Act& a, float* out, int64_t N, int ws) {
  const int64_t K = p.nkb * 32;
  for (int64_t m0 = 0; m0 < a.m; m0 += 128)
    for (int64_t t0 = 0; t0 < p.ntiles; t0 += 4) {
      const int64_t m1 = std::min<int64_t>(a.m, m0 + 128), t1 = std::min<int64_t>(p.ntiles, t0 + 4);
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

int bench() {
  std::mt19937 rng(7);
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

int sweep() {
  std::mt19937 rng(9);
  const int64_t K = 768;
  const Packed p = make_packed(rng, 2, K / 32, 0);
  std::printf("expert group (2 tiles, K=768, wscaled=0), best of 301:   m  amx us  vnni us  speedup\n");
  for (int64_t m : {4, 8, 12, 15, 16, 17, 20, 24, 32, 48, 64, 128}) {
    const Act a = make_act(rng, m, K / 32);
    std::vector<float> out(m * 32);
    const Timing t = alternate(301, [&](const mm_kernels& k) {
      for (int i = 0; i < 20; ++i)
        k.gemm(p.data(), p.stride, p.nkb, 0, 0, 2, a.q.data(), a.d.data(), a.s.data(), m, out.data(), 32, 32);
    });
    std::printf("%60ld %7.2f %8.2f %7.2fx\n", (long)m, t.amx_min / 20 * 1e6, t.vnni_min / 20 * 1e6, t.vnni_min / t.amx_min);
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
    std::printf("SKIP: this CPU (or its OS) has no AMX-INT8 tile support\n");
    return 77;
  }
  if (!mm_amx_enable()) {
    std::printf("SKIP: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) was refused\n");
    return 77;
  }
  if (mode == "check") return check();
  if (mode == "bench") return bench();
  if (mode == "sweep") return sweep();
  if (mode == "blocks") return blocks();
  std::printf("usage: amx_driver [check|bench|sweep]\n");
  return 2;
}
