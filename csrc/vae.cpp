// The fused VAE objective on the CPU: reparameterisation with KL, Gaussian and Bernoulli
// log-likelihoods, and the importance-weighted bound, forward and backward.
//
// Layout and conventions are those of the kernel-level API (notes shared with the Triton
// backend, and fastlvm/kernels/cpp.py): C-contiguous float32 or float64 arrays; an operand
// of P rows used for R output rows is read at row r % P ("periodic broadcasting").
//
// Parallelism: OpenMP over blocks of rows, or over feature stripes where gradients of a
// periodic operand sum over repeated rows; every sum runs in a fixed order, so results do
// not depend on the thread count. The loops over the feature dimension are `omp simd` with
// the inlined elementary functions of vmath.h. Each block function is compiled for three
// instruction sets and picked at load time (target_clones), so a portable build still runs
// AVX2 or AVX-512 code where the CPU has it (chosen by feature, not by CPU model name).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "philox.h"
#include "vmath.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(FASTLVM_NATIVE)
#define FASTLVM_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FASTLVM_CLONES
#endif

namespace py = pybind11;

namespace fastlvm {
namespace {

constexpr double kLog2Pi = 1.83787706640934548356;

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Below this many elements a parallel region costs more than it saves (and far more on a
// busy machine, where waking a thread can take milliseconds).
bool worth_threads(int64_t elems) { return elems >= (int64_t(1) << 15); }

// Rows per block: at least eight blocks per thread, each within `cap_elems` elements. Blocks
// are handed out dynamically: on a shared machine a descheduled thread must not hold up the
// others at the barrier. (Each block's result does not depend on which thread computes it.)
int64_t block_rows(int64_t rows, int64_t cols, int64_t cap_elems) {
  int64_t want = (rows + 8 * max_threads() - 1) / (8 * max_threads());
  return std::max<int64_t>(1, std::min(want, cap_elems / std::max<int64_t>(cols, 1)));
}

// ---------------------------------------------------------------- reparameterisation

template <class T>
struct ReparamArgs {
  const T *mu, *lv, *eps;  // eps null: generated from `seed`
  uint64_t seed;
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
  normal_fill<T>(a.seed, i0, (b1 - b0) * a.D, buf, pairs);
  return buf;
}

template <class T>
FASTLVM_CLONES void reparam_fwd_block(const ReparamArgs<T>& a, int64_t b0, int64_t b1, T* buf,
                                      double* pairs) {
  const int64_t D = a.D;
  for (int64_t b = b0; b < b1; ++b) {
    const T *mu = a.mu + b * D, *lv = a.lv + b * D;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < D; ++j) acc += vexp<T>(lv[j]) + mu[j] * mu[j] - T(1) - lv[j];
    a.kl[b] = T(0.5) * acc;
  }
  for (int64_t s = 0; s < a.S; ++s) {
    const T* e = eps_rows(a, s, b0, b1, buf, pairs);
    T* z = a.z + (s * a.B + b0) * D;
    const T *mu = a.mu + b0 * D, *lv = a.lv + b0 * D;
#pragma omp simd
    for (int64_t k = 0; k < (b1 - b0) * D; ++k) z[k] = mu[k] + vexp<T>(T(0.5) * lv[k]) * e[k];
  }
}

// grad_mu = sum_s gz + gkl mu;  grad_lv = sum_s gz eps sigma / 2 + gkl (exp(lv) - 1) / 2.
template <class T>
FASTLVM_CLONES void reparam_bwd_block(const ReparamArgs<T>& a, int64_t b0, int64_t b1, T* buf,
                                      double* pairs) {
  const int64_t D = a.D, n = (b1 - b0) * D;
  const T *mu = a.mu + b0 * D, *lv = a.lv + b0 * D;
  T *gmu = a.gmu + b0 * D, *glv = a.glv + b0 * D;
  for (int64_t b = b0; b < b1; ++b) {
    T g = a.gkl ? a.gkl[b] : T(0);
    int64_t o = (b - b0) * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      gmu[o + j] = g * mu[o + j];
      glv[o + j] = g * T(0.5) * (vexp<T>(lv[o + j]) - T(1));
    }
  }
  if (!a.gz) return;
  for (int64_t s = 0; s < a.S; ++s) {
    const T* e = eps_rows(a, s, b0, b1, buf, pairs);
    const T* gz = a.gz + (s * a.B + b0) * D;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      gmu[k] += gz[k];
      glv[k] += gz[k] * e[k] * (T(0.5) * vexp<T>(T(0.5) * lv[k]));
    }
  }
}

template <class T, bool Fwd>
void reparam(const ReparamArgs<T>& a) {
  const int64_t rb = block_rows(a.B, a.D, 4096), nblocks = (a.B + rb - 1) / rb;
#pragma omp parallel if (worth_threads(a.S * a.B * a.D))
  {
    std::vector<T> buf(a.eps ? 0 : rb * a.D);
    std::vector<double> pairs(a.eps ? 0 : rb * a.D + 2);
#pragma omp for schedule(dynamic)
    for (int64_t k = 0; k < nblocks; ++k) {
      int64_t b0 = k * rb, b1 = std::min(a.B, b0 + rb);
      if constexpr (Fwd)
        reparam_fwd_block<T>(a, b0, b1, buf.data(), pairs.data());
      else
        reparam_bwd_block<T>(a, b0, b1, buf.data(), pairs.data());
    }
  }
}

template <class T>
FASTLVM_CLONES void noise_chunk(uint64_t seed, int64_t i0, int64_t n, T* out, double* pairs) {
  normal_fill<T>(seed, i0, n, out, pairs);
}

template <class T>
void normal_noise(uint64_t seed, T* out, int64_t n) {
  constexpr int64_t chunk = 4096;
#pragma omp parallel if (worth_threads(n))
  {
    std::vector<double> pairs(chunk + 2);
#pragma omp for schedule(dynamic)
    for (int64_t i0 = 0; i0 < n; i0 += chunk)
      noise_chunk<T>(seed, i0, std::min(chunk, n - i0), out + i0, pairs.data());
  }
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

// Rows r0..r1: the row values and the gradients of scale * sum_r out_r. An operand with one
// row per output row gets its gradient rows stored; one with a single row (a per-feature
// parameter, PART) has its gradient summed into `part` (D values per operand: x, a, c), which
// the caller adds up over the blocks. Then every gradient is a sum, so rows are zeroed first
// (in cache, just before they are written).
template <class F, class T, bool C, bool GX, bool GA, bool GC, bool PART>
FASTLVM_CLONES void ll_rows(const LLArgs<T>& p, int64_t r0, int64_t r1, T* part) {
  const int64_t D = p.D;
  if constexpr (PART) std::fill(part, part + 3 * D, T(0));
  for (int64_t r = r0; r < r1; ++r) {
    T* g[3] = {GX ? p.gx : nullptr, GA ? p.ga : nullptr, GC ? p.gc : nullptr};
    const int64_t periods[3] = {p.px, p.pa, p.pc};
    for (int k = 0; k < 3; ++k) {
      if (!g[k]) continue;
      if (periods[k] == p.R) {
        g[k] += r * D;
        if constexpr (PART) std::fill(g[k], g[k] + D, T(0));
      } else {
        g[k] = part + k * D;
      }
    }
    T acc = F::template row<T, C, GX, GA, GC, PART>(
        p.x + (r % p.px) * D, p.a + (r % p.pa) * D, C ? p.c + (r % p.pc) * D : nullptr, D,
        p.scale, g[0], g[1], g[2]);
    p.out[r] = T(F::finish(double(acc), D));
  }
}

// Features d0..d1 of every row, in row order: gradients summed over the repeats of each
// periodic operand (outputs zeroed beforehand).
template <class F, class T, bool C, bool GX, bool GA, bool GC>
FASTLVM_CLONES void ll_cols(const LLArgs<T>& p, int64_t d0, int64_t d1) {
  const int64_t D = p.D;
  for (int64_t r = 0; r < p.R; ++r) {
    int64_t ix = (r % p.px) * D + d0, ia = (r % p.pa) * D + d0, ic = (r % p.pc) * D + d0;
    F::template row<T, C, GX, GA, GC, true>(p.x + ix, p.a + ia, C ? p.c + ic : nullptr, d1 - d0,
                                           p.g[r], GX ? p.gx + ix : nullptr,
                                           GA ? p.ga + ia : nullptr, GC ? p.gc + ic : nullptr);
  }
}

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

// Call f(std::bool_constant<b>...) for runtime booleans b.
template <class F>
void with_flags(F&& f) {
  f();
}
template <class F, class... Bs>
void with_flags(F&& f, bool b, Bs... rest) {
  if (b)
    with_flags([&](auto... t) { f(std::true_type{}, t...); }, rest...);
  else
    with_flags([&](auto... t) { f(std::false_type{}, t...); }, rest...);
}

template <class F, class T>
void ll_forward(const LLArgs<T>& p) {
  // Gradients of single-row operands are summed per block of rows, then over the blocks in
  // order: the blocks are fixed by the shape alone, so is the result.
  const bool part = (p.gx && p.px < p.R) || (p.ga && p.pa < p.R) || (p.gc && p.pc < p.R);
  const int64_t rb = part ? std::max((16384 + p.D - 1) / p.D, (p.R + 255) / 256)
                          : block_rows(p.R, p.D, 16384);
  const int64_t nblocks = (p.R + rb - 1) / rb;
  std::vector<T> partial(part ? nblocks * 3 * p.D : 0);
  with_flags(
      [&](auto c, auto gx, auto ga, auto gc, auto pt) {
        constexpr bool C = decltype(c)::value, PART = decltype(pt)::value;
        if constexpr (F::has_c || !C) {
#pragma omp parallel for schedule(dynamic) if (worth_threads(p.R * p.D))
          for (int64_t k = 0; k < nblocks; ++k)
            ll_rows<F, T, C, decltype(gx)::value, decltype(ga)::value, decltype(gc)::value,
                    PART>(p, k * rb, std::min(p.R, (k + 1) * rb),
                          PART ? partial.data() + k * 3 * p.D : nullptr);
        }
      },
      p.c != nullptr, p.gx != nullptr, p.ga != nullptr, p.gc != nullptr, part);
  if (!part) return;
  T* grads[3] = {p.px < p.R ? p.gx : nullptr, p.pa < p.R ? p.ga : nullptr,
                 p.pc < p.R ? p.gc : nullptr};
  for (int o = 0; o < 3; ++o) {
    if (!grads[o]) continue;
#pragma omp parallel for schedule(static) if (worth_threads(nblocks * p.D))
    for (int64_t d = 0; d < p.D; ++d) {
      double sum = 0;
      for (int64_t k = 0; k < nblocks; ++k) sum += double(partial[(k * 3 + o) * p.D + d]);
      grads[o][d] = T(sum);
    }
  }
}

template <class F, class T>
void ll_backward(const LLArgs<T>& p) {
  constexpr int64_t stripe = 256;  // features per task; a multiple of every vector width
  const int64_t nstripes = (p.D + stripe - 1) / stripe;
  with_flags(
      [&](auto c, auto gx, auto ga, auto gc) {
        if constexpr (F::has_c || !decltype(c)::value) {
#pragma omp parallel if (worth_threads(p.R * p.D))
        {
          const std::pair<T*, int64_t> grads[] = {{p.gx, p.px}, {p.ga, p.pa}, {p.gc, p.pc}};
          for (auto [g, rows] : grads) {
            if (!g) continue;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * p.D; ++i) g[i] = T(0);
          }
#pragma omp for schedule(dynamic)
          for (int64_t k = 0; k < nstripes; ++k)
            ll_cols<F, T, decltype(c)::value, decltype(gx)::value, decltype(ga)::value,
                    decltype(gc)::value>(p, k * stripe, std::min(p.D, (k + 1) * stripe));
        }
        }
      },
      p.c != nullptr, p.gx != nullptr, p.ga != nullptr, p.gc != nullptr);
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

template <class T, bool GRAD>
FASTLVM_CLONES void iwae_fwd_block(const IwaeArgs<T>& a, int64_t b0, int64_t b1,
                                   IwaeScratch<T>& t) {
  const int64_t D = a.D, nb = b1 - b0;
  const T *mu = a.mu + b0 * D, *lv = a.lv + b0 * D;
  T *sig = t.sig.data(), *acc_mu = t.acc_mu.data(), *acc_lv = t.acc_lv.data();
  for (int64_t b = 0; b < nb; ++b) {
    T c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < D; ++j) {
      sig[b * D + j] = vexp<T>(T(0.5) * lv[b * D + j]);
      c += lv[b * D + j];
    }
    t.cst[b] = 0.5 * double(c);
    t.m[b] = -INFINITY;
    t.sum[b] = 0.0;
  }
  if constexpr (GRAD) {
    std::fill(acc_mu, acc_mu + nb * D, T(0));
    std::fill(acc_lv, acc_lv + nb * D, T(0));
  }

  for (int64_t s = 0; s < a.S; ++s) {
    const T* e = a.eps + (s * a.B + b0) * D;
    T* lw_out = a.w + s * a.B + b0;
    for (int64_t b = 0; b < nb; ++b) {
      const T *eb = e + b * D, *mub = mu + b * D, *sigb = sig + b * D;
      // The next sample's rows lie B * D further on, past where the prefetcher follows.
      if (s + 1 < a.S)
        for (int64_t j = 0; j < D; j += 64 / int64_t(sizeof(T)))
          __builtin_prefetch(eb + a.B * D + j);
      T q = row_sum<T>(D, [&](int64_t j) {
        T z = mub[j] + sigb[j] * eb[j];
        return eb[j] * eb[j] - z * z;
      });
      T lw = T(double(a.lpx[s * a.B + b0 + b]) + t.cst[b] + 0.5 * double(q));
      t.lw[b] = lw;
      lw_out[b] = lw;
    }
    // Online log-sum-exp: f rescales what was summed relative to the old maximum.
    int grew = 0;
    T *m = t.m.data(), *lwb = t.lw.data(), *f = t.f.data(), *p = t.p.data();
    double* sum = t.sum.data();
#pragma omp simd reduction(| : grew)
    for (int64_t b = 0; b < nb; ++b) {
      // Branch-free, to vectorise: exp(0) is exactly 1, and the NaNs of -inf - -inf (no
      // finite log-weight yet) are selected away.
      T m_new = lwb[b] > m[b] ? lwb[b] : m[b];
      T fb = vexp<T>(m[b] - m_new), pb = vexp<T>(lwb[b] - m_new);
      bool empty = m_new == -INFINITY;
      f[b] = empty ? T(1) : fb;
      p[b] = empty ? T(0) : pb;
      grew |= int(f[b] != T(1));
      m[b] = m_new;
    }
#pragma omp simd
    for (int64_t b = 0; b < nb; ++b) sum[b] = sum[b] * double(f[b]) + double(p[b]);
    if constexpr (GRAD) {
      if (grew) {
        for (int64_t b = 0; b < nb; ++b) {
          T f = t.f[b];
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) acc_mu[b * D + j] *= f, acc_lv[b * D + j] *= f;
        }
      }
      for (int64_t b = 0; b < nb; ++b) {
        T pb = t.p[b];
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          T ej = e[b * D + j], pz = pb * (mu[b * D + j] + sig[b * D + j] * ej);
          acc_mu[b * D + j] += pz;
          acc_lv[b * D + j] += pz * ej;
        }
      }
    }
  }

  const double log_s = std::log(double(a.S));
  for (int64_t b = 0; b < nb; ++b) {
    double lse = double(t.m[b]) + std::log(t.sum[b]);
    a.bound[b0 + b] = T(lse - log_s);
    t.cst[b] = lse;
    if constexpr (GRAD) {
      T inv = T(1.0 / t.sum[b]);
      T *gmu = a.gmu + (b0 + b) * D, *glv = a.glv + (b0 + b) * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        gmu[j] = -acc_mu[b * D + j] * inv;
        glv[j] = T(0.5) - T(0.5) * sig[b * D + j] * acc_lv[b * D + j] * inv;
      }
    }
  }
  for (int64_t b = 0; b < nb; ++b) t.lw[b] = T(t.cst[b]);
  const T* lse = t.lw.data();
  for (int64_t s = 0; s < a.S; ++s) {
    T* w = a.w + s * a.B + b0;
#pragma omp simd
    for (int64_t b = 0; b < nb; ++b) w[b] = vexp<T>(w[b] - lse[b]);
  }
}

template <class T>
FASTLVM_CLONES void iwae_bwd_block(const IwaeArgs<T>& a, int64_t b0, int64_t b1,
                                   IwaeScratch<T>& t) {
  const int64_t D = a.D, nb = b1 - b0;
  const T *mu = a.mu + b0 * D, *lv = a.lv + b0 * D;
  T *sig = t.sig.data(), *gmu = t.acc_mu.data(), *glv = t.acc_lv.data();
#pragma omp simd
  for (int64_t k = 0; k < nb * D; ++k) {
    sig[k] = vexp<T>(T(0.5) * lv[k]);
    gmu[k] = T(0);
    glv[k] = T(0);
  }
  std::fill(t.sum.begin(), t.sum.end(), 0.0);
  for (int64_t s = 0; s < a.S; ++s) {
    const T* e = a.eps + (s * a.B + b0) * D;
    for (int64_t b = 0; b < nb; ++b) {
      T ws = a.w[s * a.B + b0 + b] * a.g[b0 + b];
      if (a.glpx) a.glpx[s * a.B + b0 + b] = ws;
      t.sum[b] += double(ws);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        T ej = e[b * D + j], wz = ws * (mu[b * D + j] + sig[b * D + j] * ej);
        gmu[b * D + j] -= wz;
        glv[b * D + j] -= wz * ej;
      }
    }
  }
  for (int64_t b = 0; b < nb; ++b) {
    T half_g = T(0.5 * t.sum[b]);
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      if (a.gmu) a.gmu[(b0 + b) * D + j] = gmu[b * D + j];
      if (a.glv) a.glv[(b0 + b) * D + j] = half_g + T(0.5) * sig[b * D + j] * glv[b * D + j];
    }
  }
}

// mode 0: forward; 1: forward with gradients; 2: backward.
template <class T>
void iwae(const IwaeArgs<T>& a, int mode) {
  const int64_t rb = block_rows(a.B, a.D, 2048), nblocks = (a.B + rb - 1) / rb;
#pragma omp parallel if (worth_threads(a.S * a.B * a.D))
  {
    IwaeScratch<T> scratch(rb, a.D);
#pragma omp for schedule(dynamic)
    for (int64_t k = 0; k < nblocks; ++k) {
      int64_t b0 = k * rb, b1 = std::min(a.B, b0 + rb);
      if (mode == 0)
        iwae_fwd_block<T, false>(a, b0, b1, scratch);
      else if (mode == 1)
        iwae_fwd_block<T, true>(a, b0, b1, scratch);
      else
        iwae_bwd_block<T>(a, b0, b1, scratch);
    }
  }
}

// ---------------------------------------------------------------- Python bindings

// Arrays arrive from fastlvm/kernels/cpp.py (torch tensors viewed as NumPy without copies);
// the checks here guard memory safety, not user input (validated in fastlvm.functional).
template <class T>
T* data(const py::object& o, const char* name, int64_t rows, int64_t cols, bool optional = false) {
  if (o.is_none()) {
    if (optional) return nullptr;
    throw py::value_error(std::string(name) + " is required");
  }
  auto arr = py::cast<py::array>(o);
  if (!arr.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + ": dtype differs from the first argument");
  if (!(arr.flags() & py::array::c_style) || !arr.writeable())
    throw py::value_error(std::string(name) + " must be C-contiguous and writeable");
  if (arr.size() != rows * cols)
    throw py::value_error(std::string(name) + " has " + std::to_string(arr.size()) +
                          " elements, expected " + std::to_string(rows * cols));
  return static_cast<T*>(arr.mutable_data());
}

std::pair<int64_t, int64_t> shape2(const py::object& o, const char* name) {
  auto arr = py::cast<py::array>(o);
  if (arr.ndim() != 2) throw py::value_error(std::string(name) + " must be 2-D");
  return {arr.shape(0), arr.shape(1)};
}

// Call f(T{}) for the dtype of `first`.
template <class F>
void by_dtype(const py::object& first, F&& f) {
  auto dt = py::cast<py::array>(first).dtype();
  if (dt.is(py::dtype::of<float>()))
    f(float{});
  else if (dt.is(py::dtype::of<double>()))
    f(double{});
  else
    throw py::type_error("expected float32 or float64 arrays");
}

void bind_reparam(py::module_& m) {
  m.def(
      "reparam_fwd",
      [](py::object mu, py::object lv, py::object eps, uint64_t seed, int64_t S, py::object z,
         py::object kl) {
        auto [B, D] = shape2(mu, "mu");
        by_dtype(mu, [&](auto tag) {
          using T = decltype(tag);
          ReparamArgs<T> a{data<T>(mu, "mu", B, D), data<T>(lv, "logvar", B, D),
                           data<T>(eps, "eps", S * B, D, true), seed, S, B, D,
                           data<T>(z, "z", S * B, D), data<T>(kl, "kl", B, 1),
                           nullptr, nullptr, nullptr, nullptr};
          py::gil_scoped_release nogil;
          reparam<T, true>(a);
        });
      },
      "z = mu + exp(logvar/2) eps and kl; eps None: generated from seed (S samples)");
  m.def(
      "reparam_bwd",
      [](py::object mu, py::object lv, py::object eps, uint64_t seed, int64_t S, py::object gz,
         py::object gkl, py::object gmu, py::object glv) {
        auto [B, D] = shape2(mu, "mu");
        by_dtype(mu, [&](auto tag) {
          using T = decltype(tag);
          ReparamArgs<T> a{data<T>(mu, "mu", B, D), data<T>(lv, "logvar", B, D),
                           data<T>(eps, "eps", S * B, D, true), seed, S, B, D,
                           nullptr, nullptr, data<T>(gz, "grad_z", S * B, D, true),
                           data<T>(gkl, "grad_kl", B, 1, true), data<T>(gmu, "grad_mu", B, D),
                           data<T>(glv, "grad_logvar", B, D)};
          py::gil_scoped_release nogil;
          reparam<T, false>(a);
        });
      },
      "gradients of reparam_fwd's (z, kl) for mu and logvar");
  m.def(
      "normal_noise",
      [](uint64_t seed, py::object out) {
        int64_t n = py::cast<py::array>(out).size();
        by_dtype(out, [&](auto tag) {
          using T = decltype(tag);
          T* p = data<T>(out, "out", n, 1);
          py::gil_scoped_release nogil;
          normal_noise<T>(seed, p, n);
        });
      },
      "fill out (flat) with the standard normals of stream seed");
}

void bind_log_likelihoods(py::module_& m) {
  // Operands (x, a, c): c is the Gaussian logvar (optional) and absent for Bernoulli; their
  // gradients (optional) have the operands' shapes.
  auto args = [](py::object x, py::object a, py::object c, py::object gx, py::object ga,
                 py::object gc, auto tag) {
    using T = decltype(tag);
    auto [px, D] = shape2(x, "x");
    int64_t pa = shape2(a, "a").first, pc = c.is_none() ? 1 : shape2(c, "logvar").first;
    int64_t R = std::max({px, pa, pc});
    if (R % px || R % pa || R % pc) throw py::value_error("row counts must divide the largest");
    LLArgs<T> p{data<T>(x, "x", px, D), data<T>(a, "a", pa, D),
                data<T>(c, "logvar", pc, D, true), px, pa, pc, R, D,
                nullptr, data<T>(gx, "grad_x", px, D, true), data<T>(ga, "grad_a", pa, D, true),
                data<T>(gc, "grad_logvar", pc, D, true), nullptr, T(1)};
    return p;
  };
  auto forward = [args](auto family, py::object x, py::object a, py::object c, py::object out,
                        py::object gx, py::object ga, py::object gc, double scale) {
    using F = decltype(family);
    by_dtype(x, [&](auto tag) {
      using T = decltype(tag);
      LLArgs<T> p = args(x, a, c, gx, ga, gc, tag);
      p.out = data<T>(out, "out", p.R, 1);
      for (auto [g, rows] : {std::pair<T*, int64_t>{p.gx, p.px}, {p.ga, p.pa}, {p.gc, p.pc}})
        if (g && rows != p.R && rows != 1)
          throw py::value_error("forward gradients need one row per output row, or one row");
      p.scale = T(scale);
      py::gil_scoped_release nogil;
      ll_forward<F, T>(p);
    });
  };
  auto backward = [args](auto family, py::object x, py::object a, py::object c, py::object g,
                         py::object gx, py::object ga, py::object gc) {
    using F = decltype(family);
    by_dtype(x, [&](auto tag) {
      using T = decltype(tag);
      LLArgs<T> p = args(x, a, c, gx, ga, gc, tag);
      p.g = data<T>(g, "grad_out", p.R, 1);
      py::gil_scoped_release nogil;
      ll_backward<F, T>(p);
    });
  };
  using namespace py::literals;
  m.def("gaussian_ll",
        [forward](py::object x, py::object mean, py::object lv, py::object out, py::object gx,
                  py::object gm, py::object gl, double scale) {
          forward(Gaussian{}, x, mean, lv, out, gx, gm, gl, scale);
        },
        "x"_a, "mean"_a, "logvar"_a, "out"_a, "grad_x"_a = py::none(),
        "grad_mean"_a = py::none(), "grad_logvar"_a = py::none(), "scale"_a = 1.0,
        "row Gaussian log-likelihoods; with grad arrays, the gradients of scale * sum(out)");
  m.def("gaussian_ll_bwd",
        [backward](py::object x, py::object mean, py::object lv, py::object g, py::object gx,
                   py::object gm, py::object gl) {
          backward(Gaussian{}, x, mean, lv, g, gx, gm, gl);
        },
        "x"_a, "mean"_a, "logvar"_a, "grad_out"_a, "grad_x"_a = py::none(),
        "grad_mean"_a = py::none(), "grad_logvar"_a = py::none(),
        "gradients of sum_r grad_out[r] * out[r], summed over periodic repeats");
  m.def("bernoulli_ll",
        [forward](py::object x, py::object logits, py::object out, py::object gx, py::object gl,
                  double scale) {
          forward(Bernoulli{}, x, logits, py::none(), out, gx, gl, py::none(), scale);
        },
        "x"_a, "logits"_a, "out"_a, "grad_x"_a = py::none(), "grad_logits"_a = py::none(),
        "scale"_a = 1.0, "row Bernoulli log-likelihoods (and gradients of scale * sum(out))");
  m.def("bernoulli_ll_bwd",
        [backward](py::object x, py::object logits, py::object g, py::object gx, py::object gl) {
          backward(Bernoulli{}, x, logits, py::none(), g, gx, gl, py::none());
        },
        "x"_a, "logits"_a, "grad_out"_a, "grad_x"_a = py::none(), "grad_logits"_a = py::none(),
        "gradients of sum_r grad_out[r] * out[r], summed over periodic repeats");
}

void bind_iwae(py::module_& m) {
  auto args = [](py::object lpx, py::object mu, py::object lv, py::object eps, auto tag) {
    using T = decltype(tag);
    auto [B, D] = shape2(mu, "mu");
    int64_t S = shape2(lpx, "log_px_given_z").first;
    IwaeArgs<T> a{data<T>(lpx, "log_px_given_z", S, B), data<T>(mu, "mu", B, D),
                  data<T>(lv, "logvar", B, D), data<T>(eps, "eps", S * B, D), S, B, D,
                  nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    return a;
  };
  m.def(
      "iwae_fwd",
      [args](py::object lpx, py::object mu, py::object lv, py::object eps, py::object bound,
             py::object w, py::object gmu, py::object glv) {
        by_dtype(mu, [&](auto tag) {
          using T = decltype(tag);
          IwaeArgs<T> a = args(lpx, mu, lv, eps, tag);
          a.bound = data<T>(bound, "bound", a.B, 1);
          a.w = data<T>(w, "w", a.S, a.B);
          a.gmu = data<T>(gmu, "grad_mu", a.B, a.D, true);
          a.glv = data<T>(glv, "grad_logvar", a.B, a.D, true);
          if (!a.gmu != !a.glv) throw py::value_error("give both gradient arrays or neither");
          py::gil_scoped_release nogil;
          iwae<T>(a, a.gmu ? 1 : 0);
        });
      },
      "bound (B,), normalised weights w (S, B) and, given the arrays, the bound's gradients");
  m.def(
      "iwae_bwd",
      [args](py::object lpx, py::object mu, py::object lv, py::object eps, py::object w,
             py::object g, py::object glpx, py::object gmu, py::object glv) {
        by_dtype(mu, [&](auto tag) {
          using T = decltype(tag);
          IwaeArgs<T> a = args(lpx, mu, lv, eps, tag);
          a.w = data<T>(w, "w", a.S, a.B);
          a.g = data<T>(g, "grad_bound", a.B, 1);
          a.glpx = data<T>(glpx, "grad_log_px", a.S, a.B, true);
          a.gmu = data<T>(gmu, "grad_mu", a.B, a.D, true);
          a.glv = data<T>(glv, "grad_logvar", a.B, a.D, true);
          py::gil_scoped_release nogil;
          iwae<T>(a, 2);
        });
      },
      "gradients of sum_b grad_bound[b] * bound[b] from the saved weights");
}

}  // namespace

void register_vae(py::module_& m) {
  bind_reparam(m);
  bind_log_likelihoods(m);
  bind_iwae(m);
  m.def("num_threads", &max_threads, "OpenMP threads the kernels use");
}

}  // namespace fastlvm
