// aarch64 "i8mm" kernel table (mm_kernels_i8mm), compiled with -march=armv8.2-a+dotprod+i8mm (see neon_kernels.h).
// Only called after arm_features.h says the CPU has the extension.
#define MM_NEON_LEVEL 2
#include "neon_kernels.h"
