// Elementary functions written so that the compiler vectorises the loops that call them.
//
// libm's exp/log/sin are opaque calls that keep `#pragma omp simd` loops scalar unless the
// build uses -ffast-math; these are plain arithmetic, bit casts and selects, inlined into the
// caller. Accuracy: a few ulp over the ranges used here (float and double), which keeps the
// float64 kernels within ~1e-14 of the PyTorch reference.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#define FASTLVM_INLINE inline __attribute__((always_inline))

namespace fastlvm {

template <class T>
using bits_t = std::conditional_t<std::is_same_v<T, float>, int32_t, int64_t>;

template <class T>
FASTLVM_INLINE bits_t<T> to_bits(T x) {
  bits_t<T> i;
  std::memcpy(&i, &x, sizeof x);
  return i;
}

template <class T>
FASTLVM_INLINE T from_bits(bits_t<T> i) {
  T x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}

template <class T>
struct fp;  // constants of each floating type

template <>
struct fp<float> {
  static constexpr int mant = 23, bias = 127;
  static constexpr float exp_limit = 170.0f;  // |x| beyond it: exp is 0 or inf anyway
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr int exp_degree = 7, atanh_terms = 8, sincos_terms = 6;
};

template <>
struct fp<double> {
  static constexpr int mant = 52, bias = 1023;
  static constexpr double exp_limit = 1400.0;
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr int exp_degree = 13, atanh_terms = 17, sincos_terms = 9;
};

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kPi = 3.14159265358979323846;

// 2^k for an integer k within the normal exponent range.
template <class T>
FASTLVM_INLINE T pow2i(bits_t<T> k) {
  return from_bits<T>((k + fp<T>::bias) << fp<T>::mant);
}

// A small integer as T without an int-to-float conversion instruction (AVX2 has none for int64).
template <class T>
FASTLVM_INLINE T int_to_fp(bits_t<T> n) {
  const T shift = T(1.5) * from_bits<T>(bits_t<T>(fp<T>::mant + fp<T>::bias) << fp<T>::mant);
  return from_bits<T>(to_bits(shift) + n) - shift;
}

// Round to the nearest integer with the 1.5 * 2^mant trick: returns (n as T, n as int).
template <class T>
FASTLVM_INLINE T round_int(T x, bits_t<T>& n) {
  const T shift = T(1.5) * from_bits<T>(bits_t<T>(fp<T>::mant + fp<T>::bias) << fp<T>::mant);
  T t = x + shift;
  n = to_bits(t) - to_bits(shift);
  return t - shift;
}

// exp(x) = 2^n exp(r), r = x - n ln2 (Cody-Waite), exp(r) by its Taylor series on
// |r| <= ln2 / 2; 2^n is applied as two factors so that results near the under- and
// overflow thresholds stay exact (subnormal results included). NaN propagates.
template <class T>
FASTLVM_INLINE T vexp(T x) {
  constexpr T lim = fp<T>::exp_limit;
  x = x > lim ? lim : x;
  x = x < -lim ? -lim : x;
  bits_t<T> n;
  T nf = round_int<T>(x * T(kLog2e), n);
  T r = x - nf * fp<T>::ln2_hi - nf * fp<T>::ln2_lo;
  T p = T(1);
#pragma GCC unroll 16
  for (int k = fp<T>::exp_degree; k >= 1; --k) p = T(1) + p * (r * T(1.0 / k));
  bits_t<T> n1 = n >> 1;
  return p * pow2i<T>(n1) * pow2i<T>(n - n1);
}

// 2 atanh(s) = log((1 + s) / (1 - s)) for |s| <= 1/3, by the series 2 s sum_k s^2k / (2k + 1).
template <class T>
FASTLVM_INLINE T atanh2(T s) {
  T z = s * s;
  T p = T(1) / T(2 * fp<T>::atanh_terms - 1);
#pragma GCC unroll 20
  for (int k = fp<T>::atanh_terms - 2; k >= 0; --k) p = T(1.0 / (2 * k + 1)) + z * p;
  return T(2) * s * p;
}

// log(1 + f) for f in [sqrt(1/2) - 1, 1]: 2 atanh(s) with s = f / (2 + f), accurate in
// relative terms even for tiny f.
template <class T>
FASTLVM_INLINE T log1p_small(T f) {
  return atanh2<T>(f / (T(2) + f));
}

// log(x) for positive normal x: x = 2^e m with m in [sqrt(1/2), sqrt(2)).
template <class T>
FASTLVM_INLINE T vlog(T x) {
  using I = bits_t<T>;
  constexpr I mant_mask = (I(1) << fp<T>::mant) - 1;
  I b = to_bits(x);
  I e = (b >> fp<T>::mant) - fp<T>::bias;
  T m = from_bits<T>((b & mant_mask) | (I(fp<T>::bias) << fp<T>::mant));  // in [1, 2)
  bool big = m > T(1.4142135623730951);
  m = big ? m * T(0.5) : m;
  e = big ? e + 1 : e;
  T ef = int_to_fp<T>(e);
  return ef * fp<T>::ln2_hi + (log1p_small<T>(m - T(1)) + ef * fp<T>::ln2_lo);
}

// sin and cos of 2 pi u for u in [0, 1]: u = (q + f) / 4 with an integer q and |f| <= 1/2, so
// the angle is q quarter turns plus a = f pi / 2, |a| <= pi / 4, where the Taylor series of
// sin and cos converge fast; the quarter turns permute and negate the pair.
template <class T>
FASTLVM_INLINE void sincos_2pi(T u, T& s, T& c) {
  bits_t<T> q;
  T qf = round_int<T>(T(4) * u, q);
  T a = (T(4) * u - qf) * T(kPi / 2);
  T z = a * a;
  T ps = T(1), pc = T(1);
#pragma GCC unroll 12
  for (int k = fp<T>::sincos_terms; k >= 1; --k) {
    ps = T(1) - ps * (z * T(1.0 / ((2 * k) * (2 * k + 1))));
    pc = T(1) - pc * (z * T(1.0 / ((2 * k - 1) * (2 * k))));
  }
  T sa = a * ps, ca = pc;
  bits_t<T> quad = q & 3;
  T s1 = (quad & 1) ? ca : sa;
  T c1 = (quad & 1) ? sa : ca;
  s = (quad & 2) ? -s1 : s1;
  c = ((quad + 1) & 2) ? -c1 : c1;
}

// log(1 + exp(l)) = max(l, 0) + log1p(exp(-|l|)); also returns sigmoid(l), from the same exp
// and the same division: with e = exp(-|l|), 1 / (1 + e) and log1p's e / (2 + e) both come
// from 1 / ((1 + e)(2 + e)).
template <class T>
FASTLVM_INLINE T softplus(T l, T& sigmoid) {
  T a = l < T(0) ? -l : l;
  T e = vexp<T>(-a);
  T d1 = T(1) + e, d2 = T(2) + e;
  T r = T(1) / (d1 * d2);
  T inv = r * d2;
  sigmoid = l < T(0) ? e * inv : inv;
  return (l > T(0) ? l : T(0)) + atanh2<T>(e * r * d1);
}

}  // namespace fastlvm
