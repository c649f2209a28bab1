// mobilemoe._C: the Python bindings of the ISA decision (dispatch.h), the operators (ops.h), the
// expert cache (expert_cache.h) and the native model (model.cpp).
#include <torch/extension.h>

#include "dispatch.h"
#include "expert_cache.h"
#include "ops.h"

void register_native_model(pybind11::module_& m);  // model.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace mobilemoe_ops;
  m.doc() = "mobilemoe native INT4 (mobilemoe-int4-g32) CPU kernels";
  m.def("available_isas", &mobilemoe_api::available_isas, "ISAs this CPU can run, best first");
  m.def(
      "active_isa", [] { return std::string(mobilemoe_api::current_isa().name); },
      "ISA the next call will use (set_isa > MOBILEMOE_KERNEL_ISA > best)");
  m.def("set_isa", &mobilemoe_api::set_isa, "force an ISA ('' or 'auto' = env var / best; drops the cached choice)");
  m.def("linear_forward", &linear, "y[M,N] = x[M,K] @ W.T on a packed linear weight");
  m.def("expert_forward", &expert_forward, "y[M,out] = x[M,in] @ W[e] on packed stacked experts");
  m.def("moe_forward", &moe, "fused MoE layer (routed experts + optional shared SwiGLU)");
  m.def("prefill_bf16_available", &prefill_bf16_available, "whether prefill attention can use the AVX-512 BF16 kernel");
  m.def("prefill_amx_available", &prefill_amx_available, "whether prefill attention runs on AMX-BF16 tiles (ISA amx)");
  m.def("attend_kv_head", &attend_kv_head, "one KV head's decode attention (test hook)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("portable") = false);
  m.def("prefill_attend_kv_head", &prefill_attend_kv_head, "one KV head's causal prefill attention (test hook)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("G"), py::arg("start"), py::arg("bf16"));
  mobilemoe_cache::register_expert_cache(m);
  register_native_model(m);
}
