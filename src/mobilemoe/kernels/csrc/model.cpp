// mobilemoe._C.NativeModel: the whole MobileMoE forward in one native call per step.
//
// Same semantics as src/mobilemoe/model.py and moe.py (the reference, which tests/kernels/
// test_native_math.py holds these pieces against): RMSNorm, fused QKV, RoPE on adjacent pairs
// (2i, 2i+1), weightless QK-norm, GQA attention over a static fp16 KV cache, sigmoid (or softmax)
// routing with a selection-only bias, ties to the lower index, renormalised top-k times
// routed_scaling_factor, the fused MoE operator (routed + shared experts), tied or untied LM head.
// Matmuls, attention and the router run on the operators of ops.h (int8 dynamic activations on the
// packed INT4 weights); everything else is fp32. Only the last position's logits are computed.
//
// The model is described by a ModelSpec and one LayerSpec per layer (named fields, built from the
// checkpoint by mobilemoe.runtime.native); offloaded routed experts live in an ExpertCache.
#include <torch/extension.h>

#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "expert_cache.h"
#include "ops.h"
#include "thread_pool.h"

namespace {

using mobilemoe_threads::parallel_jobs;

// The model-wide shapes and tensors (see runtime/native.py for how each is built).
struct ModelSpec {
  int64_t hidden = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, vocab = 0;
  int64_t experts = 0, top_k = 0, routed_width = 0;  // routed experts: 0 in a dense model
  double eps = 1e-5, routed_scale = 1.0;
  bool norm_topk = true, sigmoid_router = true, qk_norm = false;
  int64_t max_len = 0;                    // KV cache positions
  at::Tensor rope_cos, rope_sin;          // fp32 [max_len, head_dim / 2]
  at::Tensor embed_codes, embed_scales;   // the INT4 embedding (checkpoint format): uint8 [V, H/2], fp16 [V, H/32]
  at::Tensor lm_head;                     // packed linear [V, H]
  at::Tensor final_norm;                  // fp32 [H]
};

// One decoder layer. Dense layers leave the MoE fields undefined.
struct LayerSpec {
  at::Tensor input_norm, post_norm;  // fp32 [H]
  at::Tensor qkv, o;                 // packed linears [(nH + 2 nKV) D, H] (q|k|v fused), [H, nH D]
  bool rope = true;
  bool moe = false;
  at::Tensor router, expert_bias;                       // fp32 [E, H], [E] (selection only)
  at::Tensor gu_codes, gu_scales, dn_codes, dn_scales;  // packed routed experts, or C cache slots when offloaded
  at::Tensor ffn_gate_up, ffn_down;                     // packed shared expert (MoE) or dense FFN: [2S, H], [H, S]
  int64_t ffn_width = 0;                                // S (0: an MoE layer without a shared expert)
};

template <typename... Args>
void require(bool ok, const char* field, const Args&... what) {
  TORCH_CHECK(ok, "NativeModel: ", field, " ", what...);
}

void check_fp32(const at::Tensor& t, const char* field, std::vector<int64_t> shape) {
  require(t.defined() && t.dtype() == at::kFloat && t.sizes() == at::IntArrayRef(shape), field,
          "must be float32 ", at::IntArrayRef(shape), ", got ", t.defined() ? t.sizes() : at::IntArrayRef{},
          t.defined() ? std::string(" ") + std::string(c10::toString(t.scalar_type())) : std::string(" (unset)"));
}

void check_packed(const at::Tensor& t, const char* field) {
  require(t.defined() && t.dtype() == at::kByte && t.dim() == 2, field, "must be a packed uint8 [tiles, bytes] tensor");
}

// sum of x[i]^2 in 16 fp32 lanes the compiler vectorizes (a single double chain is latency-bound).
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

const at::Tensor& no_tensor() {
  static const at::Tensor empty = at::empty({0, 0}, at::TensorOptions().dtype(at::kByte));
  return empty;
}

class NativeModel {
 public:
  explicit NativeModel(const ModelSpec& spec)
      : H(spec.hidden), nH(spec.n_heads), nKV(spec.n_kv_heads), D(spec.head_dim), V(spec.vocab), E(spec.experts),
        K(spec.top_k), I(spec.routed_width), eps((float)spec.eps), scale((float)spec.routed_scale),
        norm_topk(spec.norm_topk), sigmoid(spec.sigmoid_router), qk_norm(spec.qk_norm), max_len(spec.max_len) {
    require(H > 0 && H % 32 == 0, "hidden", "must be a positive multiple of 32, got ", H);
    require(nH > 0 && nKV > 0 && nH % nKV == 0, "n_heads / n_kv_heads", "must be positive with n_kv_heads dividing ",
            "n_heads, got ", nH, " / ", nKV);
    require(D > 0 && D % 2 == 0, "head_dim", "must be positive and even, got ", D);
    require(V > 0 && max_len > 0, "vocab / max_len", "must be positive, got ", V, " / ", max_len);
    require(E >= 0 && K >= 0 && K <= E && (E == 0) == (K == 0), "experts / top_k",
            "must be both 0 (dense) or 0 < top_k <= experts, got ", E, " / ", K);
    cos_ = spec.rope_cos.contiguous(), sin_ = spec.rope_sin.contiguous();
    check_fp32(cos_, "rope_cos", {max_len, D / 2});
    check_fp32(sin_, "rope_sin", {max_len, D / 2});
    embed_q = spec.embed_codes.contiguous(), embed_s = spec.embed_scales.contiguous();
    require(embed_q.dtype() == at::kByte && embed_q.sizes() == at::IntArrayRef({V, H / 2}), "embed_codes",
            "must be uint8 [", V, ", ", H / 2, "], got ", embed_q.sizes());
    require(embed_s.dtype() == at::kHalf && embed_s.sizes() == at::IntArrayRef({V, H / 32}), "embed_scales",
            "must be float16 [", V, ", ", H / 32, "], got ", embed_s.sizes());
    check_packed(spec.lm_head, "lm_head");
    head = spec.lm_head;
    final_norm = spec.final_norm.contiguous();
    check_fp32(final_norm, "final_norm", {H});
    // MOBILEMOE_PREFILL_ATTENTION=sdpa keeps ATen's fp32 SDPA (to compare speed and logits).
    const char* pa = std::getenv("MOBILEMOE_PREFILL_ATTENTION");
    sdpa_forced = pa && std::string(pa) == "sdpa";
    pick_paths();
  }

  void add_layer(const LayerSpec& spec) {
    LayerSpec l = spec;
    l.input_norm = l.input_norm.contiguous();
    l.post_norm = l.post_norm.contiguous();
    check_fp32(l.input_norm, "input_norm", {H});
    check_fp32(l.post_norm, "post_norm", {H});
    check_packed(l.qkv, "qkv");
    check_packed(l.o, "o");
    require(l.ffn_width >= 0, "ffn_width", "must be >= 0, got ", l.ffn_width);
    if (l.ffn_width > 0 || !l.moe) {
      require(l.ffn_width > 0, "ffn_width", "of a dense layer must be positive");
      check_packed(l.ffn_gate_up, "ffn_gate_up");
      check_packed(l.ffn_down, "ffn_down");
    }
    if (l.moe) {
      require(E > 0, "moe", "layer in a model with experts = 0");
      l.router = l.router.contiguous(), l.expert_bias = l.expert_bias.contiguous();
      check_fp32(l.router, "router", {E, H});
      check_fp32(l.expert_bias, "expert_bias", {E});
      for (const at::Tensor* t : {&l.gu_codes, &l.gu_scales, &l.dn_codes, &l.dn_scales})
        require(t->defined() && t->dim() >= 2, "routed experts", "(gu_codes, gu_scales, dn_codes, dn_scales) must be set");
    }
    layers.push_back(l);
    auto opt = at::TensorOptions().dtype(at::kHalf);  // fp16 KV cache, as llama.cpp
    kcache.push_back(at::zeros({1, nKV, max_len, D}, opt));
    vcache.push_back(at::zeros({1, nKV, max_len, D}, opt));
  }

  // The kernels the last forward used (or the next one would, before any): for tests and reports.
  std::map<std::string, std::string> kernel_paths() const {
    return {{"isa", kern->name},
            {"attention", attend == mm_attend_portable ? "portable" : kern->vector_isa},
            {"router", kern->router_rows == mm_router_rows_portable ? "portable" : kern->vector_isa},
            {"prefill_attention", mobilemoe_ops::prefill_attention_kernel(D, sdpa_forced)}};
  }

  // ids [T] int64 at positions [start, start+T) -> logits [V] of the last position.
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
      LayerSpec& L = layers[li];
      norm_rows(x, L.input_norm, h);
      prof.stop("norm");
      add_rows(x, attention(li, h, start));
      prof.stop("attn_out_proj");
      norm_rows(x, L.post_norm, h);
      prof.stop("norm");
      add_rows(x, L.moe ? moe(li, h) : dense_ffn(L, h));
      prof.stop(L.moe ? "moe_experts" : "dense_ffn");
    }
    at::Tensor last = at::empty({1, H}, x.options());
    rms_norm_row(x.data_ptr<float>() + (T - 1) * H, final_norm.data_ptr<float>(), last.data_ptr<float>(), H, eps);
    at::Tensor logits = mobilemoe_ops::linear(head, V, H, last).view({V});
    prof.stop("lm_head");
    return logits;
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

  // ---- offloading: routed experts on storage, C cache slots per layer (expert_cache.h) ----------
  void open_expert_store(const std::string& path, bool drop_page_cache) {
    TORCH_CHECK(!cache, "an expert store is already open");
    cache = std::make_unique<mobilemoe_cache::ExpertCache>(path, drop_page_cache);
  }

  // Layer li keeps its routed experts on storage: its expert tensors (given to add_layer) are the
  // C cache slots, record_offsets [E] the byte offset of each expert's record in the store file.
  void offload_layer(int64_t li, const at::Tensor& record_offsets) {
    TORCH_CHECK(cache, "open_expert_store first");
    TORCH_CHECK(li >= 0 && li < (int64_t)layers.size() && layers[li].moe, "layer ", li, " is not an MoE layer");
    LayerSpec& L = layers[li];
    TORCH_CHECK(record_offsets.dim() == 1 && record_offsets.size(0) == E, "record_offsets must be int64 [", E, "]");
    const int64_t C = L.gu_codes.size(0);
    TORCH_CHECK(C >= K && C <= E, "expert cache capacity ", C, " must be in [top_k=", K, ", experts=", E, "]");
    cache->add_layer(li, record_offsets, {L.gu_codes, L.gu_scales, L.dn_codes, L.dn_scales});
    if ((int64_t)offloaded.size() <= li) offloaded.resize(li + 1, false);
    offloaded[li] = true;
  }

  std::map<std::string, double> offload_stats() const {
    const mobilemoe_cache::CacheStats s = cache ? cache->stats() : mobilemoe_cache::CacheStats();
    return {{"hits", (double)s.hits}, {"misses", (double)s.misses}, {"bytes_read", (double)s.bytes_read},
            {"read_seconds", s.read_seconds}};
  }
  void reset_offload_stats() {
    if (cache) cache->reset_stats();
  }

  // Record the chosen experts of every MoE layer ([T, K] per layer per forward call) until turned off.
  void set_record_routing(bool on) {
    record_routing = on;
    routing.clear();
  }
  std::vector<at::Tensor> recorded_routing() const { return routing; }

 private:
  // The current ISA decision's kernels; every forward looks again, so set_isa() governs them.
  void pick_paths() {
    kern = mobilemoe_ops::kernels();
    attend = kern->attend_for(nH / nKV, D);
    prefill_bf16 = !sdpa_forced && mobilemoe_ops::prefill_bf16_available(D);
  }

  // fn(t) for rows t in [0, T): inline for one row (decode), else chunks of `chunk` rows as pool jobs.
  template <typename F>
  static void for_rows(int64_t T, int64_t chunk, const F& fn) {
    if (T == 1) {
      fn(0);
      return;
    }
    parallel_jobs((T + chunk - 1) / chunk, [&](int64_t c) {
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

  // x += y for contiguous fp32 tensors of the same shape: a plain loop (an ATen add_ costs more in
  // dispatch than the add at decode).
  static void add_rows(at::Tensor& x, const at::Tensor& y) {
    TORCH_CHECK(y.is_contiguous() && y.numel() == x.numel(), "residual add: shape mismatch");
    float* xp = x.data_ptr<float>();
    const float* yp = y.data_ptr<float>();
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) xp[i] += yp[i];
  }

  // Embedding rows decoded from the checkpoint's INT4 format (formats.py): value = code * scale,
  // groups of 32 along H, two's-complement nibbles with the even index in the low nibble.
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
  void rope_qknorm_row(const LayerSpec& L, float* row, int64_t pos) const {
    for (int64_t hd = 0; hd < nH + nKV; ++hd) {  // q heads then k heads
      float* v = row + hd * D;
      if (L.rope) rope_head(v, pos);
      if (qk_norm) rms_norm_row(v, nullptr, v, D, eps);
    }
  }

  at::Tensor attention(size_t li, const at::Tensor& h, int64_t start) {
    const LayerSpec& L = layers[li];
    const int64_t T = h.size(0), QO = nH * D, KO = nKV * D;
    at::Tensor qkv = mobilemoe_ops::linear(L.qkv, QO + 2 * KO, H, h);  // [T, QO + 2 KO]
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
    at::Tensor out;
    if (T == 1) {
      out = at::empty({1, QO}, qkv.options());
      mobilemoe_ops::decode_attention(attend, qkv.data_ptr<float>(), reinterpret_cast<const uint16_t*>(kc),
                                      reinterpret_cast<const uint16_t*>(vc), nKV, nH / nKV, D, start + 1, max_len,
                                      out.data_ptr<float>());
    } else {
      out = mobilemoe_ops::prefill_attention(qkv, nKV, nH / nKV, D, kcache[li], vcache[li], start, prefill_bf16);
    }
    prof.stop("attention");
    return mobilemoe_ops::linear(L.o, H, QO, out);
  }

  // One token's routing from its scores s [E]: the top-k of s + bias (selection only; ties to the
  // lower index), weights s of the chosen (renormalised if norm_topk) times the routed scale.
  // k passes of a first-maximum scan (k is small, so this beats a partial sort).
  void select_topk(const LayerSpec& L, const float* s, int64_t* ids, float* w) const {
    thread_local std::vector<float> sel;
    sel.resize(E);
    const float* bp = L.expert_bias.data_ptr<float>();
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

  // Router scores [T, E], chosen experts [T, K] and their combine weights [T, K] for h [T, H].
  std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const LayerSpec& L, const at::Tensor& h) const {
    const int64_t T = h.size(0);
    at::Tensor scores = at::empty({T, E}, h.options());
    at::Tensor ids = at::empty({T, K}, at::TensorOptions().dtype(at::kLong));
    at::Tensor w = at::empty({T, K}, at::TensorOptions().dtype(at::kFloat));
    float* sp = scores.data_ptr<float>();
    int64_t* ip = ids.data_ptr<int64_t>();
    float* wp = w.data_ptr<float>();
    if (T == 1) {  // the ISA's router kernel (ATen's dispatch would cost more than the E x H dots)
      const float* hp = h.data_ptr<float>();
      const float* wr = L.router.data_ptr<float>();
      // two halves on the job pool (a multiple of 4 rows each): the E x H fp32 rows come from DRAM
      const int64_t half = (E / 2 + 3) / 4 * 4;
      parallel_jobs(2, [&](int64_t j) {
        kern->router_rows(hp, wr, H, j ? std::min(half, E) : 0, j ? E : std::min(half, E), sigmoid, sp);
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
      parallel_jobs(nchunks, [&](int64_t c) {
        c10::ParallelGuard inline_ops(true);
        const int64_t r0 = c * chunk, n = std::min(chunk, T - r0);
        at::Tensor logits = at::mm(h.narrow(0, r0, n), L.router.t());
        scores.narrow(0, r0, n).copy_(sigmoid ? logits.sigmoid() : logits.softmax(-1));
        for (int64_t t = r0; t < r0 + n; ++t) select_topk(L, sp + t * E, ip + t * K, wp + t * K);
      });
    }
    return {scores, ids, w};
  }

  at::Tensor moe(size_t li, const at::Tensor& h) {
    const LayerSpec& L = layers[li];
    auto [scores, ids, w] = route(L, h);
    prof.stop("router");
    if (record_routing) routing.push_back(ids.clone());
    if (li < offloaded.size() && offloaded[li]) return moe_offloaded(li, h, ids, w);
    const bool shared = L.ffn_width > 0;
    return mobilemoe_ops::moe(h, ids, w, L.gu_codes, L.gu_scales, L.dn_codes, L.dn_scales, I,
                              shared ? L.ffn_gate_up : no_tensor(), shared ? L.ffn_down : no_tensor(), L.ffn_width);
  }

  // The MoE layer with offloaded experts: the distinct chosen experts in order of first use, in
  // batches of at most C (one batch at decode); each batch runs the fused operator on its slots
  // with the other assignments skipped (id -1). The shared expert runs with the first batch.
  at::Tensor moe_offloaded(size_t li, const at::Tensor& h, const at::Tensor& ids, const at::Tensor& w) {
    const LayerSpec& L = layers[li];
    const int64_t A = ids.numel(), C = cache->capacity((int64_t)li);
    const int64_t* ip = ids.data_ptr<int64_t>();
    std::vector<int64_t> order;
    std::vector<char> seen(E, 0);
    for (int64_t a = 0; a < A; ++a)
      if (!seen[ip[a]]) seen[ip[a]] = 1, order.push_back(ip[a]);
    at::Tensor out;
    at::Tensor local = at::empty_like(ids);
    int64_t* lp = local.data_ptr<int64_t>();
    for (size_t b0 = 0; b0 < order.size(); b0 += C) {
      std::vector<int64_t> batch(order.begin() + b0, order.begin() + std::min(order.size(), b0 + C));
      std::vector<int64_t> slots = cache->fetch((int64_t)li, batch);
      std::vector<int64_t> slot_in_batch(E, -1);
      for (size_t j = 0; j < batch.size(); ++j) slot_in_batch[batch[j]] = slots[j];
      for (int64_t a = 0; a < A; ++a) lp[a] = slot_in_batch[ip[a]];
      prof.stop("expert_io");
      const bool shared = b0 == 0 && L.ffn_width > 0;
      at::Tensor part = mobilemoe_ops::moe(h, local, w, L.gu_codes, L.gu_scales, L.dn_codes, L.dn_scales, I,
                                           shared ? L.ffn_gate_up : no_tensor(), shared ? L.ffn_down : no_tensor(),
                                           shared ? L.ffn_width : 0);
      if (b0 == 0) out = part; else add_rows(out, part);
    }
    return out;
  }

  at::Tensor dense_ffn(const LayerSpec& L, const at::Tensor& h) {
    const int64_t S = L.ffn_width;
    at::Tensor gu = mobilemoe_ops::linear(L.ffn_gate_up, 2 * S, H, h);
    return mobilemoe_ops::linear(L.ffn_down, H, S, mobilemoe_ops::swiglu(gu, S));
  }

  int64_t H, nH, nKV, D, V, E, K, I;
  float eps, scale;
  bool norm_topk, sigmoid, qk_norm;
  int64_t max_len;
  at::Tensor cos_, sin_, embed_q, embed_s, head, final_norm;
  std::vector<LayerSpec> layers;
  std::vector<at::Tensor> kcache, vcache;
  Profiler prof;
  const mm_kernels* kern = nullptr;  // the ISA decision pick_paths() last saw
  mm_attend_fn attend = nullptr;
  bool prefill_bf16 = false;  // prefill attention on the AVX-512 BF16 kernel (else ATen SDPA)
  bool sdpa_forced = false;   // MOBILEMOE_PREFILL_ATTENTION=sdpa at construction
  std::unique_ptr<mobilemoe_cache::ExpertCache> cache;
  std::vector<bool> offloaded;  // layer -> routed experts in `cache`
  bool record_routing = false;
  std::vector<at::Tensor> routing;
};

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

}  // namespace

void register_native_model(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("rms_norm_rows", &rms_norm_rows, "the native RMSNorm of each row (test hook)", py::arg("x"), py::arg("w"),
        py::arg("eps"));
  py::class_<ModelSpec>(m, "ModelSpec", "NativeModel's model-wide shapes and tensors (named fields)")
      .def(py::init<>())
      .def_readwrite("hidden", &ModelSpec::hidden)
      .def_readwrite("n_heads", &ModelSpec::n_heads)
      .def_readwrite("n_kv_heads", &ModelSpec::n_kv_heads)
      .def_readwrite("head_dim", &ModelSpec::head_dim)
      .def_readwrite("vocab", &ModelSpec::vocab)
      .def_readwrite("experts", &ModelSpec::experts)
      .def_readwrite("top_k", &ModelSpec::top_k)
      .def_readwrite("routed_width", &ModelSpec::routed_width)
      .def_readwrite("eps", &ModelSpec::eps)
      .def_readwrite("routed_scale", &ModelSpec::routed_scale)
      .def_readwrite("norm_topk", &ModelSpec::norm_topk)
      .def_readwrite("sigmoid_router", &ModelSpec::sigmoid_router)
      .def_readwrite("qk_norm", &ModelSpec::qk_norm)
      .def_readwrite("max_len", &ModelSpec::max_len)
      .def_readwrite("rope_cos", &ModelSpec::rope_cos)
      .def_readwrite("rope_sin", &ModelSpec::rope_sin)
      .def_readwrite("embed_codes", &ModelSpec::embed_codes)
      .def_readwrite("embed_scales", &ModelSpec::embed_scales)
      .def_readwrite("lm_head", &ModelSpec::lm_head)
      .def_readwrite("final_norm", &ModelSpec::final_norm);
  py::class_<LayerSpec>(m, "LayerSpec", "one decoder layer of a NativeModel (named fields)")
      .def(py::init<>())
      .def_readwrite("input_norm", &LayerSpec::input_norm)
      .def_readwrite("post_norm", &LayerSpec::post_norm)
      .def_readwrite("qkv", &LayerSpec::qkv)
      .def_readwrite("o", &LayerSpec::o)
      .def_readwrite("rope", &LayerSpec::rope)
      .def_readwrite("moe", &LayerSpec::moe)
      .def_readwrite("router", &LayerSpec::router)
      .def_readwrite("expert_bias", &LayerSpec::expert_bias)
      .def_readwrite("gu_codes", &LayerSpec::gu_codes)
      .def_readwrite("gu_scales", &LayerSpec::gu_scales)
      .def_readwrite("dn_codes", &LayerSpec::dn_codes)
      .def_readwrite("dn_scales", &LayerSpec::dn_scales)
      .def_readwrite("ffn_gate_up", &LayerSpec::ffn_gate_up)
      .def_readwrite("ffn_down", &LayerSpec::ffn_down)
      .def_readwrite("ffn_width", &LayerSpec::ffn_width);
  py::class_<NativeModel>(m, "NativeModel")
      .def(py::init<const ModelSpec&>(), py::arg("spec"))
      .def("add_layer", &NativeModel::add_layer, py::arg("layer"))
      .def("forward", &NativeModel::forward, py::call_guard<py::gil_scoped_release>())
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
