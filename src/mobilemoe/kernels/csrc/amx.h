// AMX-BF16 entry points (isa_amx.cpp, x86-64 only). Torch-free, like mm_common.h.
//
// AMX tile data is an XSAVE feature the kernel hands out per process on request
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); without it the first tile instruction
// raises SIGILL. And every thread has its own tile configuration: a thread that never ran
// ldtilecfg also gets SIGILL. mm_kernels_amx.gemm therefore (1) uses tiles only after
// mm_amx_enable() succeeded in this process (else it runs the AVX-512 VNNI gemm) and (2) loads its
// tile configuration at the start of every call and releases the tiles at its end, so any thread
// (job-pool helpers included) may call it and no tile state outlives a call. The same holds for
// its expert_gemm_bf16 entry (which, where tiles are refused, computes the same bf16 products with
// scalar code: it has no int8 activations to give the VNNI gemm).
#pragma once
#include "mm_common.h"

#if defined(__x86_64__) || defined(_M_X64)
#ifdef __cplusplus
extern "C" {
#endif
// CPUID says the CPU has AMX-TILE, AMX-BF16 and AVX512-BF16 and the OS enabled tile state in XCR0.
// Safe to call on any x86-64 CPU (uses no AMX instruction).
int mm_amx_cpu_has(void);
// mm_amx_cpu_has() and the process holds (or was just granted) permission for tile data.
// Requests it at most once per process (thread-safe; later calls return the cached answer);
// returns 1 when AMX may be used, 0 when it is refused or unavailable (never crashes).
int mm_amx_enable(void);
#ifdef __cplusplus
}
#endif

// gemm on AMX tiles for m >= MM_AMX_MIN_M tokens (once mm_amx_enable() returned 1), else
// mm_kernels_avx512.gemm; the optional prefill entries (mm_common.h: wider linear calls, routed
// experts on bf16 rows) are its own; every other entry is the AVX-512 one.
extern const mm_kernels mm_kernels_amx;
#endif
