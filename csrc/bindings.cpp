// pybind11 entry point of grpo_fast._C. Each component registers its functions here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace grpo_fast {
void register_kv(py::module_& m);        // kv_bindings.cpp
void register_sampling(py::module_& m);  // sampling_bindings.cpp
void register_decode(py::module_& m);    // decode_bindings.cpp
}

static bool built_with_cuda() {
#ifdef GRPO_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "grpo_fast native core: paged KV-cache block manager, sampler and CPU/CUDA kernels";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in.");
  grpo_fast::register_kv(m);
  grpo_fast::register_sampling(m);
  grpo_fast::register_decode(m);
}
