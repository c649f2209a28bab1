// Attention over the fp16 KV cache (ops.h): decode (one query position, the ISA unit's kernel per KV
// group) and causal prefill (the AVX-512 BF16 kernel of flash_attn.h where the CPU has it, else
// ATen's fp32 SDPA; on ISA amx its AMX-BF16 twin), plus the test hooks that run one KV head through them.
#include "ops.h"

#include <c10/util/ParallelGuard.h>

#include <optional>

#include "amx.h"
#include "dispatch.h"
#include "flash_attn.h"
#include "thread_pool.h"

namespace mobilemoe_ops {

using mobilemoe_threads::parallel_jobs;

bool prefill_bf16_available(int64_t D) {
#if defined(__x86_64__) && defined(__GNUC__)
  return mobilemoe_api::uses_avx512(mobilemoe_api::current_isa().isa) && __builtin_cpu_supports("avx512bf16") &&
         mm_attn_supports_bf16(D);
#else
  (void)D;
  return false;
#endif
}

bool prefill_amx_available(int64_t D) {
#if defined(__x86_64__) && defined(__GNUC__)
  return mobilemoe_api::current_isa().isa == mobilemoe_api::Isa::amx && prefill_bf16_available(D) &&
         mm_attn_supports_amx(D) && mm_amx_enable();
#else
  (void)D;
  return false;
#endif
}

const char* prefill_attention_kernel(int64_t D, bool sdpa_forced) {
  if (sdpa_forced || !prefill_bf16_available(D)) return "sdpa";
  return prefill_amx_available(D) ? "amx-bf16" : "avx512bf16";
}

void decode_attention(mm_attend_fn attend, const float* q, const uint16_t* kcache, const uint16_t* vcache,
                      int64_t nKV, int64_t G, int64_t D, int64_t S, int64_t max_len, float* out) {
  std::vector<float> scores(nKV * G * S);
  parallel_jobs(nKV, [&](int64_t g) {
    attend(q + g * G * D, kcache + g * max_len * D, vcache + g * max_len * D, S, D, G, scores.data() + g * G * S,
           out + g * G * D);
  });
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
    parallel_jobs(nKV, [&](int64_t g) {
      mm_attn_pack_kv_bf16(kc + g * max_len * D, vc + g * max_len * D, S, D, kpp + g * Sp * D, vpp + g * Sp * D);
    });
    const auto rows = prefill_amx_available(D) ? mm_attn_rows_amx : mm_attn_rows_bf16;
    const int64_t tile = std::max<int64_t>(1, MM_ATTN_MAX_ROWS / G), ntiles = (T + tile - 1) / tile;
    const int64_t npairs = (ntiles + 1) / 2, W = qkv.size(1);
    const float* qp = qkv.data_ptr<float>();
    float* op = out.data_ptr<float>();
    parallel_jobs(nKV * npairs, [&](int64_t j) {
      const int64_t g = j / npairs, i = j % npairs;
      for (int64_t ti : {i, ntiles - 1 - i}) {
        rows(qp + g * G * D, W, ti * tile, std::min(T, (ti + 1) * tile), G, D, start,
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
  parallel_jobs(nKV, [&](int64_t g) {
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

// One KV head's decode attention with the current ISA's kernel (or the portable one), for the
// tests: q [G, D] fp32, k and v [S, D] fp16 -> [G, D] = softmax(q k^T / sqrt(D)) v.
at::Tensor attend_kv_head(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool portable) {
  TORCH_CHECK(q.dtype() == at::kFloat && q.dim() == 2 && q.is_contiguous(), "q must be contiguous float32 [G, D]");
  const int64_t G = q.size(0), D = q.size(1);
  TORCH_CHECK(k.dtype() == at::kHalf && v.dtype() == at::kHalf && k.dim() == 2 && k.is_contiguous() &&
                  v.is_contiguous() && k.sizes() == v.sizes() && k.size(1) == D && k.size(0) > 0,
              "k and v must be contiguous float16 [S, D] with S > 0");
  const int64_t S = k.size(0);
  mm_attend_fn f = portable ? mm_attend_portable : kernels()->attend_for(G, D);
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

}  // namespace mobilemoe_ops
