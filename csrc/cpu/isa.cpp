// Run-time choice of the instruction set for the kernels' multi-ISA loops (common.h).
#include <cstdlib>
#include <string>

#include "common.h"

namespace din_ops {
namespace cpu {

Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBase;
#ifdef DIN_OPS_MULTI_ISA
    // libgcc's checks include the OS's XSAVE support, not only CPUID
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      best = Isa::kAvx512;
#endif
    if (const char* cap = std::getenv("DIN_OPS_CPU_ISA")) {
      const std::string s(cap);
      if (s == "base" || s == "baseline") best = Isa::kBase;
      if (s == "avx2" && best == Isa::kAvx512) best = Isa::kAvx2;
    }
    return best;
  }();
  return isa;
}

bool cpu_avx512_bf16() {
  static const bool ok = [] {
    if (cpu_isa() != Isa::kAvx512) return false;
    const char* cap = std::getenv("DIN_OPS_CPU_ISA");
    if (cap && std::string(cap) == "avx512") return false;
#ifdef DIN_OPS_MULTI_ISA
    return __builtin_cpu_supports("avx512bf16") != 0;
#else
    return false;
#endif
  }();
  return ok;
}

bool cpu_fast_bf16_dot() {
  static const bool ok = [] {
    if (!cpu_avx512_bf16()) return false;
#ifdef DIN_OPS_MULTI_ISA
    return __builtin_cpu_is("amd") != 0;
#else
    return false;
#endif
  }();
  return ok;
}

}  // namespace cpu
}  // namespace din_ops
