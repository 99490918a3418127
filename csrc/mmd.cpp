// The unbiased (U-statistic) estimate of MMD^2 between the rows of x (n, D) and y (m, D),
//
//   MMD^2 = sum_{i != j} k(x_i, x_j) / (n (n-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
//           - 2 sum_{i, j} k(x_i, y_j) / (n m),
//
// with k = c / (c + |a - b|^2) (inverse multiquadric) or exp(-|a - b|^2 / c) (RBF), and its
// gradients with respect to x and y, computed in the same pass.
//
// No n x m matrix: groups of kMmdRows rows of x (and of y) stream over tiles of kMmdTile rows of
// both sets, held transposed (D, kMmdTile) so that the distances of a group to a tile are vector
// loops with the sums in registers; the gradient's weighted sums run over the same tile's rows
// as stored. The transposed copies are the only memory beyond the inputs and gradients
// (O((n + m) D)).
// Blocks of rows run in parallel (OpenMP), each with its own partial sums, reduced in block
// order: the result does not depend on the thread count. The row loop is compiled per ISA
// clone (mmd_rows.inc, isa.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "isa.h"
#include "vmath.h"

namespace py = pybind11;

namespace fastlvm {
namespace {

constexpr int64_t kMmdTile = 64;  // rows of a set per transposed tile
constexpr int64_t kMmdBlock = 16;  // rows of a per task
constexpr int kMmdRows = 4;  // rows of a that share each load of a tile (register blocking)

template <class T>
struct MmdSide {
  const T* a;  // the rows whose sums and gradient this side computes
  int64_t D;
  const T* self_t;  // a transposed in tiles
  int64_t n_self;
  const T* other_t;  // the other set transposed, or null when its cross sums are not needed
  const T* other;    // the other set's rows
  int64_t n_other;
  bool rbf;
  T c, g_self, g_other;
  T* grad;  // (n_self, D) or null
};

#define FASTLVM_CLONE_BODY "mmd_rows.inc"
#include "isa_clones.inc"

// rows (n, D) as tiles (ceil(n / kMmdTile), D, kMmdTile), zero-padded.
template <class T>
std::vector<T> transposed_tiles(const T* rows, int64_t n, int64_t D) {
  const int64_t tiles = (n + kMmdTile - 1) / kMmdTile;
  std::vector<T> out(tiles * D * kMmdTile, T(0));
#pragma omp parallel for schedule(static) if (n * D >= (int64_t(1) << 15))
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t j = 0; j < std::min(kMmdTile, n - t * kMmdTile); ++j)
      for (int64_t d = 0; d < D; ++d)
        out[(t * D + d) * kMmdTile + j] = rows[(t * kMmdTile + j) * D + d];
  return out;
}

template <class K, class T>
double mmd(const T* x, int64_t n, const T* y, int64_t m, int64_t D, bool rbf, double c, T* gx,
           T* gy) {
  std::vector<T> xt = transposed_tiles(x, n, D), yt = transposed_tiles(y, m, D);
  const double wxx = 1.0 / (double(n) * (n - 1)), wyy = 1.0 / (double(m) * (m - 1)),
               wxy = 1.0 / (double(n) * m);
  const MmdSide<T> sides[2] = {
      {x, D, xt.data(), n, yt.data(), y, m, rbf, T(c), T(2 * wxx), T(-2 * wxy), gx},
      {y, D, yt.data(), m, gy ? xt.data() : nullptr, x, n, rbf, T(c), T(2 * wyy), T(-2 * wxy), gy}};
  const int64_t bx = (n + kMmdBlock - 1) / kMmdBlock, by = (m + kMmdBlock - 1) / kMmdBlock;
  std::vector<double> sums(2 * (bx + by));
  // Below ~2^16 pair-features a parallel region costs more than it saves (more on a busy machine).
#pragma omp parallel if ((n + m) * (n + m) * D >= (int64_t(1) << 16))
  {
    std::vector<T> scratch(kMmdRows * (2 * kMmdTile + D));
#pragma omp for schedule(dynamic)
    for (int64_t k = 0; k < bx + by; ++k) {
      const MmdSide<T>& s = sides[k < bx ? 0 : 1];
      int64_t i0 = (k < bx ? k : k - bx) * kMmdBlock;
      K::template mmd_rows<T>(s, i0, std::min(s.n_self, i0 + kMmdBlock), scratch.data(),
                              &sums[2 * k]);
    }
  }
  double sxx = 0, sxy = 0, syy = 0;
  for (int64_t k = 0; k < bx; ++k) sxx += sums[2 * k], sxy += sums[2 * k + 1];
  for (int64_t k = bx; k < bx + by; ++k) syy += sums[2 * k];
  return sxx * wxx + syy * wyy - 2 * sxy * wxy;
}

template <class T>
using Arr = py::array_t<T, py::array::c_style>;

template <class T>
void bind_mmd(py::module_& m) {
  m.def(
      "mmd",
      [](Arr<T> x, Arr<T> y, bool rbf, double c, std::optional<Arr<T>> gx,
         std::optional<Arr<T>> gy) {
        if (x.ndim() != 2 || y.ndim() != 2 || x.shape(1) != y.shape(1))
          throw py::value_error("x and y must be 2-D with the same number of columns");
        const int64_t n = x.shape(0), mr = y.shape(0), D = x.shape(1);
        if (n < 2 || mr < 2) throw py::value_error("x and y need at least 2 rows each");
        if (!(c > 0)) throw py::value_error("c must be positive");
        auto out = [](std::optional<Arr<T>>& g, int64_t size) -> T* {
          if (!g) return nullptr;
          if (g->size() != size) throw py::value_error("a gradient array has the wrong size");
          return g->mutable_data();
        };
        T *px = out(gx, n * D), *py_ = out(gy, mr * D);
        const T *xd = x.data(), *yd = y.data();
        double value = 0;
        {
          py::gil_scoped_release nogil;
          with_isa([&](auto k) { value = mmd<decltype(k), T>(xd, n, yd, mr, D, rbf, c, px, py_); });
        }
        return value;
      },
      py::arg("x"), py::arg("y"), py::arg("rbf"), py::arg("c"), py::arg("grad_x") = py::none(),
      py::arg("grad_y") = py::none(),
      "unbiased MMD^2 of the rows of x and y (imq c/(c+d2), or rbf exp(-d2/c)); fills the "
      "gradient arrays given");
}

}  // namespace

void register_mmd(py::module_& m) {
  bind_mmd<float>(m);
  bind_mmd<double>(m);
}

}  // namespace fastlvm
