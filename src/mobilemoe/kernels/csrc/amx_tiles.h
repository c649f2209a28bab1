// AMX tile plumbing shared by the AMX units (isa_amx.cpp: prefill GEMMs; isa_amx_attention.cpp:
// prefill attention). Header-only, inline asm and static functions: nothing here is a symbol, and
// nothing runs unless the caller checked mm_amx_enable() (amx.h) first.
#pragma once
#include <stdint.h>
#include <string.h>

// Tile loads / stores and the configuration load with their memory accesses declared. GCC 12's
// intrinsics declare none for tileloadd / tilestored and only 8 bytes for ldtilecfg, so at -O2 it
// dropped stores the tiles then read (converted operands, most of the config) and tilezero raised
// SIGILL; a tile store the compiler does not see could likewise be moved past the vector reads of it.
#define MM_TILE_LOADD(t, base, stride)                                                  \
  __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm" #t "|tileloadd\t%%tmm" #t ", [%0+%1*1]}" \
                   ::"r"((const void*)(base)), "r"((long)(stride))                    \
                   : "memory")
#define MM_TILE_STORED(t, base, stride)                                                   \
  __asm__ volatile("{tilestored\t%%tmm" #t ", (%0,%1,1)|tilestored\t[%0+%1*1], %%tmm" #t "}" \
                   ::"r"((void*)(base)), "r"((long)(stride))                                \
                   : "memory")

// 64-byte LDTILECFG operand (palette 1).
struct alignas(64) MmTileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-7 all 16 rows x 64 bytes: C 16 rows x 16 fp32, A 16 rows x 32 bf16, B 16 k-pairs x
// (16 columns x 2 bf16). Tails are zero-padded (or repeated) in memory instead, so one
// configuration serves every kernel. Per call: a thread's tile configuration is its own (job-pool
// helpers never ran ldtilecfg) and other code (oneDNN) may have loaded another in between.
static inline void mm_amx_load_config(void) {
  MmTileConfig c;
  memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int i = 0; i < 8; ++i) c.rows[i] = 16, c.colsb[i] = 64;
  __asm__ volatile("ldtilecfg\t%X0" ::"m"(c) : "memory");
}
