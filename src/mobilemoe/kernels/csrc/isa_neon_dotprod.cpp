// aarch64 "dotprod" kernel table (mm_kernels_dotprod), compiled with -march=armv8.2-a+dotprod (see neon_kernels.h).
// Only called after arm_features.h says the CPU has the extension.
#define MM_NEON_LEVEL 1
#include "neon_kernels.h"
