// The instruction set the kernels run on: one copy of each hot loop is compiled per ISA
// ("clone") and one is picked at load time, by CPU feature (not by CPU model name), or by the
// environment variable FASTLVM_ISA=generic|avx2|avx512. `with_isa` calls the code of the
// clone in use.
//
//   generic  x86-64 baseline (SSE2), or the one build of a non-x86 / FASTLVM_NATIVE build
//   avx2     x86-64-v3: AVX2, FMA, BMI2 (Haswell, Zen)
//   avx512   x86-64-v4: AVX-512 F/BW/CD/DQ/VL (Skylake-SP, Ice Lake, Zen 4)
#pragma once

#include <string>
#include <vector>

namespace fastlvm {

enum class Isa { generic = 0, avx2 = 1, avx512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    !defined(FASTLVM_NATIVE)
#define FASTLVM_ISA_CLONES 1
#else
#define FASTLVM_ISA_CLONES 0
#endif

const char* isa_name(Isa isa);
std::vector<Isa> isa_compiled();   // the clones in this build, in ascending order
bool isa_supported(Isa isa);       // compiled in and runnable on this CPU
Isa isa_best();                    // the widest supported clone
Isa isa_current();
// Select a clone by name. Returns "" when done, or the reason it could not be (then the
// selection is unchanged); throws std::invalid_argument for an unknown name.
std::string isa_select(const std::string& name);
// At load: FASTLVM_ISA if set (a warning text in `warning` when it cannot be honoured, and the
// best clone then), else the best clone.
void isa_init(std::string& warning);

}  // namespace fastlvm
