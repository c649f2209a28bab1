// The ISA registry and the cached decision declared in dispatch.h.
#include "dispatch.h"

#include <torch/extension.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include "amx.h"
#endif
#if defined(__aarch64__)
#include "arm_features.h"
#endif

namespace mobilemoe_api {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
bool avx2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
// AMX needs the CPU (CPUID, XCR0) and the kernel's permission for the tile state (arch_prctl,
// requested once); where either is missing the avx512 entry below is the best.
bool amx_supported() { return avx512_supported() && mm_amx_enable(); }  // enable checks CPUID/XCR0 first
#endif
bool always_supported() { return true; }

struct Entry {
  IsaChoice choice;
  bool (*supported)();
};

// Best first: with nothing forced, the first supported entry wins.
const Entry kRegistry[] = {
#if defined(__x86_64__) || defined(_M_X64)
    {{Isa::amx, "amx", &mm_kernels_amx}, amx_supported},
    {{Isa::avx512, "avx512", &mm_kernels_avx512}, avx512_supported},
    {{Isa::avx2, "avx2", &mm_kernels_avx2}, avx2_supported},
#endif
#if defined(__aarch64__)
    {{Isa::i8mm, "i8mm", &mm_kernels_i8mm}, mm_arm_i8mm_supported},
    {{Isa::dotprod, "dotprod", &mm_kernels_dotprod}, mm_arm_dotprod_supported},
    {{Isa::neon, "neon", &mm_kernels_neon}, mm_arm_neon_supported},
#endif
    {{Isa::portable, "portable", &mm_kernels_portable}, always_supported},
};

std::atomic<int> g_forced{-1};                    // registry index forced by set_isa, -1 = none
std::atomic<const IsaChoice*> g_current{nullptr};  // the cached decision

std::string registry_names() {
  std::string names;
  for (const Entry& e : kRegistry) names += std::string(e.choice.name) + ", ";
  return names + "auto";
}

// The registry index of `name` if this CPU can run it; throws naming what went wrong.
int supported_index(const std::string& name, const char* origin) {
  for (int i = 0; i < static_cast<int>(std::size(kRegistry)); ++i) {
    if (name != kRegistry[i].choice.name) continue;
    TORCH_CHECK(kRegistry[i].supported(), "mobilemoe kernels: ISA '", name, "' (", origin,
                ") is not supported by this CPU");
    return i;
  }
  TORCH_CHECK(false, "mobilemoe kernels: unknown ISA '", name, "' (", origin, "; this build has ",
              registry_names(), ")");
  return -1;
}

const IsaChoice* resolve() {
  const int forced = g_forced.load();
  if (forced >= 0) return &kRegistry[forced].choice;
  const char* env = std::getenv("MOBILEMOE_KERNEL_ISA");
  if (env && *env && std::strcmp(env, "auto") != 0)
    return &kRegistry[supported_index(env, "MOBILEMOE_KERNEL_ISA")].choice;
  for (const Entry& e : kRegistry)
    if (e.supported()) return &e.choice;
  return &kRegistry[std::size(kRegistry) - 1].choice;  // portable: always supported
}

}  // namespace

const IsaChoice& current_isa() {
  const IsaChoice* c = g_current.load(std::memory_order_acquire);
  if (c == nullptr) {  // two threads may both resolve here; they store the same answer
    c = resolve();
    g_current.store(c, std::memory_order_release);
  }
  return *c;
}

void set_isa(const std::string& name) {
  g_forced.store(name.empty() || name == "auto" ? -1 : supported_index(name, "set_isa"));
  g_current.store(nullptr, std::memory_order_release);
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const Entry& e : kRegistry)
    if (e.supported()) names.push_back(e.choice.name);
  return names;
}

}  // namespace mobilemoe_api
