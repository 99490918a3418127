// fastlvm._C: the compiled CPU kernels. Private; fastlvm/kernels/cpp.py wraps them for torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "isa.h"

namespace py = pybind11;

namespace fastlvm {
void register_vae(py::module_& m);
void register_buffers(py::module_& m);
void register_mmd(py::module_& m);

namespace {

std::vector<std::string> names(const std::vector<Isa>& isas, bool supported_only) {
  std::vector<std::string> out;
  for (Isa isa : isas)
    if (!supported_only || isa_supported(isa)) out.push_back(isa_name(isa));
  return out;
}

void register_isa(py::module_& m) {
  std::string warning;
  try {
    isa_init(warning);
  } catch (const std::invalid_argument& err) {
    throw py::value_error(std::string("FASTLVM_ISA: ") + err.what());
  }
  if (!warning.empty()) PyErr_WarnEx(PyExc_RuntimeWarning, warning.c_str(), 1);
  m.def("isa", [] { return std::string(isa_name(isa_current())); },
        "the ISA clone the kernels run: generic, avx2 or avx512 ('native' in a -march=native "
        "build)");
  m.def("isa_compiled", [] { return names(isa_compiled(), false); },
        "the ISA clones compiled into this build");
  m.def("isa_supported", [] { return names(isa_compiled(), true); },
        "the compiled clones this CPU can run");
  m.def(
      "set_isa",
      [](const std::string& name) {
        std::string why = isa_select(name);
        if (!why.empty()) throw py::value_error("cannot use the " + name + " clone: " + why);
      },
      "run the kernels on another clone (all threads; not while a kernel runs)");
}

}  // namespace
}  // namespace fastlvm

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlvm CPU kernels (OpenMP, vectorised): the fused VAE objective and MMD";
  fastlvm::register_isa(m);
  fastlvm::register_buffers(m);
  fastlvm::register_vae(m);
  fastlvm::register_mmd(m);
}
