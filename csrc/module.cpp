// fastlvm._C: the compiled CPU kernels. Private; fastlvm/kernels/cpp.py wraps them for torch.
#include <pybind11/pybind11.h>

namespace fastlvm {
void register_vae(pybind11::module_& m);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlvm CPU kernels (OpenMP, vectorised): the fused VAE objective";
  fastlvm::register_vae(m);
}
