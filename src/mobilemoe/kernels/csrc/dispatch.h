// The one ISA decision of every kernel: the matmuls, SwiGLU, MoE, attention and router of the
// operators (ops.h) and the model. Defined in dispatch.cpp; adding an ISA is one registry entry
// there plus its unit in setup.py.
#pragma once
#include <string>
#include <vector>

#include "mm_common.h"

namespace mobilemoe_api {
enum class Isa { amx, avx512, avx2, i8mm, dotprod, neon, portable };

struct IsaChoice {
  Isa isa;
  const char* name;
  const mm_kernels* kernels;  // the ISA unit's kernel table (mm_common.h)
};

// The ISA every kernel uses now: set_isa() > MOBILEMOE_KERNEL_ISA > the best this CPU and build
// support. Resolved at the first call and cached (one atomic load per call after that); set_isa(),
// "auto" included, drops the cache, so the environment variable is read again then. Throws on an
// unknown or unsupported choice.
const IsaChoice& current_isa();
// Force an ISA by name ("" or "auto": back to MOBILEMOE_KERNEL_ISA / best). Throws if unsupported.
void set_isa(const std::string& name);
// The ISAs this CPU and build can run, best first.
std::vector<std::string> available_isas();
// Whether the AVX-512 (BF16) prefill attention may run (amx is avx512 with the prefill GEMMs on
// AMX tiles).
inline bool uses_avx512(Isa isa) { return isa == Isa::amx || isa == Isa::avx512; }
}  // namespace mobilemoe_api
