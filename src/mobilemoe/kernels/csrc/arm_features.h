// Runtime CPU feature detection for the aarch64 kernel tables (isa_neon*.cpp, neon_kernels.h).
//
// The NEON units are compiled with their own -march (dotprod / i8mm) and may only run after these
// checks: Linux and Android read the kernel's hardware capabilities (getauxval AT_HWCAP/AT_HWCAP2),
// macOS asks sysctl (hw.optional.arm.FEAT_*). Elsewhere only the NEON baseline (mandatory in AArch64)
// is reported. Each check has the registry's bool(*)() shape; all are static inline (no shared symbol).
//
// `dotprod` needs SDOT; `i8mm` needs SMMLA and, since its unit also uses SDOT for an odd token, SDOT.
#pragma once

#if defined(__aarch64__)
#include "mm_common.h"

#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#include <sys/types.h>
#endif

extern const mm_kernels mm_kernels_neon;     // isa_neon.cpp          -march=armv8-a
extern const mm_kernels mm_kernels_dotprod;  // isa_neon_dotprod.cpp  -march=armv8.2-a+dotprod
extern const mm_kernels mm_kernels_i8mm;     // isa_neon_i8mm.cpp     -march=armv8.2-a+dotprod+i8mm

#if defined(__APPLE__)
// 1 when the sysctl exists and is non-zero (older macOS releases lack the FEAT_* names: 0).
static inline bool mm_arm_sysctl_flag(const char* name) {
  int v = 0;
  size_t len = sizeof(v);
  return sysctlbyname(name, &v, &len, NULL, 0) == 0 && v != 0;
}
#endif

static inline bool mm_arm_neon_supported() { return true; }  // Advanced SIMD is part of AArch64

static inline bool mm_arm_dotprod_supported() {
#if defined(__linux__)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
  return mm_arm_sysctl_flag("hw.optional.arm.FEAT_DotProd");
#else
  return false;
#endif
}

static inline bool mm_arm_i8mm_supported() {
  if (!mm_arm_dotprod_supported()) return false;
#if defined(__linux__)
  return (getauxval(AT_HWCAP2) & HWCAP2_I8MM) != 0;
#elif defined(__APPLE__)
  return mm_arm_sysctl_flag("hw.optional.arm.FEAT_I8MM");
#else
  return false;
#endif
}

// The best table this CPU runs (the auto choice when neither set_isa nor MOBILEMOE_KERNEL_ISA decides).
static inline const mm_kernels* mm_arm_best_kernels() {
  if (mm_arm_i8mm_supported()) return &mm_kernels_i8mm;
  if (mm_arm_dotprod_supported()) return &mm_kernels_dotprod;
  return &mm_kernels_neon;
}
#endif  // __aarch64__
