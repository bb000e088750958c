// pybind11 registrations of the KV-cache core: BlockManager, block_hash and the cpu_* / cuda_*
// KV kernels (append, copy, decode and prefill attention). Sampling: sampling_bindings.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_manager.h"
#include "cascade_bf16_cpu.h"
#include "kv_cpu.h"
#include "cpu_common.h"
#include "train_attention_cpu.h"
#ifdef GRPO_FAST_WITH_CUDA
#include "cuda/kv_cuda.h"
#endif

namespace py = pybind11;

namespace grpo_fast {

// The training attention's arguments from the bindings' pointers (fp32, contiguous).
static TrainAttention train_attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t keep, int64_t keep_bstride,
                               bool causal, int64_t B, int hq, int hkv, int64_t T, int64_t S, int D, float scale) {
  return {reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k), reinterpret_cast<const float*>(v),
          reinterpret_cast<const uint8_t*>(keep), keep_bstride, causal, B, hq, hkv, T, S, D, scale};
}

void register_kv(py::module_& m) {
  // OutOfBlocks -> grpo_fast.kv.OutOfBlocksError, looked up when first raised (importing the
  // Python package while _C initializes would be circular).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OutOfBlocks& e) {
      py::object cls = py::module_::import("grpo_fast.kv.errors").attr("OutOfBlocksError");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  using BM = BlockManager;
  py::class_<BM>(m, "BlockManager")
      .def(py::init<int64_t, int, bool>(), py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("enable_prefix_cache") = true)
      .def_property_readonly("block_size", &BM::block_size)
      .def_property_readonly("num_blocks", &BM::num_blocks)
      .def_property_readonly("num_free_blocks", &BM::num_free_blocks)
      .def("can_allocate", &BM::can_allocate)
      .def("can_append", &BM::can_append)
      .def("allocate", &BM::allocate)
      .def("fork", &BM::fork)
      .def("append_token", &BM::append_token)
      .def("free", &BM::free)
      .def("reset_prefix_cache", &BM::reset_prefix_cache)
      .def("has_seq", &BM::has_seq)
      .def("block_table", [](const BM& b, int64_t id) { return b.block_table(id); })
      .def("num_tokens", &BM::num_tokens)
      .def("ref_count", &BM::ref_count)
      .def("slot_mapping",
           [](const BM& b, int64_t id, int64_t start, int64_t end) {
             const int64_t n = b.num_tokens(id);
             if (end < 0) end = n;
             if (start < 0 || start > end || end > n)
               throw std::invalid_argument("slot range [" + std::to_string(start) + ", " +
                                           std::to_string(end) + ") outside [0, " +
                                           std::to_string(n) + "]");
             py::array_t<int32_t> out(end - start);
             b.slot_mapping(id, start, end, out.mutable_data());
             return out;
           })
      .def("decode_metadata",
           [](const BM& b, const std::vector<int64_t>& ids, int64_t max_blocks) {
             int64_t w = b.max_table_len(ids);
             if (max_blocks >= 0) {
               if (max_blocks < w)
                 throw std::invalid_argument("max_blocks=" + std::to_string(max_blocks) +
                                             " < longest block table " + std::to_string(w));
               w = max_blocks;
             }
             const py::ssize_t S = static_cast<py::ssize_t>(ids.size());
             py::array_t<int32_t> slots(S), lens(S);
             py::array_t<int32_t> tables({S, static_cast<py::ssize_t>(w)});
             b.decode_metadata(ids, w, slots.mutable_data(), tables.mutable_data(),
                               lens.mutable_data());
             return py::make_tuple(slots, tables, lens);
           })
      .def("blocks_logical", &BM::blocks_logical)
      .def("cache_hits", &BM::cache_hits)
      .def("cache_queries", &BM::cache_queries)
      .def("cached_free_blocks", &BM::cached_free_blocks);
  m.def("block_hash", [](uint64_t parent, const std::vector<int64_t>& t) {
    return block_hash(parent, t.data(), static_cast<int>(t.size()));
  });

  m.def("cpu_append_kv", &cpu_append_kv);
  m.def("cpu_copy_blocks", &cpu_copy_blocks);
  m.def("cpu_paged_decode_attention", &cpu_paged_decode_attention,
        py::call_guard<py::gil_scoped_release>());
  // Whether bf16 decode attention runs on AVX512-BF16 (cascade_bf16_cpu.h): the cascade's shared
  // prefix, and the per-sequence kernel's scores.
  m.def("cpu_cascade_bf16_dot_products", &use_avx512_bf16);
  m.def("cpu_cascade_decode_attention", &cpu_cascade_decode_attention,
        py::call_guard<py::gil_scoped_release>());
  m.def("cpu_prefill_attention", &cpu_prefill_attention,
        py::call_guard<py::gil_scoped_release>());
  // training attention (grpo_fast/train/cpu_attention.py): fp32 pointers, contiguous; it runs
  // only where the AVX2 (or AVX-512) build may run
  m.def("cpu_train_attention_runs", [] { return use_avx2(); });
  m.def("cpu_train_attention_forward",
        [](uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t keep, int64_t keep_bstride,
           bool causal, int64_t B, int hq, int hkv, int64_t T, int64_t S, int D, float scale) {
          const TrainAttention a = train_attention(q, k, v, keep, keep_bstride, causal, B, hq, hkv, T, S, D, scale);
          cpu_train_attention_forward(a, reinterpret_cast<float*>(out), reinterpret_cast<float*>(lse), use_avx512());
        },
        py::call_guard<py::gil_scoped_release>());
  m.def("cpu_train_attention_backward",
        [](uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t out, uintptr_t lse, uintptr_t dout, uintptr_t q,
           uintptr_t k, uintptr_t v, uintptr_t keep, int64_t keep_bstride, bool causal, int64_t B, int hq, int hkv,
           int64_t T, int64_t S, int D, float scale) {
          const TrainAttention a = train_attention(q, k, v, keep, keep_bstride, causal, B, hq, hkv, T, S, D, scale);
          cpu_train_attention_backward(a, reinterpret_cast<const float*>(out), reinterpret_cast<const float*>(lse),
                                       reinterpret_cast<const float*>(dout), reinterpret_cast<float*>(dq),
                                       reinterpret_cast<float*>(dk), reinterpret_cast<float*>(dv), use_avx512());
        },
        py::call_guard<py::gil_scoped_release>());
#ifdef GRPO_FAST_WITH_CUDA
  m.def("cuda_append_kv", &cuda_append_kv);
  m.def("cuda_copy_blocks", &cuda_copy_blocks);
  m.def("cuda_paged_decode_attention", &cuda_paged_decode_attention);
  m.def("cuda_cascade_decode_attention", &cuda_cascade_decode_attention);
  m.def("cuda_cascade_workspace_floats", &cascade_workspace_floats);
  m.def("cuda_prefill_attention", &cuda_prefill_attention);
#endif
}

}  // namespace grpo_fast
