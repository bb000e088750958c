// pybind11 registrations of the CPU decode-step kernels: few-row linear layers with LoRA terms
// (linear_cpu.h), RMSNorm (rms_norm_cpu.h), RoPE (rope_cpu.h), the whole decoder stack
// (decode_layer_cpu.h), the size of the kernels' thread pool (parallel.h), and the training
// pass's silu(gate) * up forward and backward (swiglu_cpu.h) and RMSNorm backward; and peft's
// fp32 LoRA terms over a bf16 base layer's output (lora_bf16_cpu.h); a bf16 product computed
// transposed back into rows (transpose_bf16_cpu.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "decode_layer_cpu.h"
#include "linear_cpu.h"
#include "lora_bf16_cpu.h"
#include "parallel.h"
#include "rms_norm_cpu.h"
#include "rope_cpu.h"
#include "swiglu_cpu.h"
#include "transpose_bf16_cpu.h"

namespace py = pybind11;

namespace grpo_fast {

namespace {
// A LoRA term from Python: (lora_A pointer, lora_B pointer, rank, scaling).
using LoraTuple = std::tuple<uintptr_t, uintptr_t, int64_t, double>;

std::vector<LoraTerm> lora_terms(const std::vector<LoraTuple>& terms) {
  std::vector<LoraTerm> out;
  for (const auto& [a, b, r, s] : terms) {
    if (a == 0 || b == 0 || r < 1)
      throw std::invalid_argument("LoRA term: null lora_A / lora_B pointer, or rank < 1");
    out.push_back({reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b), r,
                   static_cast<float>(s)});
  }
  return out;
}
}  // namespace

void register_decode(py::module_& m) {
  m.def("cpu_linear_available", &cpu_linear_available);
  m.def("cpu_avx512", &cpu_linear_avx512,
        "Whether the fp32 kernels with AVX-512 tiles (the linear layers, the cascade's prefix item) run "
        "them (else AVX2): the CPU has AVX-512 F and GRPO_FAST_NO_AVX512=1 is not set.");
  m.def("cpu_threads", &parallel_threads);
  m.def("cpu_set_openmp_regions", &set_openmp_regions,
        "The calling thread's kernel regions on libgomp's team (True) or the pool (False); returns "
        "the previous setting.");
  m.def(
      "cpu_linear",
      [](uintptr_t out, uintptr_t x, uintptr_t w, uintptr_t bias, int64_t M, int64_t N, int64_t K,
         int64_t ldx, int64_t ldo, float alpha, bool accumulate,
         const std::vector<LoraTuple>& lora) {
        const auto terms = lora_terms(lora);
        py::gil_scoped_release release;
        cpu_linear(out, x, w, bias, M, N, K, ldx, ldo, alpha, accumulate, terms);
      },
      py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("M"), py::arg("N"),
      py::arg("K"), py::arg("ldx"), py::arg("ldo"), py::arg("alpha"), py::arg("accumulate"),
      py::arg("lora") = std::vector<LoraTuple>{});
  m.def(
      "cpu_linear_many",
      [](const std::vector<uintptr_t>& outs, uintptr_t x, const std::vector<uintptr_t>& weights,
         const std::vector<uintptr_t>& biases, const std::vector<int64_t>& ns,
         const std::vector<int64_t>& ldos, int64_t M, int64_t K, int64_t ldx,
         const std::vector<std::vector<LoraTuple>>& lora) {
        std::vector<std::vector<LoraTerm>> terms;
        for (const auto& l : lora) terms.push_back(lora_terms(l));
        py::gil_scoped_release release;
        cpu_linear_many(outs, x, weights, biases, ns, ldos, M, K, ldx, terms);
      },
      py::arg("outs"), py::arg("x"), py::arg("weights"), py::arg("biases"), py::arg("ns"),
      py::arg("ldos"), py::arg("M"), py::arg("K"), py::arg("ldx"),
      py::arg("lora") = std::vector<std::vector<LoraTuple>>{});
  m.def(
      "cpu_silu_mul_linear",
      [](uintptr_t out, uintptr_t x, uintptr_t wg, uintptr_t wu, int64_t M, int64_t N, int64_t K,
         int64_t ldx, int64_t ldo, const std::vector<LoraTuple>& lora_gate,
         const std::vector<LoraTuple>& lora_up) {
        const auto g = lora_terms(lora_gate), u = lora_terms(lora_up);
        py::gil_scoped_release release;
        cpu_silu_mul_linear(out, x, wg, wu, M, N, K, ldx, ldo, g, u);
      },
      py::arg("out"), py::arg("x"), py::arg("w_gate"), py::arg("w_up"), py::arg("M"),
      py::arg("N"), py::arg("K"), py::arg("ldx"), py::arg("ldo"),
      py::arg("lora_gate") = std::vector<LoraTuple>{},
      py::arg("lora_up") = std::vector<LoraTuple>{});
  m.def(
      "cpu_lora_add_bf16",
      [](uintptr_t out, uintptr_t x, int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t ldo,
         const std::vector<LoraTuple>& lora) {
        const auto terms = lora_terms(lora);
        py::gil_scoped_release release;
        cpu_lora_add_bf16(out, x, M, N, K, ldx, ldo, terms);
      },
      py::arg("out"), py::arg("x"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("ldx"),
      py::arg("ldo"), py::arg("lora"));
  m.def(
      "cpu_lora_add_bf16_t",
      [](const std::vector<uintptr_t>& outs_t, const std::vector<int64_t>& ns, const std::vector<int64_t>& ldos,
         uintptr_t x, int64_t M, int64_t K, int64_t ldx, bool x_transposed,
         const std::vector<std::vector<LoraTuple>>& lora) {
        std::vector<std::vector<LoraTerm>> terms;
        for (const auto& l : lora) terms.push_back(lora_terms(l));
        py::gil_scoped_release release;
        cpu_lora_add_bf16_t(outs_t, ns, ldos, x, M, K, ldx, x_transposed, terms);
      },
      py::arg("outs_t"), py::arg("ns"), py::arg("ldos"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
      py::arg("x_transposed"), py::arg("lora"));
  m.def("cpu_transpose_bf16", &cpu_transpose_bf16, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_rms_norm", &cpu_rms_norm, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_rms_norm_backward", &cpu_rms_norm_backward, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_rms_norm_bf16", &cpu_rms_norm_bf16, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_rms_norm_backward_bf16", &cpu_rms_norm_backward_bf16, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_rope_qk", &cpu_rope_qk, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_rope_qk_bf16", &cpu_rope_qk_bf16, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_silu_mul", &cpu_silu_mul, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_silu_mul_backward", &cpu_silu_mul_backward, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_silu_mul_backward_bf16", &cpu_silu_mul_backward_bf16, py::call_guard<py::gil_scoped_release>());

  py::class_<DecodeModel>(m, "CpuDecodeModel")
      .def(py::init([](int64_t hidden, int64_t intermediate, int hq, int hkv, int head_dim) {
             if (hidden < 1 || intermediate < 1 || hq < 1 || hkv < 1 || hq % hkv || head_dim < 2)
               throw std::invalid_argument("CpuDecodeModel: bad sizes");
             return DecodeModel{hidden, intermediate, hq, hkv, head_dim, {}};
           }),
           py::arg("hidden"), py::arg("intermediate"), py::arg("num_q_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"))
      .def(
          "add_layer",
          [](DecodeModel& md, const std::vector<uintptr_t>& w, const std::vector<double>& eps,
             const std::vector<std::vector<LoraTuple>>& lora) {
            if (w.size() != 13 || eps.size() != 2 || lora.size() != 7)
              throw std::invalid_argument(
                  "add_layer: need 13 weight pointers, 2 eps and 7 LoRA lists (q k v o gate up down)");
            DecodeLayerWeights layer{w, eps, {}};
            for (size_t i = 0; i < 7; ++i) layer.lora[i] = lora_terms(lora[i]);
            md.layers.push_back(std::move(layer));
          },
          py::arg("weights"), py::arg("eps"), py::arg("lora"))
      .def_readonly("hidden", &DecodeModel::hidden)
      .def_readonly("intermediate", &DecodeModel::intermediate)
      .def_property_readonly("num_layers", [](const DecodeModel& md) { return md.layers.size(); });

  m.def(
      "cpu_decode_layers",
      [](const DecodeModel& md, uintptr_t hidden, int64_t M, uintptr_t cos, uintptr_t sin,
         uintptr_t kv_cache, int64_t layer_bytes, uintptr_t slots, uintptr_t block_tables,
         uintptr_t context_lens, int64_t max_blocks, int64_t num_blocks, int block_size,
         float scale, uintptr_t group_rows, uintptr_t group_starts, uintptr_t prefix_lens,
         int64_t num_groups) {
        const DecodeStepMeta st{slots,      block_tables, context_lens, max_blocks,  num_blocks,
                                block_size, scale,        group_rows,   group_starts, prefix_lens,
                                num_groups};
        py::gil_scoped_release release;
        cpu_decode_layers(md, hidden, M, cos, sin, kv_cache, layer_bytes, st);
      });
}

}  // namespace grpo_fast
