// The packed INT4 linear operator and the row helpers both operators use (ops.h).
#include "ops.h"

#include "dispatch.h"
#include "thread_pool.h"

namespace mobilemoe_ops {

using mobilemoe_threads::run_jobs;
using mobilemoe_threads::run_row_jobs;
using mobilemoe_threads::workers_for;

const mm_kernels* kernels() { return mobilemoe_api::current_isa().kernels; }

void quantize_rows(const mm_kernels* k, const float* x, int64_t M, int64_t K, QAct& out) {
  const int64_t nkb = K / MM_QK;
  out.q.resize(M * K);
  out.d.resize(M * nkb);
  out.s.resize(M * nkb);
  run_row_jobs(M, 16, 8.0 * M * K, [&](int64_t r) {
    k->quant_row(x + r * K, K, out.q.data() + r * K, out.d.data() + r * nkb, out.s.data() + r * nkb);
  });
}

void check_packed_linear(const at::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK(packed.dtype() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "packed linear weight must be a contiguous uint8 [tiles, tile_stride] tensor");
  TORCH_CHECK(K % MM_QK == 0 && K > 0, "in_features must be a positive multiple of 32, got ", K);
  TORCH_CHECK(packed.size(0) == (N + MM_TILE - 1) / MM_TILE, "packed weight has ", packed.size(0),
              " tiles, expected ", (N + MM_TILE - 1) / MM_TILE, " for ", N, " rows");
  TORCH_CHECK(packed.size(1) >= (K / MM_QK) * (MM_BLOCK_BYTES + 2 * MM_TILE), "packed tile stride too small");
}

namespace {

// Linear jobs: tile blocks x token chunks (chunk-major so concurrent jobs share activations).
void linear_jobs(const mm_kernels* k, const uint8_t* W, int64_t tile_stride, int64_t N, int64_t K, const QAct& a,
                 int64_t M, float* out, int64_t ldo) {
  const int64_t nkb = K / MM_QK;
  const int64_t ntiles = (N + MM_TILE - 1) / MM_TILE;
  const int64_t tb_tiles = linear_tile_block(k, M, ntiles);
  const int64_t ntb = (ntiles + tb_tiles - 1) / tb_tiles;
  const int64_t nch = (M + TOKEN_CHUNK - 1) / TOKEN_CHUNK;
  const int64_t njobs = ntb * nch;
  const double work = (double)ntiles * tile_stride + (double)M * N * K / 12.0;
  run_jobs(njobs, workers_for(njobs, work), [&](int64_t j, int) {
    const int64_t c = j / ntb, tb = j % ntb;
    const int64_t m0 = c * TOKEN_CHUNK, m1 = std::min(M, m0 + TOKEN_CHUNK);
    const int64_t t0 = tb * tb_tiles, t1 = std::min(ntiles, t0 + tb_tiles);
    k->gemm(W, tile_stride, nkb, 1, t0, t1, a.q.data() + m0 * K, a.d.data() + m0 * nkb, a.s.data() + m0 * nkb,
            m1 - m0, out + m0 * ldo, ldo, N);
  });
}

}  // namespace

at::Tensor linear(const at::Tensor& packed, int64_t N, int64_t K, const at::Tensor& x) {
  check_packed_linear(packed, N, K);
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) == K && x.is_contiguous(),
              "x must be a contiguous float32 [M, ", K, "] tensor");
  const mm_kernels* k = kernels();
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  QAct a;
  quantize_rows(k, x.data_ptr<float>(), M, K, a);
  linear_jobs(k, packed.data_ptr<uint8_t>(), packed.size(1), N, K, a, M, out.data_ptr<float>(), N);
  return out;
}

// Large inputs in row slices of ~16K values spread over the job pool.
void swiglu_into(const mm_kernels* k, const float* gu, int64_t M, int64_t W, float* out) {
  run_row_jobs(M, std::max<int64_t>(1, 16384 / W), 24.0 * M * W, [&](int64_t r) {
    k->silu_mul(gu + r * 2 * W, gu + r * 2 * W + W, out + r * W, W);
  });
}

at::Tensor swiglu(const at::Tensor& gu, int64_t W) {
  TORCH_CHECK(gu.dtype() == at::kFloat && gu.dim() == 2 && gu.size(1) == 2 * W && gu.is_contiguous(),
              "swiglu expects a contiguous float32 [M, 2W] tensor");
  at::Tensor h = at::empty({gu.size(0), W}, gu.options());
  swiglu_into(kernels(), gu.data_ptr<float>(), gu.size(0), W, h.data_ptr<float>());
  return h;
}

}  // namespace mobilemoe_ops
