// RMSNorm of a decode step's few rows in one pass per row, where the HF module runs seven
// tensor ops (upcast, pow, mean, add, rsqrt, mul, mul), each a few microseconds of dispatch for
// a [32, 576] tensor. Same math in fp32: the sum of squares accumulated in 8 lanes, then
// x * (1 / sqrt(mean + eps)) * weight, as HF orders it (x * rsqrt(var + eps), then weight *).
#include "rms_norm_cpu.h"

#include <cmath>
#include <stdexcept>

#include "cpu_common.h"

namespace grpo_fast {
namespace {

GF_INLINE void norm_row(float* out, const float* x, const float* w, int64_t dim, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < dim; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) out[i] = w[i] * (x[i] * inv);
}

void norm_rows(float* out, const float* x, const float* w, int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) norm_row(out + r * dim, x + r * dim, w, dim, eps);
}

#ifdef GF_X86_DISPATCH
GF_AVX2 void norm_rows_avx2(float* out, const float* x, const float* w, int64_t rows, int64_t dim,
                            float eps) {
  for (int64_t r = 0; r < rows; ++r) norm_row(out + r * dim, x + r * dim, w, dim, eps);
}
#endif

}  // namespace

void cpu_rms_norm(uintptr_t out, uintptr_t x, uintptr_t weight, int64_t rows, int64_t dim,
                  float eps) {
  if (rows < 0 || dim < 1) throw std::invalid_argument("cpu_rms_norm: need rows >= 0, dim >= 1");
  auto* o = reinterpret_cast<float*>(out);
  const auto* xp = reinterpret_cast<const float*>(x);
  const auto* w = reinterpret_cast<const float*>(weight);
  // A decode step's [32, 576] is ~18k floats: one thread, no fork/join.
#ifdef GF_X86_DISPATCH
  if (use_avx2()) return norm_rows_avx2(o, xp, w, rows, dim, eps);
#endif
  norm_rows(o, xp, w, rows, dim, eps);
}

}  // namespace grpo_fast
