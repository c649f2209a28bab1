// Prefill attention on AVX-512 BF16 (isa_avx512bf16.cpp) or AMX-BF16 tiles (isa_amx_attention.cpp): causal, one KV head at a time, flash style
// (key blocks with an online softmax, so no [T, S] score matrix). Torch-free, like mm_common.h.
//
// The fp16 KV cache of one KV head is first packed to bf16 for the dot-product instruction
// vdpbf16ps, which multiplies adjacent bf16 pairs along the reduction axis:
//   keys   kp: [S/64 blocks][D/2][64 keys] of 32-bit (k[j][2i], k[j][2i+1]) pairs  (reduce over d)
//   values vp: [S/2][D]                   of 32-bit (v[2i][d], v[2i+1][d]) pairs   (reduce over keys)
// S padded to a multiple of MM_ATTN_KEY_BLOCK with zeros (those keys are always masked).
// Scores accumulate in fp32 from bf16 q and k; the probabilities are rounded to bf16 for p.v and
// the output accumulates in fp32: about 3 significant digits, like any bf16 attention.
#pragma once
#include <stdint.h>

#define MM_ATTN_KEY_BLOCK 64
#define MM_ATTN_MAX_ROWS 128  // query rows (positions x heads of the group) per mm_attn_rows_bf16 call

#ifdef __cplusplus
extern "C" {
#endif

// Keys rounded up to whole key blocks: the packed buffers hold padded_keys * D bf16 values each.
static inline int64_t mm_attn_padded_keys(int64_t S) {
  return (S + MM_ATTN_KEY_BLOCK - 1) / MM_ATTN_KEY_BLOCK * MM_ATTN_KEY_BLOCK;
}

// Whether the kernel has an instance for head_dim D (16, 32, 48, 64, 128).
int mm_attn_supports_bf16(int64_t D);

// k, v: [S, D] fp16 rows of one KV head -> kp, vp (layouts above, mm_attn_padded_keys(S) * D bf16 each).
void mm_attn_pack_kv_bf16(const uint16_t* k, const uint16_t* v, int64_t S, int64_t D, uint16_t* kp, uint16_t* vp);

// Query positions [t0, t1) of a chunk that starts at absolute position `start`, G heads each: head h
// of position t is q[t * q_stride + h * D] (fp32), attends keys 0..start+t, and its output goes to
// out[t * out_stride + h * D]. Requires (t1 - t0) * G <= MM_ATTN_MAX_ROWS.
void mm_attn_rows_bf16(const float* q, int64_t q_stride, int64_t t0, int64_t t1, int64_t G, int64_t D,
                       int64_t start, const uint16_t* kp, const uint16_t* vp, float* out, int64_t out_stride);

// The same on AMX-BF16 tiles (isa_amx_attention.cpp, x86-64 only): same packed kp / vp, same
// roundings, only the fp32 summation order differs. For head dims filling whole 32-bf16 A tiles
// (32, 64, 128), and only after mm_amx_enable() (amx.h) returned 1.
int mm_attn_supports_amx(int64_t D);
void mm_attn_rows_amx(const float* q, int64_t q_stride, int64_t t0, int64_t t1, int64_t G, int64_t D,
                      int64_t start, const uint16_t* kp, const uint16_t* vp, float* out, int64_t out_stride);

#ifdef __cplusplus
}
#endif
