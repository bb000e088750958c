// RMSNorm of a decode step's few rows in one pass per row, where the HF module runs seven
// tensor ops (upcast, pow, mean, add, rsqrt, mul, mul), each a few microseconds of dispatch for
// a [32, 576] tensor. Same math in fp32: the sum of squares accumulated in 8 lanes, then
// x * (1 / sqrt(mean + eps)) * weight, as HF orders it (x * rsqrt(var + eps), then weight *).
//
// And the training pass's backward, one pass per row where autograd runs ~10 tensor ops over
// [T, H]: with r = 1 / sqrt(mean(x^2) + eps) and g = w * dy,
//   dx = r * g - x * r^3 * mean(g * x)
// (r recomputed from x, so the forward keeps only x). Rows are spread over the pool when there
// are enough of them (a training pass's thousand; a decode step's 32 stay on one thread).
#include "rms_norm_cpu.h"

#include <cmath>
#include <stdexcept>

#include "cpu_common.h"
#include "parallel.h"

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

GF_INLINE void norm_backward_row(float* dx, const float* dy, const float* x, const float* w,
                                  int64_t dim, float eps) {
  float ss = 0.f, dot = 0.f;
#pragma omp simd reduction(+ : ss, dot)
  for (int64_t i = 0; i < dim; ++i) {
    ss += x[i] * x[i];
    dot += w[i] * dy[i] * x[i];
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
  const float c = inv * inv * inv * dot / static_cast<float>(dim);
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) dx[i] = inv * (w[i] * dy[i]) - c * x[i];
}

void norm_rows(float* out, const float* x, const float* w, int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) norm_row(out + r * dim, x + r * dim, w, dim, eps);
}

void norm_backward_rows(float* dx, const float* dy, const float* x, const float* w, int64_t rows,
                        int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r)
    norm_backward_row(dx + r * dim, dy + r * dim, x + r * dim, w, dim, eps);
}

#ifdef GF_X86_DISPATCH
GF_AVX2 void norm_rows_avx2(float* out, const float* x, const float* w, int64_t rows, int64_t dim,
                            float eps) {
  for (int64_t r = 0; r < rows; ++r) norm_row(out + r * dim, x + r * dim, w, dim, eps);
}

GF_AVX2 void norm_backward_rows_avx2(float* dx, const float* dy, const float* x, const float* w,
                                     int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r)
    norm_backward_row(dx + r * dim, dy + r * dim, x + r * dim, w, dim, eps);
}
#endif

// fn(first_row, rows) over [0, rows): inline below ~64k floats (a decode step), else in chunks
// of ~16k floats over the pool.
template <typename F>
void over_rows(int64_t rows, int64_t dim, F&& fn) {
  constexpr int64_t kChunkFloats = 1 << 14;
  if (rows * dim < 4 * kChunkFloats) return fn(int64_t{0}, rows);
  const int64_t per = kChunkFloats / dim > 0 ? kChunkFloats / dim : 1;
  parallel_for_ranges(rows, per, [&](int64_t b, int64_t e) { fn(b, e - b); });
}

}  // namespace

void cpu_rms_norm(uintptr_t out, uintptr_t x, uintptr_t weight, int64_t rows, int64_t dim,
                  float eps) {
  if (rows < 0 || dim < 1) throw std::invalid_argument("cpu_rms_norm: need rows >= 0, dim >= 1");
  auto* o = reinterpret_cast<float*>(out);
  const auto* xp = reinterpret_cast<const float*>(x);
  const auto* w = reinterpret_cast<const float*>(weight);
  // A decode step's [32, 576] is ~18k floats: one thread, no fork/join.
  over_rows(rows, dim, [&](int64_t b, int64_t n) {
#ifdef GF_X86_DISPATCH
    if (use_avx2()) return norm_rows_avx2(o + b * dim, xp + b * dim, w, n, dim, eps);
#endif
    norm_rows(o + b * dim, xp + b * dim, w, n, dim, eps);
  });
}

void cpu_rms_norm_backward(uintptr_t grad_x, uintptr_t grad_out, uintptr_t x, uintptr_t weight,
                           int64_t rows, int64_t dim, float eps) {
  if (rows < 0 || dim < 1)
    throw std::invalid_argument("cpu_rms_norm_backward: need rows >= 0, dim >= 1");
  auto* dx = reinterpret_cast<float*>(grad_x);
  const auto* dy = reinterpret_cast<const float*>(grad_out);
  const auto* xp = reinterpret_cast<const float*>(x);
  const auto* w = reinterpret_cast<const float*>(weight);
  over_rows(rows, dim, [&](int64_t b, int64_t n) {
#ifdef GF_X86_DISPATCH
    if (use_avx2()) return norm_backward_rows_avx2(dx + b * dim, dy + b * dim, xp + b * dim, w, n, dim, eps);
#endif
    norm_backward_rows(dx + b * dim, dy + b * dim, xp + b * dim, w, n, dim, eps);
  });
}

}  // namespace grpo_fast
