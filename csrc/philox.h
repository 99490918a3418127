// Counter-based standard normal noise: Philox4x32-10 and Box-Muller, in double precision.
//
// The normal of flat element i of the stream `seed` is a pure function of (seed, i), so a
// kernel can regenerate any element in any order, and the backward pass regenerates what the
// forward pass used instead of storing it. The specification, and the reference every backend
// is tested against, is `normal_noise` in fastlvm/reference/vae.py.
#pragma once

#include "vmath.h"

namespace fastlvm {

// Philox4x32 with 10 rounds (Salmon, Moraes, Dror and Shaw, SC'11): the key is bumped by the
// Weyl constants before every round but the first.
FASTLVM_INLINE void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
    uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
    uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0;
    uint32_t n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
    c[1] = uint32_t(p1);
    c[3] = uint32_t(p0);
    c[0] = n0;
    c[2] = n2;
  }
}

// The Box-Muller pair of one Philox counter: words w0..w3 of counter (c0, c1, c2, c3) under
// the key (seed lo, seed hi) give 52-bit uniforms u1 = 1 - a1 2^-52 in (0, 1] and
// u2 = a2 2^-52 in [0, 1) (built as doubles in [1, 2) from their bits); then
// r = sqrt(-2 log u1), and the pair is (r cos 2 pi u2, r sin 2 pi u2).
FASTLVM_INLINE void normal_pair_at(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                   double& n0, double& n1) {
  uint32_t c[4] = {c0, c1, c2, c3};
  philox4x32_10(c, uint32_t(seed), uint32_t(seed >> 32));
  const int64_t one = 0x3FF0000000000000;  // the bits of 1.0
  int64_t a1 = (int64_t(c[0]) << 20) | (c[1] >> 12);
  int64_t a2 = (int64_t(c[2]) << 20) | (c[3] >> 12);
  double u1 = 2.0 - from_bits<double>(one | a1);
  double u2 = from_bits<double>(one | a2) - 1.0;
  double r = __builtin_sqrt(-2.0 * vlog<double>(u1));
  double s, co;
  sincos_2pi<double>(u2, s, co);
  n0 = r * co;
  n1 = r * s;
}

// The flat stream: pair p (flat elements 2p and 2p + 1) has counter (p mod 2^32, p >> 32, 0, 0).
FASTLVM_INLINE void normal_pair(uint64_t seed, uint64_t p, double& n0, double& n1) {
  normal_pair_at(seed, uint32_t(p), uint32_t(p >> 32), 0u, 0u, n0, n1);
}

// out[k] = normal(seed, i0 + k) for k < n, rounded to T. `pairs` holds at least n + 2 doubles.
template <class T>
FASTLVM_INLINE void normal_fill(uint64_t seed, int64_t i0, int64_t n, T* out, double* pairs) {
  int64_t p0 = i0 >> 1, np = ((i0 + n + 1) >> 1) - p0;
#pragma omp simd
  for (int64_t k = 0; k < np; ++k)
    normal_pair(seed, uint64_t(p0 + k), pairs[2 * k], pairs[2 * k + 1]);
  const double* src = pairs + (i0 & 1);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = T(src[k]);
}

// The row-keyed stream: elements e0 .. e0 + n - 1 of global row `row` at `step`, where element
// e = s Dz + j is sample s, dimension j; the pair q = e >> 1 has counter
// (q mod 2^32, step, row mod 2^32, row >> 32). A row's numbers so depend on (seed, step, row)
// only, not on the batch it is in. `pairs` holds at least n + 2 doubles.
template <class T>
FASTLVM_INLINE void normal_fill_row(uint64_t seed, uint32_t step, uint64_t row, int64_t e0, int64_t n, T* out,
                                    double* pairs) {
  int64_t q0 = e0 >> 1, nq = ((e0 + n + 1) >> 1) - q0;
#pragma omp simd
  for (int64_t k = 0; k < nq; ++k)
    normal_pair_at(seed, uint32_t(q0 + k), step, uint32_t(row), uint32_t(row >> 32), pairs[2 * k], pairs[2 * k + 1]);
  const double* src = pairs + (e0 & 1);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = T(src[k]);
}

}  // namespace fastlvm
