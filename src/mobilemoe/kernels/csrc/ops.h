// The operators: linear on packed INT4 weights (op_linear.cpp), routed experts and the fused MoE
// layer (op_moe.cpp), attention over the fp16 KV cache (op_attention.cpp). Checked ATen-tensor entry
// points over the current ISA's kernel table (dispatch.h), run on the kernels' job pool
// (thread_pool.h).
#pragma once
#include <torch/extension.h>

#include <vector>

#include "mm_common.h"

namespace mobilemoe_ops {

constexpr int64_t TOKEN_CHUNK = 128;  // tokens per job: the activations of a chunk stay in L2
constexpr int64_t TILE_BLOCK = 4;    // 16-row tiles per linear job (unless the kernels ask for more)

// 16-row tiles per linear job for M tokens over `ntiles` tiles: the kernels' gemm_tile_block from
// their prefill_min_m tokens on (halved while that would leave fewer than 4 jobs per thread), else
// TILE_BLOCK (decode keeps its job shapes).
inline int64_t linear_tile_block(const mm_kernels* k, int64_t M, int64_t ntiles) {
  int64_t tb = TILE_BLOCK;
  if (k->gemm_tile_block > TILE_BLOCK && M >= k->prefill_min_m) {
    const int64_t nch = (M + TOKEN_CHUNK - 1) / TOKEN_CHUNK, want = 4 * (int64_t)at::get_num_threads();
    tb = k->gemm_tile_block;
    while (tb > TILE_BLOCK && nch * ((ntiles + tb - 1) / tb) < want) tb /= 2;
    if (tb < TILE_BLOCK) tb = TILE_BLOCK;
  }
  return tb;
}

// The current ISA's kernel table (dispatch.h's cached decision).
const mm_kernels* kernels();

// y[M, N] = x[M, K] @ dequant(W).T on a packed linear weight [tiles, tile_stride] (x contiguous fp32).
at::Tensor linear(const at::Tensor& packed, int64_t N, int64_t K, const at::Tensor& x);
// y[M, out] = x[M, in] @ dequant(W[e]) on packed stacked experts (codes, scale rows).
at::Tensor expert_forward(const at::Tensor& codes, const at::Tensor& scales, int64_t in, int64_t out, int64_t e,
                          const at::Tensor& x);
// The fused MoE layer: x [T, H]; ids/weights [T, k] (id -1 skips an assignment); routed experts
// gate_up [E, H, 2I] and down [E, I, H] (packed); the shared SwiGLU's fused gate|up [2S, H] and down
// [H, S] packed linears, S = 0 for none.
at::Tensor moe(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gu_codes,
               const at::Tensor& gu_scales, const at::Tensor& dn_codes, const at::Tensor& dn_scales, int64_t I,
               const at::Tensor& sh_gu, const at::Tensor& sh_dn, int64_t S);
// [M, 2W] -> [M, W]: silu(gate) * up.
at::Tensor swiglu(const at::Tensor& gu, int64_t W);

// ---- attention (op_attention.cpp) ---------------------------------------------------------------
// Whether causal prefill attention can use the AVX-512 BF16 kernel for head width D under the
// current ISA decision.
bool prefill_bf16_available(int64_t D);
// Whether that prefill attention runs on AMX-BF16 tiles (ISA amx, tiles granted, D in 32/64/128).
bool prefill_amx_available(int64_t D);
// The prefill attention kernel a model with head_dim D uses now: "amx-bf16", "avx512bf16" or "sdpa".
const char* prefill_attention_kernel(int64_t D, bool sdpa_forced);
// One query position: q [nKV * G, D] fp32 against positions [0, S) of caches [nKV, max_len, D]
// fp16 -> out [nKV * G, D], KV groups as pool jobs.
void decode_attention(mm_attend_fn attend, const float* q, const uint16_t* kcache, const uint16_t* vcache,
                      int64_t nKV, int64_t G, int64_t D, int64_t S, int64_t max_len, float* out);
// T new positions [start, start + T): qkv [T, W] fp32 rows whose first nKV*G*D columns are the query
// heads, caches [1, nKV, max_len, D] fp16 holding positions [0, start + T) -> [T, nKV*G*D].
at::Tensor prefill_attention(const at::Tensor& qkv, int64_t nKV, int64_t G, int64_t D, const at::Tensor& kcache,
                             const at::Tensor& vcache, int64_t start, bool bf16);
// Test hooks: one KV head through decode_attention's kernel (or the portable one) and prefill.
at::Tensor attend_kv_head(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool portable);
at::Tensor prefill_attend_kv_head(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t G,
                                  int64_t start, bool bf16);

// ---- shared by the operator units ----------------------------------------------------------
struct QAct {  // int8 activations of rows x [M, K] (Q8_0 per block of 32: codes, scale, 8 * sum)
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s;
};
void quantize_rows(const mm_kernels* k, const float* x, int64_t M, int64_t K, QAct& out);
void check_packed_linear(const at::Tensor& packed, int64_t N, int64_t K);
// rows [M, 2W] fp32 -> out [M, W]: silu(first half) * second half.
void swiglu_into(const mm_kernels* k, const float* gu, int64_t M, int64_t W, float* out);

}  // namespace mobilemoe_ops
