// mobilemoe._C.NativeModel: the whole MobileMoE forward in one native call per step.
//
// Same semantics as src/mobilemoe/model.py (the reference): RMSNorm, fused QKV, RoPE on adjacent
// pairs (2i, 2i+1), weightless QK-norm, GQA attention over a static fp32 KV cache, sigmoid (or
// softmax) routing with a selection-only bias, ties to the lower index, renormalised top-k times
// routed_scaling_factor, the fused MoE operator (routed + shared experts), tied or untied LM head.
// Matmuls run on the packed INT4 kernels of ops.cpp (int8 dynamic activations); everything else
// is fp32. Only the last position's logits are computed.
#include <torch/extension.h>

#include <c10/util/Half.h>
#include <c10/util/ParallelGuard.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "flash_attn.h"
#include "dispatch.h"
#include "ops_api.h"
#include "vec_math.h"

// GCC 12 false positive in the AVX-512 intrinsics (their _mm512_undefined_* self-initialisation).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace {

struct Layer {
  at::Tensor in_norm, post_norm;  // fp32 [H]
  at::Tensor qkv, o;              // packed linears [(nH+2nKV)D, H], [H, nH D]
  bool moe = false, rope = true;
  at::Tensor router, bias;                            // fp32 [E, H], [E]
  at::Tensor gu_codes, gu_scales, dn_codes, dn_scales;  // packed experts
  at::Tensor ffn_gu, ffn_dn;                          // packed shared expert / dense FFN (fused gate|up)
  int64_t ffn_width = 0;                              // S (0: no shared expert)
  // Offloaded routed experts: the four tensors above hold C cache slots instead of all E experts,
  // and a slot is filled from the expert store file on a miss (see NativeModel::offload_layer).
  bool offloaded = false;
  std::vector<int64_t> record_offset;  // per expert: byte offset of its record in the store file
  std::vector<int64_t> slot_of;        // expert -> slot, or -1
  std::vector<int64_t> expert_of;      // slot -> expert, or -1 (free)
  std::vector<int64_t> last_use;       // slot -> access clock (LRU)
};

// Counters of the offloading runtime (all offloaded layers together).
struct OffloadStats {
  int64_t hits = 0, misses = 0, bytes_read = 0;
  double read_seconds = 0.0;
};

// sum of x[i]^2 in 16 fp32 lanes the compiler vectorizes (one double chain cost ~0.6 us per
// 768-wide row, ~3% of a MoE-S decode step over the norms and QK-norms).
float sum_squares(const float* x, int64_t n) {
  float lane[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lane[j] += x[i + j] * x[i + j];
  float ss = 0.f;
  for (; i < n; ++i) ss += x[i] * x[i];
  for (int j = 0; j < 16; ++j) ss += lane[j];
  return ss;
}

// y = x / rms(x) (* w when given) for one row of H values (y may be x).
void rms_norm_row(const float* x, const float* w, float* y, int64_t H, float eps) {
  const float inv = 1.0f / std::sqrt(sum_squares(x, H) / (float)H + eps);
  if (w)
    for (int64_t i = 0; i < H; ++i) y[i] = x[i] * inv * w[i];
  else
    for (int64_t i = 0; i < H; ++i) y[i] = x[i] * inv;
}

// ---- decode attention over an fp16 KV cache: one KV group (its G query heads) per job --------------
// scores[r][j] = q_r . k_j / sqrt(D); p = softmax; out_r = sum_j p[r][j] v_j. Each key/value row is
// read once for all G heads of its group.

float half_to_float(uint16_t h) { return (float)c10::Half(h, c10::Half::from_bits()); }

void attend_group_portable(const float* q, const uint16_t* K, const uint16_t* Vc, int64_t S, int64_t D, int64_t G,
                           float* scores, float* out) {
  const float scale = 1.0f / std::sqrt((float)D);
  std::vector<float> kv(D);
  for (int64_t j = 0; j < S; ++j) {
    for (int64_t d = 0; d < D; ++d) kv[d] = half_to_float(K[j * D + d]);
    for (int64_t r = 0; r < G; ++r) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += q[r * D + d] * kv[d];
      scores[r * S + j] = acc * scale;
    }
  }
  for (int64_t r = 0; r < G; ++r) {
    float* sr = scores + r * S;
    const float mx = *std::max_element(sr, sr + S);
    float total = 0.f;
    for (int64_t j = 0; j < S; ++j) total += (sr[j] = std::exp(sr[j] - mx));
    for (int64_t j = 0; j < S; ++j) sr[j] /= total;
    std::fill(out + r * D, out + (r + 1) * D, 0.f);
  }
  for (int64_t j = 0; j < S; ++j) {
    for (int64_t d = 0; d < D; ++d) kv[d] = half_to_float(Vc[j * D + d]);
    for (int64_t r = 0; r < G; ++r) {
      const float p = scores[r * S + j];
      for (int64_t d = 0; d < D; ++d) out[r * D + d] += p * kv[d];
    }
  }
}

// q [G, D] fp32, K and V [S, D] fp16 (one KV head), scores scratch [G, S] -> out [G, D].
using AttendFn = void (*)(const float*, const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, float*, float*);

#if defined(__x86_64__) && defined(__GNUC__)
// AVX-512 path, compiled for these functions only and picked at run time. G (query heads per KV
// head) and NV = D / 16 are template parameters so the q, score and output vectors live in
// registers: with a run-time G the compiler kept acc[] and o[][] on the stack, and every FMA
// waited on a store-to-load round trip (2.4x slower at 256 keys, 3.2x at 1024).
template <int G, int NV>
__attribute__((target("avx512f,fma"))) void attend_group_avx512_t(const float* q, const uint16_t* K,
                                                                   const uint16_t* Vc, int64_t S, int64_t /*D*/,
                                                                   int64_t /*G*/, float* scores, float* out) {
  constexpr int64_t D = NV * 16;
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt((float)D));
  __m512 qv[G][NV];
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < NV; ++c) qv[r][c] = _mm512_loadu_ps(q + r * D + c * 16);
  // The cache comes from DRAM (each token streams ~150 MB of weights through L3): prefetch the key
  // rows 32 ahead and this key's value row for the second pass (1.5x faster at 256 keys cold).
  constexpr int64_t kAhead = 32;
  for (int64_t j = 0; j < S; ++j) {
    for (int64_t b = 0; b < D * 2; b += 64) {
      if (j + kAhead < S) _mm_prefetch((const char*)(K + (j + kAhead) * D) + b, _MM_HINT_T0);
      _mm_prefetch((const char*)(Vc + j * D) + b, _MM_HINT_T0);
    }
    __m512 acc[G];
    for (int r = 0; r < G; ++r) acc[r] = _mm512_setzero_ps();
    for (int c = 0; c < NV; ++c) {
      const __m512 k = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(K + j * D + c * 16)));
      for (int r = 0; r < G; ++r) acc[r] = _mm512_fmadd_ps(qv[r][c], k, acc[r]);
    }
    for (int r = 0; r < G; ++r) scores[r * S + j] = _mm512_reduce_add_ps(_mm512_mul_ps(acc[r], scale));
  }
  // softmax numerators exp(s - max) with the vectorized exp (std::exp per score cost more than the
  // dot products: 12 heads x S scores per layer); the 1/sum is applied to the output instead.
  float inv[G];
  for (int r = 0; r < G; ++r) {
    float* sr = scores + r * S;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < S; j += 16) {
      const __mmask16 m = mm_mask16(S - j);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, sr + j));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j += 16) {
      const __mmask16 m = mm_mask16(S - j);
      const __m512 e = mm512_exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sr + j), mx));
      _mm512_mask_storeu_ps(sr + j, m, e);
      vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
    }
    inv[r] = 1.0f / _mm512_reduce_add_ps(vsum);
  }
  __m512 o[G][NV];
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < NV; ++c) o[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < S; ++j) {
    for (int c = 0; c < NV; ++c) {
      const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(Vc + j * D + c * 16)));
      for (int r = 0; r < G; ++r) o[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[r * S + j]), v, o[r][c]);
    }
  }
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < NV; ++c)
      _mm512_storeu_ps(out + r * D + c * 16, _mm512_mul_ps(o[r][c], _mm512_set1_ps(inv[r])));
}

template <int G>
AttendFn attend_avx512_for_nv(int64_t nv) {
  switch (nv) {
    case 1: return attend_group_avx512_t<G, 1>;
    case 2: return attend_group_avx512_t<G, 2>;
    case 3: return attend_group_avx512_t<G, 3>;
    case 4: return attend_group_avx512_t<G, 4>;
    default: return nullptr;
  }
}

// The instance for (G, D), or nullptr: G in 1..8, D in {16, 32, 48, 64}.
AttendFn attend_avx512_for(int64_t G, int64_t D) {
  if (D % 16 != 0) return nullptr;
  const int64_t nv = D / 16;
  switch (G) {
    case 1: return attend_avx512_for_nv<1>(nv);
    case 2: return attend_avx512_for_nv<2>(nv);
    case 3: return attend_avx512_for_nv<3>(nv);
    case 4: return attend_avx512_for_nv<4>(nv);
    case 5: return attend_avx512_for_nv<5>(nv);
    case 6: return attend_avx512_for_nv<6>(nv);
    case 7: return attend_avx512_for_nv<7>(nv);
    case 8: return attend_avx512_for_nv<8>(nv);
    default: return nullptr;
  }
}
#endif

// The AVX-512 versions of this file's kernels run exactly when the matmuls do (dispatch.cpp's ISA
// decision: set_isa > MOBILEMOE_KERNEL_ISA > best, which implies avx512f and fma); AVX2 and
// portable use the portable attention and router.
bool use_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return mobilemoe_api::uses_avx512(mobilemoe_api::current_isa().isa);
#else
  return false;
#endif
}

// ---- decode router: fp32 logits of rows [e0, e1) of the router weight [E, H] for one token -------
// Each logit is summed in a fixed order (independent of threads); sigmoid applied when asked.
void router_rows_portable(const float* h, const float* W, int64_t H, int64_t e0, int64_t e1, bool sigmoid,
                          float* out) {
  for (int64_t e = e0; e < e1; ++e) {
    float acc = 0.f;
    for (int64_t i = 0; i < H; ++i) acc += h[i] * W[e * H + i];
    out[e] = sigmoid ? 1.f / (1.f + std::exp(-acc)) : acc;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// Four rows at a time (four independent FMA chains sharing each load of h), prefetching the rows
// ahead (the router is evicted by the ~150 MB of weights each token streams) and a vectorized sigmoid.
__attribute__((target("avx512f,fma"))) void router_rows_avx512(const float* h, const float* W, int64_t H,
                                                                int64_t e0, int64_t e1, bool sigmoid, float* out) {
  for (int64_t e = e0; e < e1; e += 4) {
    const int n = (int)std::min<int64_t>(4, e1 - e);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t i = 0; i < H; i += 16) {
      const __mmask16 m = mm_mask16(H - i);
      const __m512 hv = _mm512_maskz_loadu_ps(m, h + i);
      for (int r = 0; r < n; ++r) {
        const float* row = W + (e + r) * H + i;
        _mm_prefetch((const char*)(row + 4 * H), _MM_HINT_T0);
        acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, row), hv, acc[r]);
      }
    }
    for (int r = 0; r < n; ++r) out[e + r] = _mm512_reduce_add_ps(acc[r]);
  }
  if (!sigmoid) return;
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t e = e0; e < e1; e += 16) {
    const __mmask16 m = mm_mask16(e1 - e);
    const __m512 v = _mm512_maskz_loadu_ps(m, out + e);
    _mm512_mask_storeu_ps(out + e, m, _mm512_div_ps(one, _mm512_add_ps(one, mm512_exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
  }
}
#endif

using RouterFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, bool, float*);

RouterFn pick_router() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx512()) return router_rows_avx512;
#endif
  return router_rows_portable;
}

AttendFn pick_attend(int64_t D, int64_t G) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx512())
    if (AttendFn f = attend_avx512_for(G, D)) return f;
#endif
  return attend_group_portable;
}

// ---- prefill attention: causal GQA of T new positions over the cache ------------------------------
// The AVX-512 BF16 kernel (flash_attn.h) where the CPU has it; ATen's fp32 SDPA otherwise.
bool prefill_bf16_available(int64_t D) {
#if defined(__x86_64__) && defined(__GNUC__)
  return use_avx512() && __builtin_cpu_supports("avx512bf16") && mm_attn_supports_bf16(D);
#else
  (void)D;
  return false;
#endif
}

// qkv [T, W] fp32 rows whose first nKV*G*D columns are the query heads (group g's heads g*G..);
// caches [1, nKV, max_len, D] fp16 holding positions [0, start+T) -> [T, nKV*G*D].
at::Tensor prefill_attention(const at::Tensor& qkv, int64_t nKV, int64_t G, int64_t D, const at::Tensor& kcache,
                             const at::Tensor& vcache, int64_t start, bool bf16) {
  const int64_t T = qkv.size(0), QO = nKV * G * D, S = start + T, max_len = kcache.size(2);
  at::Tensor out = at::empty({T, QO}, qkv.options());
#if defined(__x86_64__) && defined(__GNUC__)
  if (bf16 && G <= MM_ATTN_MAX_ROWS) {  // (a query tile holds at least one position's G heads)
    // Pack every group's keys/values to bf16 once, then (group, query tile) jobs. A job takes tiles
    // i and n-1-i, so every job has the same causal work and the pool's halves stay balanced.
    const int64_t Sp = mm_attn_padded_keys(S);
    thread_local std::vector<uint16_t> kp, vp;
    if ((int64_t)kp.size() < nKV * Sp * D) kp.resize(nKV * Sp * D), vp.resize(nKV * Sp * D);
    uint16_t* kpp = kp.data();
    uint16_t* vpp = vp.data();
    const uint16_t* kc = reinterpret_cast<const uint16_t*>(kcache.data_ptr<at::Half>());
    const uint16_t* vc = reinterpret_cast<const uint16_t*>(vcache.data_ptr<at::Half>());
    mobilemoe_api::parallel_jobs(nKV, [&](int64_t g) {
      mm_attn_pack_kv_bf16(kc + g * max_len * D, vc + g * max_len * D, S, D, kpp + g * Sp * D, vpp + g * Sp * D);
    });
    const int64_t tile = std::max<int64_t>(1, MM_ATTN_MAX_ROWS / G), ntiles = (T + tile - 1) / tile;
    const int64_t npairs = (ntiles + 1) / 2, W = qkv.size(1);
    const float* qp = qkv.data_ptr<float>();
    float* op = out.data_ptr<float>();
    mobilemoe_api::parallel_jobs(nKV * npairs, [&](int64_t j) {
      const int64_t g = j / npairs, i = j % npairs;
      for (int64_t ti : {i, ntiles - 1 - i}) {
        mm_attn_rows_bf16(qp + g * G * D, W, ti * tile, std::min(T, (ti + 1) * tile), G, D, start,
                          kpp + g * Sp * D, vpp + g * Sp * D, op + g * G * D, QO);
        if (ti == ntiles - 1 - i) break;  // the middle tile of an odd count runs once
      }
    });
    return out;
  }
#endif
  (void)bf16;
  // ATen SDPA per KV group (its G query heads), groups as jobs of the kernels' pool and each SDPA
  // inline in its job, so no OpenMP team races the pool's threads.
  at::Tensor q = qkv.narrow(1, 0, QO).view({T, nKV * G, D}).transpose(0, 1);  // [nH, T, D]
  std::optional<at::Tensor> mask;
  if (start > 0) {  // a chunk appended after `start` cached positions
    at::Tensor qpos = at::arange(start, start + T, at::kLong).unsqueeze(1);
    mask = at::arange(S, at::kLong).unsqueeze(0) <= qpos;
  }
  at::Tensor heads = at::empty({nKV * G, T, D}, qkv.options());
  mobilemoe_api::parallel_jobs(nKV, [&](int64_t g) {
    c10::ParallelGuard inline_ops(true);
    at::Tensor k = kcache.select(0, 0).narrow(0, g, 1).narrow(1, 0, S).to(at::kFloat);  // [1, S, D]
    at::Tensor v = vcache.select(0, 0).narrow(0, g, 1).narrow(1, 0, S).to(at::kFloat);
    at::Tensor qg = q.narrow(0, g * G, G).unsqueeze(0);  // [1, G, T, D]
    at::Tensor o = at::scaled_dot_product_attention(qg, k.unsqueeze(0), v.unsqueeze(0), mask, 0.0, start == 0,
                                                    std::nullopt, /*enable_gqa=*/true);
    heads.narrow(0, g * G, G).copy_(o.squeeze(0));
  });
  out.copy_(heads.transpose(0, 1).reshape({T, QO}));
  return out;
}

// Wall time per category of a forward, accumulated while enabled (NativeModel.set_profiling).
struct Profiler {
  bool on = false;
  std::map<std::string, double> seconds;
  std::chrono::steady_clock::time_point t;
  void start() {
    if (on) t = std::chrono::steady_clock::now();
  }
  void stop(const char* what) {
    if (!on) return;
    auto now = std::chrono::steady_clock::now();
    seconds[what] += std::chrono::duration<double>(now - t).count();
    t = now;
  }
};

}  // namespace

class NativeModel {
 public:
  NativeModel(int64_t hidden, int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t vocab, int64_t experts,
              int64_t top_k, int64_t routed_width, double eps, double routed_scale, bool norm_topk, bool sigmoid,
              bool qk_norm, int64_t max_len, at::Tensor cos, at::Tensor sin, at::Tensor embed_q, at::Tensor embed_s,
              at::Tensor head, at::Tensor final_norm)
      : H(hidden), nH(n_heads), nKV(n_kv), D(head_dim), V(vocab), E(experts), K(top_k), I(routed_width),
        eps((float)eps), scale((float)routed_scale), norm_topk(norm_topk), sigmoid(sigmoid), qk_norm(qk_norm),
        max_len(max_len), cos_(cos.contiguous()), sin_(sin.contiguous()), embed_q(embed_q.contiguous()),
        embed_s(embed_s.contiguous()), head(head), final_norm(final_norm.contiguous()) {
    TORCH_CHECK(cos_.size(0) >= max_len && cos_.size(1) == D / 2, "rope tables must be [max_len, D/2]");
    // MOBILEMOE_PREFILL_ATTENTION=sdpa keeps ATen's fp32 SDPA (to compare speed and logits); read
    // once here, not on every forward.
    const char* pa = std::getenv("MOBILEMOE_PREFILL_ATTENTION");
    sdpa_forced = pa && std::string(pa) == "sdpa";
    pick_paths();
  }

  // Pick this file's kernels from the current ISA decision. Called by every forward (a few atomic
  // loads of the cached decision), so set_isa() after construction still governs them.
  void pick_paths() {
    isa_name = mobilemoe_api::current_isa().name;
    attend = pick_attend(D, nH / nKV);
    prefill_bf16 = !sdpa_forced && prefill_bf16_available(D);
    router_rows = pick_router();
  }

  // The kernels the last forward used (or the next one would, before any): for tests and reports.
  std::map<std::string, std::string> kernel_paths() const {
    const bool attend_portable = attend == attend_group_portable;
    const bool router_portable = router_rows == router_rows_portable;
    return {{"isa", isa_name},
            {"attention", attend_portable ? "portable" : "avx512"},
            {"router", router_portable ? "portable" : "avx512"},
            {"prefill_attention", prefill_bf16 ? "avx512bf16" : "sdpa"}};
  }

  void add_layer(at::Tensor in_norm, at::Tensor post_norm, at::Tensor qkv, at::Tensor o, bool rope, bool moe,
                 at::Tensor router, at::Tensor bias, at::Tensor gu_codes, at::Tensor gu_scales, at::Tensor dn_codes,
                 at::Tensor dn_scales, at::Tensor ffn_gu, at::Tensor ffn_dn, int64_t ffn_width) {
    Layer l;
    l.in_norm = in_norm.contiguous();
    l.post_norm = post_norm.contiguous();
    l.qkv = qkv, l.o = o, l.rope = rope, l.moe = moe;
    l.router = router.contiguous(), l.bias = bias.contiguous();
    l.gu_codes = gu_codes, l.gu_scales = gu_scales, l.dn_codes = dn_codes, l.dn_scales = dn_scales;
    l.ffn_gu = ffn_gu, l.ffn_dn = ffn_dn, l.ffn_width = ffn_width;
    layers.push_back(l);
    auto opt = at::TensorOptions().dtype(at::kHalf);  // fp16 KV cache, as llama.cpp
    kcache.push_back(at::zeros({1, nKV, max_len, D}, opt));
    vcache.push_back(at::zeros({1, nKV, max_len, D}, opt));
  }

  // ids [T] int64 at positions [start, start+T) -> logits [V] of the last position.
  // With ``routing`` set, chosen expert ids of every MoE layer are appended there ([T, K] each).
  at::Tensor forward(const at::Tensor& ids_in, int64_t start) {
    at::Tensor ids = ids_in.contiguous();
    TORCH_CHECK(ids.dtype() == at::kLong && ids.dim() == 1 && ids.size(0) > 0, "ids must be a non-empty int64 [T]");
    const int64_t T = ids.size(0);
    TORCH_CHECK(start >= 0 && start + T <= max_len, "positions [", start, ", ", start + T, ") exceed the KV cache (",
                max_len, ")");
    pick_paths();
    prof.start();
    at::Tensor x = embed(ids);
    at::Tensor h = at::empty({T, H}, x.options());
    prof.stop("embed");
    for (size_t li = 0; li < layers.size(); ++li) {
      Layer& L = layers[li];
      norm_rows(x, L.in_norm, h);
      prof.stop("norm");
      add_rows(x, attention(li, h, start));
      prof.stop("attn_out_proj");
      norm_rows(x, L.post_norm, h);
      prof.stop("norm");
      add_rows(x, L.moe ? moe(L, h) : dense_ffn(L, h));
      prof.stop(L.moe ? "moe_experts" : "dense_ffn");
    }
    at::Tensor last = at::empty({1, H}, x.options());
    rms_norm_row(x.data_ptr<float>() + (T - 1) * H, final_norm.data_ptr<float>(), last.data_ptr<float>(), H, eps);
    at::Tensor logits = mobilemoe_api::linear(head, V, H, last).view({V});
    prof.stop("lm_head");
    return logits;
  }

  // fn(t) for rows t in [0, T): inline for one row (decode), else chunks of `chunk` rows as jobs of
  // the kernels' pool (prefill spent ~10% of its time in these per-row loops on one thread).
  template <typename F>
  static void for_rows(int64_t T, int64_t chunk, const F& fn) {
    if (T == 1) {
      fn(0);
      return;
    }
    mobilemoe_api::parallel_jobs((T + chunk - 1) / chunk, [&](int64_t c) {
      for (int64_t t = c * chunk; t < std::min(T, (c + 1) * chunk); ++t) fn(t);
    });
  }

  // y = RMSNorm(x) * w row by row ([T, H] fp32).
  void norm_rows(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) const {
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for_rows(x.size(0), 32, [&](int64_t t) { rms_norm_row(xp + t * H, wp, yp + t * H, H, eps); });
  }

  // x += y for contiguous fp32 tensors of the same shape: a plain loop (ATen's add_ costs ~1 us of
  // dispatch per call, and decode does two per layer).
  static void add_rows(at::Tensor& x, const at::Tensor& y) {
    TORCH_CHECK(y.is_contiguous() && y.numel() == x.numel(), "residual add: shape mismatch");
    float* xp = x.data_ptr<float>();
    const float* yp = y.data_ptr<float>();
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) xp[i] += yp[i];
  }

  int64_t num_layers() const { return (int64_t)layers.size(); }

  // ---- test hooks: the pieces of the forward that restate model.py / moe.py, on given inputs ----
  // Layer li's routing of h [T, H] fp32 under the current ISA decision -> (scores, ids, weights).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> route_test(int64_t li, const at::Tensor& h) {
    TORCH_CHECK(li >= 0 && li < num_layers() && layers[li].moe, "layer ", li, " is not a MoE layer");
    TORCH_CHECK(h.dtype() == at::kFloat && h.dim() == 2 && h.size(0) > 0 && h.size(1) == H,
                "h must be float32 [T, H]");
    pick_paths();
    return route(layers[li], h.contiguous());
  }

  // Layer li's RoPE + QK-norm of fused qkv rows [T, (nH + 2 nKV) D] at positions [start, start+T).
  at::Tensor rope_qknorm_test(int64_t li, const at::Tensor& qkv, int64_t start) {
    const int64_t W = (nH + 2 * nKV) * D;
    TORCH_CHECK(li >= 0 && li < num_layers(), "no layer ", li);
    TORCH_CHECK(qkv.dtype() == at::kFloat && qkv.dim() == 2 && qkv.size(1) == W, "qkv must be float32 [T, ", W, "]");
    TORCH_CHECK(start >= 0 && start + qkv.size(0) <= max_len, "positions exceed the rope tables");
    at::Tensor out = qkv.contiguous().clone();
    for (int64_t t = 0; t < out.size(0); ++t) rope_qknorm_row(layers[li], out.data_ptr<float>() + t * W, start + t);
    return out;
  }

  void set_profiling(bool on) {
    prof.on = on;
    prof.seconds.clear();
  }
  std::map<std::string, double> profile() const { return prof.seconds; }

  ~NativeModel() {
    if (store_fd >= 0) ::close(store_fd);
  }

  // The expert store: one file holding every routed expert's packed bytes as one record
  // (gate_up codes | gate_up scales | down codes | down scales), read with preadv into cache slots.
  // drop_page_cache: drop the file's cached pages at open and each record's pages after it is read
  // (POSIX_FADV_DONTNEED), so every miss reads the storage device instead of RAM.
  void open_expert_store(const std::string& path, bool drop_page_cache) {
    TORCH_CHECK(store_fd < 0, "an expert store is already open");
    store_fd = ::open(path.c_str(), O_RDONLY);
    TORCH_CHECK(store_fd >= 0, "cannot open the expert store ", path, ": ", std::strerror(errno));
    drop_cache = drop_page_cache;
    // Misses are random reads of whole records: no readahead, which would pull neighbouring experts
    // into the page cache and turn later misses into memory copies.
    ::posix_fadvise(store_fd, 0, 0, POSIX_FADV_RANDOM);
    if (drop_cache) ::posix_fadvise(store_fd, 0, 0, POSIX_FADV_DONTNEED);
  }

  // Layer li keeps its routed experts on storage: its expert tensors (given to add_layer) are C
  // cache slots, record_offsets [E] the byte offset of each expert's record in the store file.
  void offload_layer(int64_t li, const at::Tensor& record_offsets) {
    TORCH_CHECK(store_fd >= 0, "open_expert_store first");
    TORCH_CHECK(li >= 0 && li < (int64_t)layers.size() && layers[li].moe, "layer ", li, " is not an MoE layer");
    Layer& L = layers[li];
    at::Tensor offs = record_offsets.to(at::kLong).contiguous();
    TORCH_CHECK(offs.dim() == 1 && offs.size(0) == E, "record_offsets must be int64 [", E, "]");
    const int64_t C = L.gu_codes.size(0);
    TORCH_CHECK(C >= K && C <= E, "expert cache capacity ", C, " must be in [top_k=", K, ", experts=", E, "]");
    L.offloaded = true;
    L.record_offset.assign(offs.data_ptr<int64_t>(), offs.data_ptr<int64_t>() + E);
    L.slot_of.assign(E, -1);
    L.expert_of.assign(C, -1);
    L.last_use.assign(C, 0);
  }

  std::map<std::string, double> offload_stats() const {
    return {{"hits", (double)ostats.hits}, {"misses", (double)ostats.misses},
            {"bytes_read", (double)ostats.bytes_read}, {"read_seconds", ostats.read_seconds}};
  }
  void reset_offload_stats() { ostats = OffloadStats(); }

  // Record the chosen experts of every MoE layer ([T, K] per layer per forward call) until turned off.
  void set_record_routing(bool on) {
    record_routing = on;
    routing.clear();
  }
  std::vector<at::Tensor> recorded_routing() const { return routing; }

 private:
  // Dequantize embedding rows: value = code * scale, groups of 32 along H, even index = low nibble.
  at::Tensor embed(const at::Tensor& ids) {
    const int64_t T = ids.size(0), G = H / 32;
    at::Tensor x = at::empty({T, H}, at::TensorOptions().dtype(at::kFloat));
    const int64_t* ip = ids.data_ptr<int64_t>();
    const uint8_t* q = embed_q.data_ptr<uint8_t>();
    const at::Half* s = embed_s.data_ptr<at::Half>();
    float* xp = x.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(ip[t] >= 0 && ip[t] < V, "token id ", ip[t], " out of the vocabulary [0, ", V, ")");
      const uint8_t* row = q + ip[t] * (H / 2);
      for (int64_t g = 0; g < G; ++g) {
        const float sc = (float)s[ip[t] * G + g];
        for (int64_t j = 0; j < 16; ++j) {
          const uint8_t b = row[g * 16 + j];
          const int lo = (b & 0xF) >= 8 ? (b & 0xF) - 16 : (b & 0xF);
          const int hi = (b >> 4) >= 8 ? (b >> 4) - 16 : (b >> 4);
          xp[t * H + g * 32 + 2 * j] = lo * sc;
          xp[t * H + g * 32 + 2 * j + 1] = hi * sc;
        }
      }
    }
    return x;
  }

  void rope_head(float* v, int64_t pos) const {
    const float* c = cos_.data_ptr<float>() + pos * (D / 2);
    const float* s = sin_.data_ptr<float>() + pos * (D / 2);
    for (int64_t i = 0; i < D / 2; ++i) {
      const float x0 = v[2 * i], x1 = v[2 * i + 1];
      v[2 * i] = x0 * c[i] - x1 * s[i];
      v[2 * i + 1] = x0 * s[i] + x1 * c[i];
    }
  }

  // RoPE then weightless QK-norm on the q and k heads of one fused qkv row at position pos.
  void rope_qknorm_row(const Layer& L, float* row, int64_t pos) const {
    for (int64_t hd = 0; hd < nH + nKV; ++hd) {  // q heads then k heads
      float* v = row + hd * D;
      if (L.rope) rope_head(v, pos);
      if (qk_norm) rms_norm_row(v, nullptr, v, D, eps);
    }
  }

  at::Tensor attention(size_t li, const at::Tensor& h, int64_t start) {
    const Layer& L = layers[li];
    const int64_t T = h.size(0), QO = nH * D, KO = nKV * D;
    at::Tensor qkv = mobilemoe_api::linear(L.qkv, QO + 2 * KO, H, h);  // [T, QO + 2 KO]
    prof.stop("qkv_proj");
    float* p = qkv.data_ptr<float>();
    at::Half* kc = kcache[li].data_ptr<at::Half>();
    at::Half* vc = vcache[li].data_ptr<at::Half>();
    for_rows(T, 16, [&](int64_t t) {
      float* row = p + t * (QO + 2 * KO);
      const int64_t pos = start + t;
      rope_qknorm_row(L, row, pos);
      for (int64_t g = 0; g < nKV; ++g) {
        std::copy(row + QO + g * D, row + QO + (g + 1) * D, kc + (g * max_len + pos) * D);
        std::copy(row + QO + KO + g * D, row + QO + KO + (g + 1) * D, vc + (g * max_len + pos) * D);
      }
    });
    prof.stop("rope_qknorm_cache");
    const int64_t S = start + T;
    if (T == 1) {  // decode: the fp16 cache read once per KV group, groups spread over the job pool
      const int64_t G = nH / nKV;
      at::Tensor out = at::empty({1, QO}, qkv.options());
      const float* qp = qkv.data_ptr<float>();
      float* op = out.data_ptr<float>();
      const uint16_t* kb = reinterpret_cast<const uint16_t*>(kc);
      const uint16_t* vb = reinterpret_cast<const uint16_t*>(vc);
      std::vector<float> scores(nKV * G * S);
      mobilemoe_api::parallel_jobs(nKV, [&](int64_t g) {
        attend(qp + g * G * D, kb + g * max_len * D, vb + g * max_len * D, S, D, G, scores.data() + g * G * S,
               op + g * G * D);
      });
      prof.stop("attention");
      return mobilemoe_api::linear(L.o, H, QO, out);
    }
    at::Tensor flat = prefill_attention(qkv, nKV, nH / nKV, D, kcache[li], vcache[li], start, prefill_bf16);
    prof.stop("attention");
    return mobilemoe_api::linear(L.o, H, QO, flat);
  }

  // One token's routing from its scores s [E]: the top-k of s + bias (selection only; ties to the
  // lower index), weights s of the chosen (renormalised if norm_topk) times the routed scale.
  // k passes of a first-maximum scan (k is small; a partial_sort per token cost ~1 us).
  void select_topk(const Layer& L, const float* s, int64_t* ids, float* w) const {
    thread_local std::vector<float> sel;
    sel.resize(E);
    const float* bp = L.bias.data_ptr<float>();
    for (int64_t e = 0; e < E; ++e) sel[e] = s[e] + bp[e];
    float total = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      int64_t best = 0;
      while (best < E && sel[best] == -INFINITY) ++best;  // skip the ones already taken
      for (int64_t e = best + 1; e < E; ++e)
        if (sel[e] > sel[best]) best = e;
      ids[j] = best;
      sel[best] = -INFINITY;
      total += s[best];
    }
    for (int64_t j = 0; j < K; ++j) w[j] = (norm_topk ? s[ids[j]] / total : s[ids[j]]) * scale;
  }

  at::Tensor moe(Layer& L, const at::Tensor& h) {
    auto [scores, ids, w] = route(L, h);
    prof.stop("router");
    if (record_routing) routing.push_back(ids.clone());
    if (L.offloaded) return moe_offloaded(L, h, ids, w);
    static const at::Tensor empty = at::empty({0, 0}, at::TensorOptions().dtype(at::kByte));
    const bool shared = L.ffn_width > 0;
    return mobilemoe_api::moe(h, ids, w, L.gu_codes, L.gu_scales, L.dn_codes, L.dn_scales, I,
                              shared ? L.ffn_gu : empty, shared ? L.ffn_dn : empty, L.ffn_width);
  }

  // Router scores [T, E], chosen experts [T, K] and their combine weights [T, K] for h [T, H].
  std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const Layer& L, const at::Tensor& h) const {
    const int64_t T = h.size(0);
    // fp32 router scores. One token: the router_rows kernel (ATen's dispatch costs more than the
    // 60 x H dots); more: row chunks as pool jobs with the ATen ops inline (see attention()).
    at::Tensor scores = at::empty({T, E}, h.options());
    at::Tensor ids = at::empty({T, K}, at::TensorOptions().dtype(at::kLong));
    at::Tensor w = at::empty({T, K}, at::TensorOptions().dtype(at::kFloat));
    float* sp = scores.data_ptr<float>();
    int64_t* ip = ids.data_ptr<int64_t>();
    float* wp = w.data_ptr<float>();
    if (T == 1) {
      const float* hp = h.data_ptr<float>();
      const float* wr = L.router.data_ptr<float>();
      // two halves on the job pool (a multiple of 4 rows each): the 60 x H fp32 rows come from DRAM
      const int64_t half = (E / 2 + 3) / 4 * 4;
      mobilemoe_api::parallel_jobs(2, [&](int64_t j) {
        router_rows(hp, wr, H, j ? std::min(half, E) : 0, j ? E : std::min(half, E), sigmoid, sp);
      });
      if (!sigmoid) {
        const float mx = *std::max_element(sp, sp + E);
        float total = 0.f;
        for (int64_t e = 0; e < E; ++e) total += (sp[e] = std::exp(sp[e] - mx));
        for (int64_t e = 0; e < E; ++e) sp[e] /= total;
      }
      select_topk(L, sp, ip, wp);
    } else {  // chunks of rows: scores with the ATen ops inline, then each row's top-k
      const int64_t chunk = 64, nchunks = (T + chunk - 1) / chunk;
      mobilemoe_api::parallel_jobs(nchunks, [&](int64_t c) {
        c10::ParallelGuard inline_ops(true);
        const int64_t r0 = c * chunk, n = std::min(chunk, T - r0);
        at::Tensor logits = at::mm(h.narrow(0, r0, n), L.router.t());
        scores.narrow(0, r0, n).copy_(sigmoid ? logits.sigmoid() : logits.softmax(-1));
        for (int64_t t = r0; t < r0 + n; ++t) select_topk(L, sp + t * E, ip + t * K, wp + t * K);
      });
    }
    return {scores, ids, w};
  }

  // One expert into a cache slot with one preadv of its record (four parts, straight into the slots).
  void read_expert(Layer& L, int64_t e, int64_t slot) {
    at::Tensor* parts[4] = {&L.gu_codes, &L.gu_scales, &L.dn_codes, &L.dn_scales};
    struct iovec iov[4];
    int64_t total = 0;
    for (int p = 0; p < 4; ++p) {
      const int64_t n = parts[p]->nbytes() / parts[p]->size(0);
      iov[p].iov_base = static_cast<uint8_t*>(parts[p]->data_ptr()) + slot * n;
      iov[p].iov_len = (size_t)n;
      total += n;
    }
    const auto t0 = std::chrono::steady_clock::now();
    int64_t done = 0, off = L.record_offset[e];
    int first = 0;
    while (done < total) {  // preadv may return short; continue where it stopped
      const ssize_t r = ::preadv(store_fd, iov + first, 4 - first, off + done);
      TORCH_CHECK(r > 0, "expert store: read of expert ", e, " failed at offset ", off + done, ": ",
                  r == 0 ? "unexpected end of file" : std::strerror(errno));
      done += r;
      for (int64_t left = r; left > 0 && first < 4;) {
        const int64_t take = std::min<int64_t>(left, (int64_t)iov[first].iov_len);
        iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + take;
        iov[first].iov_len -= take;
        left -= take;
        if (iov[first].iov_len == 0) ++first;
      }
    }
    if (drop_cache) ::posix_fadvise(store_fd, off, total, POSIX_FADV_DONTNEED);
    ostats.read_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ostats.bytes_read += total;
    ostats.misses += 1;
  }

  // Make the experts of `need` resident (LRU over slots, never evicting one of `need`); returns
  // their slots. Accesses are counted in order, one clock tick each (as remoe.cache_sim does).
  std::vector<int64_t> make_resident(Layer& L, const std::vector<int64_t>& need) {
    std::vector<int64_t> slots;
    std::vector<char> needed(E, 0);
    for (int64_t e : need) needed[e] = 1;
    const int64_t C = (int64_t)L.expert_of.size();
    for (int64_t e : need) {
      ++clock;
      int64_t s = L.slot_of[e];
      if (s >= 0) {
        ostats.hits += 1;
      } else {
        s = -1;
        for (int64_t c = 0; c < C; ++c) {  // a free slot, else the least recently used unneeded one
          const int64_t held = L.expert_of[c];
          if (held < 0) { s = c; break; }
          if (!needed[held] && (s < 0 || L.last_use[c] < L.last_use[s])) s = c;
        }
        TORCH_CHECK(s >= 0, "expert cache: no slot to evict (capacity ", C, ")");
        if (L.expert_of[s] >= 0) L.slot_of[L.expert_of[s]] = -1;
        read_expert(L, e, s);
        L.expert_of[s] = e;
        L.slot_of[e] = s;
      }
      L.last_use[s] = clock;
      slots.push_back(s);
    }
    return slots;
  }

  // The MoE layer with offloaded experts: the distinct chosen experts in order of first use, in
  // batches of at most C (one batch at decode); each batch runs the fused operator on its slots
  // with the other assignments skipped (id -1). The shared expert runs with the first batch.
  at::Tensor moe_offloaded(Layer& L, const at::Tensor& h, const at::Tensor& ids, const at::Tensor& w) {
    const int64_t A = ids.numel(), C = (int64_t)L.expert_of.size();
    const int64_t* ip = ids.data_ptr<int64_t>();
    std::vector<int64_t> order;
    std::vector<char> seen(E, 0);
    for (int64_t a = 0; a < A; ++a)
      if (!seen[ip[a]]) seen[ip[a]] = 1, order.push_back(ip[a]);
    prof.stop("router");
    static const at::Tensor empty = at::empty({0, 0}, at::TensorOptions().dtype(at::kByte));
    at::Tensor out;
    at::Tensor local = at::empty_like(ids);
    int64_t* lp = local.data_ptr<int64_t>();
    for (size_t b0 = 0; b0 < order.size(); b0 += C) {
      std::vector<int64_t> batch(order.begin() + b0, order.begin() + std::min(order.size(), b0 + C));
      std::vector<int64_t> slots = make_resident(L, batch);
      std::vector<int64_t> slot_in_batch(E, -1);
      for (size_t j = 0; j < batch.size(); ++j) slot_in_batch[batch[j]] = slots[j];
      for (int64_t a = 0; a < A; ++a) lp[a] = slot_in_batch[ip[a]];
      prof.stop("expert_io");
      const bool shared = b0 == 0 && L.ffn_width > 0;
      at::Tensor part = mobilemoe_api::moe(h, local, w, L.gu_codes, L.gu_scales, L.dn_codes, L.dn_scales, I,
                                           shared ? L.ffn_gu : empty, shared ? L.ffn_dn : empty,
                                           shared ? L.ffn_width : 0);
      if (b0 == 0) out = part; else add_rows(out, part);
    }
    return out;
  }

  at::Tensor dense_ffn(const Layer& L, const at::Tensor& h) {
    const int64_t S = L.ffn_width;
    at::Tensor gu = mobilemoe_api::linear(L.ffn_gu, 2 * S, H, h);
    return mobilemoe_api::linear(L.ffn_dn, H, S, mobilemoe_api::swiglu(gu, S));
  }

  int64_t H, nH, nKV, D, V, E, K, I;
  float eps, scale;
  bool norm_topk, sigmoid, qk_norm;
  int64_t max_len;
  at::Tensor cos_, sin_, embed_q, embed_s, head, final_norm;
  std::vector<Layer> layers;
  std::vector<at::Tensor> kcache, vcache;
  Profiler prof;
  AttendFn attend;
  bool prefill_bf16 = false;  // prefill attention on the AVX-512 BF16 kernel (else ATen SDPA)
  bool sdpa_forced = false;   // MOBILEMOE_PREFILL_ATTENTION=sdpa at construction
  RouterFn router_rows;
  std::string isa_name;  // the ISA decision pick_paths() last saw
  int store_fd = -1;
  bool drop_cache = false;
  OffloadStats ostats;
  int64_t clock = 0;  // access clock of the expert caches
  bool record_routing = false;
  std::vector<at::Tensor> routing;
};

// One KV head's decode attention with the kernel NativeModel picks (or the portable one), for the
// tests: q [G, D] fp32, k and v [S, D] fp16 -> [G, D] = softmax(q k^T / sqrt(D)) v.
at::Tensor attend_kv_head(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool portable) {
  TORCH_CHECK(q.dtype() == at::kFloat && q.dim() == 2 && q.is_contiguous(), "q must be contiguous float32 [G, D]");
  const int64_t G = q.size(0), D = q.size(1);
  TORCH_CHECK(k.dtype() == at::kHalf && v.dtype() == at::kHalf && k.dim() == 2 && k.is_contiguous() &&
                  v.is_contiguous() && k.sizes() == v.sizes() && k.size(1) == D && k.size(0) > 0,
              "k and v must be contiguous float16 [S, D] with S > 0");
  const int64_t S = k.size(0);
  AttendFn f = portable ? attend_group_portable : pick_attend(D, G);
  std::vector<float> scores(G * S);
  at::Tensor out = at::empty({G, D}, q.options());
  f(q.data_ptr<float>(), reinterpret_cast<const uint16_t*>(k.data_ptr<at::Half>()),
    reinterpret_cast<const uint16_t*>(v.data_ptr<at::Half>()), S, D, G, scores.data(), out.data_ptr<float>());
  return out;
}

// Causal prefill attention of one KV head, for the tests: q [T, G*D] fp32 at positions
// [start, start+T), k and v [start+T, D] fp16 -> [T, G*D]; bf16: the AVX-512 BF16 kernel, else SDPA.
at::Tensor prefill_attend_kv_head(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t G,
                                  int64_t start, bool bf16) {
  TORCH_CHECK(q.dtype() == at::kFloat && q.dim() == 2 && q.is_contiguous() && G > 0 && q.size(1) % G == 0,
              "q must be contiguous float32 [T, G*D]");
  const int64_t T = q.size(0), D = q.size(1) / G;
  TORCH_CHECK(k.dtype() == at::kHalf && v.dtype() == at::kHalf && k.dim() == 2 && k.is_contiguous() &&
                  v.is_contiguous() && k.sizes() == v.sizes() && k.size(1) == D && k.size(0) == start + T,
              "k and v must be contiguous float16 [start+T, D]");
  TORCH_CHECK(!bf16 || prefill_bf16_available(D), "the AVX-512 BF16 prefill attention is not available for D=", D,
              " on this CPU/ISA setting");
  return prefill_attention(q, 1, G, D, k.view({1, 1, start + T, D}), v.view({1, 1, start + T, D}), start, bf16);
}

// RMSNorm of each row of x [T, H] fp32 (times w [H] when w is non-empty): the forward's norm (test hook).
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2, "x must be float32 [T, H]");
  const int64_t H = x.size(1);
  TORCH_CHECK(w.numel() == 0 || (w.dtype() == at::kFloat && w.dim() == 1 && w.size(0) == H), "w must be float32 [H]");
  at::Tensor xc = x.contiguous(), wc = w.contiguous(), y = at::empty_like(xc);
  const float* wp = w.numel() ? wc.data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < x.size(0); ++t)
    rms_norm_row(xc.data_ptr<float>() + t * H, wp, y.data_ptr<float>() + t * H, H, (float)eps);
  return y;
}

void register_native_model(pybind11::module_& m) {
  m.def("rms_norm_rows", &rms_norm_rows, "the native RMSNorm of each row (test hook)", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("eps"));
  m.def("prefill_attend_kv_head", &prefill_attend_kv_head, "one KV head's causal prefill attention (test hook)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("G"), pybind11::arg("start"),
        pybind11::arg("bf16"));
  m.def("prefill_bf16_available", &prefill_bf16_available, "whether prefill attention can use the AVX-512 BF16 kernel");
  m.def("attend_kv_head", &attend_kv_head, "one KV head's decode attention (test hook)", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("portable") = false);
  pybind11::class_<NativeModel>(m, "NativeModel")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double, bool,
                          bool, bool, int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_layer", &NativeModel::add_layer)
      .def("forward", &NativeModel::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("num_layers", &NativeModel::num_layers)
      .def("kernel_paths", &NativeModel::kernel_paths)
      .def("set_profiling", &NativeModel::set_profiling)
      .def("profile", &NativeModel::profile)
      .def("open_expert_store", &NativeModel::open_expert_store)
      .def("offload_layer", &NativeModel::offload_layer)
      .def("offload_stats", &NativeModel::offload_stats)
      .def("reset_offload_stats", &NativeModel::reset_offload_stats)
      .def("set_record_routing", &NativeModel::set_record_routing)
      .def("recorded_routing", &NativeModel::recorded_routing)
      .def("route_test", &NativeModel::route_test, "layer li's routing of h [T, H] (test hook)")
      .def("rope_qknorm_test", &NativeModel::rope_qknorm_test, "layer li's RoPE + QK-norm of qkv rows (test hook)");
}
