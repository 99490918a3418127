// Choosing the ISA clone: CPU features, FASTLVM_ISA, and the selection in use.
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace fastlvm {

namespace {

std::atomic<int> current{int(Isa::generic)};

const Isa kAll[] = {Isa::generic, Isa::avx2, Isa::avx512};

bool cpu_has(Isa isa) {
#if FASTLVM_ISA_CLONES
  __builtin_cpu_init();
  switch (isa) {
    case Isa::generic: return true;
    case Isa::avx2: return __builtin_cpu_supports("x86-64-v3");
    case Isa::avx512: return __builtin_cpu_supports("x86-64-v4");
  }
  return false;
#else
  return isa == Isa::generic;
#endif
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    default:
#if FASTLVM_ISA_CLONES
      return "generic";
#elif defined(FASTLVM_NATIVE)
      return "native";  // the one build, compiled for the build machine (-march=native)
#else
      return "generic";
#endif
  }
}

std::vector<Isa> isa_compiled() {
#if FASTLVM_ISA_CLONES
  return {kAll, kAll + 3};
#else
  return {Isa::generic};
#endif
}

bool isa_supported(Isa isa) {
  for (Isa c : isa_compiled())
    if (c == isa) return cpu_has(isa);
  return false;
}

Isa isa_best() {
  Isa best = Isa::generic;
  for (Isa c : isa_compiled())
    if (cpu_has(c)) best = c;
  return best;
}

Isa isa_current() { return Isa(current.load()); }

std::string isa_select(const std::string& name) {
  for (Isa isa : kAll) {
    if (name != isa_name(isa) && !(isa == Isa::generic && name == "generic")) continue;
    bool built = false;
    for (Isa c : isa_compiled()) built |= c == isa;
    if (!built) return "the " + name + " clone is not compiled in (a build without clones)";
    if (!cpu_has(isa))
      return "this CPU lacks " + std::string(isa == Isa::avx2 ? "x86-64-v3 (AVX2, FMA, BMI2)"
                                                              : "x86-64-v4 (AVX-512 F/BW/CD/DQ/VL)");
    current.store(int(isa));
    return "";
  }
  throw std::invalid_argument("unknown ISA '" + name + "': expected generic, avx2 or avx512");
}

void isa_init(std::string& warning) {
  current.store(int(isa_best()));
  const char* env = std::getenv("FASTLVM_ISA");
  if (!env || !*env) return;
  std::string why = isa_select(env);  // an unknown name throws: a typo must not pass unseen
  if (!why.empty())
    warning = "FASTLVM_ISA=" + std::string(env) + " cannot be used: " + why + "; using " +
              isa_name(isa_current()) + " instead";
}

}  // namespace fastlvm
