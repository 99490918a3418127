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
// the inlined elementary functions of vmath.h. The block functions (vae_blocks.inc) are
// compiled once per instruction set and the drivers call the clone in use (isa.h): a portable
// build runs AVX2 or AVX-512 code where the CPU has it, and FASTLVM_ISA can force another.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa.h"
#include "vae_terms.h"

namespace py = pybind11;

namespace fastlvm {
namespace {

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

// ---------------------------------------------------------------- the ISA clones

#define FASTLVM_CLONE_BODY "vae_blocks.inc"
#include "isa_clones.inc"

template <class K, class T, bool Fwd>
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
        K::template reparam_fwd_block<T>(a, b0, b1, buf.data(), pairs.data());
      else
        K::template reparam_bwd_block<T>(a, b0, b1, buf.data(), pairs.data());
    }
  }
}

template <class K, class T>
void normal_noise(uint64_t seed, T* out, int64_t n) {
  constexpr int64_t chunk = 4096;
#pragma omp parallel if (worth_threads(n))
  {
    std::vector<double> pairs(chunk + 2);
#pragma omp for schedule(dynamic)
    for (int64_t i0 = 0; i0 < n; i0 += chunk)
      K::template noise_chunk<T>(seed, i0, std::min(chunk, n - i0), out + i0, pairs.data());
  }
}

template <class K, class T>
void row_noise(uint64_t seed, uint32_t step, const int64_t* rows, int64_t first_sample, int64_t S, int64_t B,
               int64_t D, T* out) {
  const int64_t rb = block_rows(B, S * D, 1 << 14), nblocks = (B + rb - 1) / rb;
#pragma omp parallel if (worth_threads(S * B * D))
  {
    std::vector<T> buf(S * D);
    std::vector<double> pairs(S * D + 2);
#pragma omp for schedule(dynamic)
    for (int64_t k = 0; k < nblocks; ++k)
      K::template row_noise_block<T>(seed, step, rows, first_sample, S, B, D, k * rb, std::min(B, (k + 1) * rb), out,
                                     buf.data(), pairs.data());
  }
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

template <class K, class F, class T>
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
            K::template ll_rows<F, T, C, decltype(gx)::value, decltype(ga)::value, decltype(gc)::value,
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

template <class K, class F, class T>
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
            K::template ll_cols<F, T, decltype(c)::value, decltype(gx)::value, decltype(ga)::value,
                    decltype(gc)::value>(p, k * stripe, std::min(p.D, (k + 1) * stripe));
        }
        }
      },
      p.c != nullptr, p.gx != nullptr, p.ga != nullptr, p.gc != nullptr);
}

// mode 0: forward; 1: forward with gradients; 2: backward.
template <class K, class T>
void iwae(const IwaeArgs<T>& a, int mode) {
  const int64_t rb = block_rows(a.B, a.D, 2048), nblocks = (a.B + rb - 1) / rb;
#pragma omp parallel if (worth_threads(a.S * a.B * a.D))
  {
    IwaeScratch<T> scratch(rb, a.D);
#pragma omp for schedule(dynamic)
    for (int64_t k = 0; k < nblocks; ++k) {
      int64_t b0 = k * rb, b1 = std::min(a.B, b0 + rb);
      if (mode == 0)
        K::template iwae_fwd_block<T, false>(a, b0, b1, scratch);
      else if (mode == 1)
        K::template iwae_fwd_block<T, true>(a, b0, b1, scratch);
      else
        K::template iwae_bwd_block<T>(a, b0, b1, scratch);
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

// Global row indices (int64, C-contiguous, n of them), or null for None.
const int64_t* row_keys(const py::object& o, int64_t n) {
  if (o.is_none()) return nullptr;
  auto arr = py::cast<py::array>(o);
  if (!arr.dtype().is(py::dtype::of<int64_t>()) || !(arr.flags() & py::array::c_style) || arr.size() != n)
    throw py::value_error("rows must be a C-contiguous int64 array of " + std::to_string(n) + " row indices");
  return static_cast<const int64_t*>(arr.data());
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
         py::object kl, py::object rows, uint32_t step) {
        auto [B, D] = shape2(mu, "mu");
        by_dtype(mu, [&](auto tag) {
          using T = decltype(tag);
          ReparamArgs<T> a{data<T>(mu, "mu", B, D), data<T>(lv, "logvar", B, D),
                           data<T>(eps, "eps", S * B, D, true), seed, row_keys(rows, B), step, S, B, D,
                           data<T>(z, "z", S * B, D), data<T>(kl, "kl", B, 1),
                           nullptr, nullptr, nullptr, nullptr};
          py::gil_scoped_release nogil;
          with_isa([&](auto k) { reparam<decltype(k), T, true>(a); });
        });
      },
      py::arg("mu"), py::arg("logvar"), py::arg("eps"), py::arg("seed"), py::arg("S"), py::arg("z"), py::arg("kl"),
      py::arg("rows") = py::none(), py::arg("step") = 0,
      "z = mu + exp(logvar/2) eps and kl; eps None: generated from seed (S samples), from each row's own "
      "stream (seed, step, rows[b]) when rows is given");
  m.def(
      "reparam_bwd",
      [](py::object mu, py::object lv, py::object eps, uint64_t seed, int64_t S, py::object gz,
         py::object gkl, py::object gmu, py::object glv, py::object rows, uint32_t step) {
        auto [B, D] = shape2(mu, "mu");
        by_dtype(mu, [&](auto tag) {
          using T = decltype(tag);
          ReparamArgs<T> a{data<T>(mu, "mu", B, D), data<T>(lv, "logvar", B, D),
                           data<T>(eps, "eps", S * B, D, true), seed, row_keys(rows, B), step, S, B, D,
                           nullptr, nullptr, data<T>(gz, "grad_z", S * B, D, true),
                           data<T>(gkl, "grad_kl", B, 1, true), data<T>(gmu, "grad_mu", B, D),
                           data<T>(glv, "grad_logvar", B, D)};
          py::gil_scoped_release nogil;
          with_isa([&](auto k) { reparam<decltype(k), T, false>(a); });
        });
      },
      py::arg("mu"), py::arg("logvar"), py::arg("eps"), py::arg("seed"), py::arg("S"), py::arg("grad_z"),
      py::arg("grad_kl"), py::arg("grad_mu"), py::arg("grad_logvar"), py::arg("rows") = py::none(),
      py::arg("step") = 0, "gradients of reparam_fwd's (z, kl) for mu and logvar");
  m.def(
      "normal_noise",
      [](uint64_t seed, py::object out) {
        int64_t n = py::cast<py::array>(out).size();
        by_dtype(out, [&](auto tag) {
          using T = decltype(tag);
          T* p = data<T>(out, "out", n, 1);
          py::gil_scoped_release nogil;
          with_isa([&](auto k) { normal_noise<decltype(k), T>(seed, p, n); });
        });
      },
      "fill out (flat) with the standard normals of stream seed");
  m.def(
      "row_noise",
      [](uint64_t seed, uint32_t step, py::object rows, int64_t first_sample, py::object out) {
        auto arr = py::cast<py::array>(out);
        if (arr.ndim() != 3) throw py::value_error("out must be 3-D (S, B, D)");
        int64_t S = arr.shape(0), B = arr.shape(1), D = arr.shape(2);
        const int64_t* r = row_keys(rows, B);
        if (!r) throw py::value_error("rows is required");
        by_dtype(out, [&](auto tag) {
          using T = decltype(tag);
          T* p = data<T>(out, "out", S * B, D);
          py::gil_scoped_release nogil;
          with_isa([&](auto k) { row_noise<decltype(k), T>(seed, step, r, first_sample, S, B, D, p); });
        });
      },
      "fill out (S, B, D) with samples first_sample.. of each row's stream (seed, step, rows[b])");
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
      with_isa([&](auto k) { ll_forward<decltype(k), F, T>(p); });
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
      with_isa([&](auto k) { ll_backward<decltype(k), F, T>(p); });
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
          with_isa([&](auto k) { iwae<decltype(k), T>(a, a.gmu ? 1 : 0); });
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
          with_isa([&](auto k) { iwae<decltype(k), T>(a, 2); });
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
