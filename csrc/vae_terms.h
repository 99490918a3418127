// The terms of the VAE objective that every ISA clone shares: argument blocks, and the
// per-element maths of each likelihood family (inlined into the clones of vae_blocks.inc).
#pragma once

#include <cstdint>
#include <vector>

#include "philox.h"
#include "vmath.h"

namespace fastlvm {

constexpr double kLog2Pi = 1.83787706640934548356;

// ---------------------------------------------------------------- reparameterisation

template <class T>
struct ReparamArgs {
  const T *mu, *lv, *eps;  // eps null: generated from `seed`
  uint64_t seed;
  const int64_t* rows;  // generated noise: null, the flat stream; else row b's own stream
  uint32_t step;        // (seed, step, rows[b]), see normal_fill_row
  int64_t S, B, D;
  T *z, *kl;                     // forward outputs
  const T *gz, *gkl;             // backward inputs (either may be null)
  T *gmu, *glv;                  // backward outputs
};

// eps for the rows (s, b0..b1), which are contiguous: a view, or generated into buf.
template <class T>
FASTLVM_INLINE const T* eps_rows(const ReparamArgs<T>& a, int64_t s, int64_t b0, int64_t b1,
                                 T* buf, double* pairs) {
  int64_t i0 = (s * a.B + b0) * a.D;
  if (a.eps) return a.eps + i0;
  if (a.rows) {
    for (int64_t b = b0; b < b1; ++b)
      normal_fill_row<T>(a.seed, a.step, uint64_t(a.rows[b]), s * a.D, a.D, buf + (b - b0) * a.D, pairs);
    return buf;
  }
  normal_fill<T>(a.seed, i0, (b1 - b0) * a.D, buf, pairs);
  return buf;
}

// ---------------------------------------------------------------- row log-likelihoods
//
// Each family gives, for one row segment, the sum of its per-element terms and (for the
// flags set) the gradients of w * row value, stored (ACC false) or added (ACC true).

template <class T>
struct LLArgs {
  const T *x, *a, *c;   // x; mean or logits; logvar (null: unit variance / unused)
  int64_t px, pa, pc;   // periods (rows) of x, a, c
  int64_t R, D;
  T* out;               // (R,) row values, or null
  T *gx, *ga, *gc;      // gradients (null: not wanted)
  const T* g;           // backward: per-row grad_output
  T scale;              // forward: weight of each row in the gradients
};

struct Gaussian {
  static constexpr bool has_c = true;  // the optional logvar
  // value = -(D log(2 pi) + sum_d [lv + (x - m)^2 exp(-lv)]) / 2
  static double finish(double acc, int64_t D) { return -0.5 * (double(D) * kLog2Pi + acc); }

  template <class T, bool C, bool GX, bool GA, bool GC, bool ACC>
  static FASTLVM_INLINE T row(const T* x, const T* m, const T* lv, int64_t n, T w, T* gx, T* gm,
                              T* gl) {
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < n; ++d) {
      T diff = x[d] - m[d];
      T prec = C ? vexp<T>(-lv[d]) : T(1);
      T sq = diff * diff * prec;
      acc += (C ? lv[d] : T(0)) + sq;
      T dm = w * diff * prec;  // d/dmean; d/dx is its negative
      T dl = w * T(0.5) * (sq - T(1));
      if constexpr (GA) gm[d] = ACC ? gm[d] + dm : dm;
      if constexpr (GX) gx[d] = ACC ? gx[d] - dm : -dm;
      if constexpr (GC) gl[d] = ACC ? gl[d] + dl : dl;
    }
    return acc;
  }
};

struct Bernoulli {
  static constexpr bool has_c = false;
  // value = sum_d [x l - softplus(l)];  d/dl = x - sigmoid(l), d/dx = l
  static double finish(double acc, int64_t) { return acc; }

  template <class T, bool C, bool GX, bool GA, bool GC, bool ACC>
  static FASTLVM_INLINE T row(const T* x, const T* l, const T*, int64_t n, T w, T* gx, T* gl,
                              T*) {
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < n; ++d) {
      T sig;
      acc += x[d] * l[d] - softplus<T>(l[d], sig);
      if constexpr (GA) gl[d] = ACC ? gl[d] + w * (x[d] - sig) : w * (x[d] - sig);
      if constexpr (GX) gx[d] = ACC ? gx[d] + w * l[d] : w * l[d];
    }
    return acc;
  }
};

// sum_{j < n} f(j) for short rows: lane-wise partial sums, then a tree over the lanes (an
// `omp simd` reduction ends in a serial sum over the lanes, which for a row of a few dozen
// elements costs more than the row itself).
template <class T, class F>
FASTLVM_INLINE T row_sum(int64_t n, F&& f) {
  constexpr int L = 64 / sizeof(T);
  T lane[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
#pragma omp simd
    for (int k = 0; k < L; ++k) lane[k] += f(j + k);
  }
  T tail = 0;
  for (; j < n; ++j) tail += f(j);
#pragma GCC unroll 8
  for (int w = L / 2; w >= 1; w /= 2) {
#pragma omp simd
    for (int k = 0; k < w; ++k) lane[k] += lane[k + w];
  }
  return lane[0] + tail;
}

// ---------------------------------------------------------------- importance-weighted bound
//
// log w_sb = log p(x|z_sb) + sum_j [eps^2 - z^2 + lv] / 2 with z = mu + sigma eps. The samples
// stream through once per block of rows; each row keeps a running maximum m, the sum of
// exp(log w - m), and (GRAD) the sums of exp(log w - m) z and exp(log w - m) z eps, rescaled
// when m grows, which give at the end
//   d bound / d mu = -sum_s w_s z_s,  d bound / d lv = 1/2 - sigma/2 sum_s w_s z_s eps_s
// for the normalised weights w_s. The raw log-weights are kept in w and normalised last.

template <class T>
struct IwaeArgs {
  const T *lpx, *mu, *lv, *eps;
  int64_t S, B, D;
  T *bound, *w;      // forward outputs
  T *gmu, *glv;      // forward (GRAD) or backward outputs
  const T* g;        // backward: grad_bound
  T* glpx;           // backward output (or null)
};

template <class T>
struct IwaeScratch {  // per thread, per block of rows
  std::vector<T> sig, acc_mu, acc_lv, lw, p, f, m;
  std::vector<double> sum, cst;
  explicit IwaeScratch(int64_t rows, int64_t D)
      : sig(rows * D), acc_mu(rows * D), acc_lv(rows * D), lw(rows), p(rows), f(rows),
        m(rows), sum(rows), cst(rows) {}
};

}  // namespace fastlvm
