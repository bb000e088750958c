// silu(gate) * up and its backward in one pass each over the training pass's [T, I] tensors.
//
// In plain PyTorch the forward is two passes (silu, then the product) and the backward nine
// (sigmoid, then products and sums that each write a fresh [T, I] tensor): at SmolLM2's
// I = 1,536 and 1,016 rows that measured 18-19 ms of a layer's forward + backward, against 3-5 ms
// (allocations included) for the one pass each way here, which reads gate, up (and grad) once
// and writes the outputs once. benchmarks/RESULTS.md, "Lean LoRA and SwiGLU".
//
// The sigmoid takes exp of a non-positive argument only, s = 1 / (1 + e) for g >= 0 and
// e / (1 + e) below, e = exp(-|g|): no overflow for any g, and exp_nonpos's relative error
// (< 2e-7) is below fp32's accumulation noise.
#include "swiglu_cpu.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cpu_common.h"
#include "parallel.h"

namespace grpo_fast {
namespace {

// ~16k floats per chunk: ~20-40 µs of work (parallel.h: what a preempted worker can hold back).
constexpr int64_t kChunk = 1 << 14;

// Both sides computed and one selected (no branch around the division), so the loops vectorize.
GF_INLINE float sigmoid(float g) {
  const float e = exp_nonpos(-std::fabs(g));
  const float r = 1.f / (1.f + e);
  return g >= 0.f ? r : e * r;
}

GF_INLINE void forward_span(float* out, const float* g, const float* u, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] * sigmoid(g[i]) * u[i];
}

GF_INLINE void backward_span(float* gg, float* gu, const float* d, const float* g, const float* u,
                             int64_t n) {
  if (gg != nullptr && gu != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float s = sigmoid(g[i]);
      gu[i] = d[i] * g[i] * s;
      gg[i] = d[i] * u[i] * s * (1.f + g[i] * (1.f - s));
    }
  } else if (gg != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float s = sigmoid(g[i]);
      gg[i] = d[i] * u[i] * s * (1.f + g[i] * (1.f - s));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gu[i] = d[i] * g[i] * sigmoid(g[i]);
  }
}

#ifdef GF_X86_DISPATCH
// sigmoid on 8 lanes, as the scalar one (GCC does not vectorize exp_nonpos's loops: the clamp
// reads as control flow to it, so the AVX2 bodies are written out).
GF_AVX2 GF_INLINE __m256 sigmoid8(__m256 g) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f);
  const __m256 e = exp_nonpos8(_mm256_sub_ps(zero, _mm256_andnot_ps(_mm256_set1_ps(-0.f), g)));
  const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
  return _mm256_blendv_ps(r, _mm256_mul_ps(e, r), _mm256_cmp_ps(g, zero, _CMP_LT_OQ));
}

GF_AVX2 void forward_span_avx2(float* out, const float* g, const float* u, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid8(gv)), _mm256_loadu_ps(u + i)));
  }
  forward_span(out + i, g + i, u + i, n - i);
}

#endif

// bf16's backward: in fp32 from the bf16 values, each gradient rounded once (PyTorch's ops round
// after each of their ~9 steps). Its forward stays PyTorch's (F.silu(g) * u): with the rounding
// emulated in AVX2 a native one was 1.7-2x slower than PyTorch's AVX512 bf16 kernels here.
GF_INLINE void backward_span(uint16_t* gg, uint16_t* gu, const uint16_t* d, const uint16_t* g,
                             const uint16_t* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = bf16_to_f32(g[i]), dv = bf16_to_f32(d[i]), s = sigmoid(gv);
    if (gu != nullptr) gu[i] = f32_to_bf16(dv * gv * s);
    if (gg != nullptr) gg[i] = f32_to_bf16(dv * bf16_to_f32(u[i]) * s * (1.f + gv * (1.f - s)));
  }
}

#ifdef GF_X86_DISPATCH
// The backward on 8 lanes, for fp32 or bf16 arrays (load8 / store8 convert and round).
template <typename T>
GF_AVX2 void backward_span_avx2(T* gg, T* gu, const T* d, const T* g, const T* u, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = load8(g + i), dv = load8(d + i);
    const __m256 s = sigmoid8(gv);
    if (gu != nullptr) store8(gu + i, _mm256_mul_ps(_mm256_mul_ps(dv, gv), s));
    if (gg != nullptr) {
      const __m256 du_s = _mm256_mul_ps(_mm256_mul_ps(dv, load8(u + i)), s);
      const __m256 slope = _mm256_add_ps(one, _mm256_mul_ps(gv, _mm256_sub_ps(one, s)));
      store8(gg + i, _mm256_mul_ps(du_s, slope));
    }
  }
  backward_span(gg ? gg + i : nullptr, gu ? gu + i : nullptr, d + i, g + i, u + i, n - i);
}
#endif

void forward_any(float* out, const float* g, const float* u, int64_t n) {
#ifdef GF_X86_DISPATCH
  if (use_avx2()) return forward_span_avx2(out, g, u, n);
#endif
  forward_span(out, g, u, n);
}

template <typename T>
void backward_any(T* gg, T* gu, const T* d, const T* g, const T* u, int64_t n) {
#ifdef GF_X86_DISPATCH
  if (use_avx2()) return backward_span_avx2(gg, gu, d, g, u, n);
#endif
  backward_span(gg, gu, d, g, u, n);
}

template <typename T>
void silu_mul_backward_all(const char* name, uintptr_t grad_gate, uintptr_t grad_up, uintptr_t grad,
                           uintptr_t gate, uintptr_t up, int64_t n) {
  if (n < 0 || (n > 0 && (grad == 0 || gate == 0 || up == 0)))
    throw std::invalid_argument(std::string(name) + ": need n >= 0 and non-null inputs");
  if (grad_gate == 0 && grad_up == 0) return;
  auto* gg = reinterpret_cast<T*>(grad_gate);
  auto* gu = reinterpret_cast<T*>(grad_up);
  const auto* d = reinterpret_cast<const T*>(grad);
  const auto* g = reinterpret_cast<const T*>(gate);
  const auto* u = reinterpret_cast<const T*>(up);
  parallel_for_ranges(n, kChunk, [&](int64_t b, int64_t e) {
    backward_any(gg ? gg + b : nullptr, gu ? gu + b : nullptr, d + b, g + b, u + b, e - b);
  });
}
}  // namespace

void cpu_silu_mul(uintptr_t out, uintptr_t gate, uintptr_t up, int64_t n) {
  if (n < 0 || (n > 0 && (out == 0 || gate == 0 || up == 0)))
    throw std::invalid_argument("cpu_silu_mul: need n >= 0 and non-null pointers");
  auto* o = reinterpret_cast<float*>(out);
  const auto* g = reinterpret_cast<const float*>(gate);
  const auto* u = reinterpret_cast<const float*>(up);
  parallel_for_ranges(n, kChunk, [&](int64_t b, int64_t e) { forward_any(o + b, g + b, u + b, e - b); });
}

void cpu_silu_mul_backward(uintptr_t grad_gate, uintptr_t grad_up, uintptr_t grad, uintptr_t gate,
                           uintptr_t up, int64_t n) {
  silu_mul_backward_all<float>("cpu_silu_mul_backward", grad_gate, grad_up, grad, gate, up, n);
}

void cpu_silu_mul_backward_bf16(uintptr_t grad_gate, uintptr_t grad_up, uintptr_t grad, uintptr_t gate,
                                uintptr_t up, int64_t n) {
  silu_mul_backward_all<uint16_t>("cpu_silu_mul_backward_bf16", grad_gate, grad_up, grad, gate, up, n);
}

}  // namespace grpo_fast
