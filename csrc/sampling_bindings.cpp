// pybind11 registrations of the token sampler: cpu_sample and, with CUDA, cuda_sample.
#include <pybind11/pybind11.h>

#include "sampling_cpu.h"
#ifdef GRPO_FAST_WITH_CUDA
#include "cuda/sampling_cuda.h"
#endif

namespace py = pybind11;

namespace grpo_fast {

void register_sampling(py::module_& m) {
  m.def("cpu_sample", &cpu_sample, py::call_guard<py::gil_scoped_release>());
#ifdef GRPO_FAST_WITH_CUDA
  m.def("cuda_sample", &cuda_sample);
#endif
}

}  // namespace grpo_fast
