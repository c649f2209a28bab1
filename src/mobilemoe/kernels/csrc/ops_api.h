// The kernels of ops.cpp that other translation units (model.cpp) call. Defined at the end of ops.cpp.
#pragma once
#include <torch/extension.h>

#include <functional>

namespace mobilemoe_api {
// y[M, N] = x[M, K] @ dequant(W).T on a packed linear weight (x contiguous fp32).
at::Tensor linear(const at::Tensor& packed, int64_t N, int64_t K, const at::Tensor& x);
// The fused MoE layer (routed experts + optional shared SwiGLU; S = 0 for none).
at::Tensor moe(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gu_codes,
               const at::Tensor& gu_scales, const at::Tensor& dn_codes, const at::Tensor& dn_scales, int64_t I,
               const at::Tensor& sh_gu, const at::Tensor& sh_dn, int64_t S);
// [M, 2W] -> [M, W]: silu(gate) * up (the ISA's vectorized exp; row slices on the job pool).
at::Tensor swiglu(const at::Tensor& gu, int64_t W);
// Run fn(job) for job in [0, njobs) on the kernels' job pool (the same threads as the matmuls, so
// no second pool spins against them).
void parallel_jobs(int64_t njobs, const std::function<void(int64_t)>& fn);
}  // namespace mobilemoe_api

void register_native_model(pybind11::module_& m);  // model.cpp
