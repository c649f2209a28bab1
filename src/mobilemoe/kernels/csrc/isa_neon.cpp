// aarch64 "neon" kernel table (mm_kernels_neon), compiled with -march=armv8-a (see neon_kernels.h).
// Only called after arm_features.h says the CPU has the extension.
#define MM_NEON_LEVEL 0
#include "neon_kernels.h"
