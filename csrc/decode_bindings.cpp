// pybind11 registrations of the CPU decode-step kernels: few-row linear layers (linear_cpu.h) and
// RMSNorm (rms_norm_cpu.h), RoPE (rope_cpu.h), a whole decoder layer (decode_layer_cpu.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "decode_layer_cpu.h"
#include "linear_cpu.h"
#include "rms_norm_cpu.h"
#include "rope_cpu.h"

namespace py = pybind11;

namespace grpo_fast {

void register_decode(py::module_& m) {
  m.def("cpu_linear_available", &cpu_linear_available);
  m.def("cpu_linear", &cpu_linear, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_linear_many", &cpu_linear_many, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_silu_mul_linear", &cpu_silu_mul_linear, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_rms_norm", &cpu_rms_norm, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_rope_qk", &cpu_rope_qk, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_decode_layer", &cpu_decode_layer, py::call_guard<py::gil_scoped_release>());
}

}  // namespace grpo_fast
