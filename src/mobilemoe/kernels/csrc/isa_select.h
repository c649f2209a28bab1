// The single ISA decision shared by ops.cpp (matmuls, SwiGLU) and model.cpp (decode attention,
// router, BF16 prefill attention). Defined in ops.cpp.
#pragma once

namespace mobilemoe_api {
enum class Isa { avx512, avx2, portable };
// The ISA every kernel uses now: set_isa() > MOBILEMOE_KERNEL_ISA > best the CPU supports (throws
// on an unknown or unsupported choice). Resolved on each call, so set_isa() also governs a
// NativeModel built before it.
Isa current_isa();
}  // namespace mobilemoe_api
