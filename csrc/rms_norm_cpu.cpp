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
#include <string>

#include "common.h"
#include "cpu_common.h"
#include "parallel.h"

namespace grpo_fast {
namespace {

// 1 / sqrt(mean + eps) of a row's sum of squares: HF's rsqrt(variance + eps).
GF_INLINE float inv_rms(float ss, int64_t dim, float eps) {
  return 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
}

GF_INLINE void norm_row(float* out, const float* x, const float* w, int64_t dim, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < dim; ++i) ss += x[i] * x[i];
  const float inv = inv_rms(ss, dim, eps);
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
  const float inv = inv_rms(ss, dim, eps);
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

// bf16 rows, rounded where HF's module rounds in bf16: x upcast and normalized in fp32, the
// product rounded to bf16, then times the bf16 weight and rounded again:
//   out = bf16(w * bf16(x * inv));  the backward in fp32 from the bf16 inputs, rounded once.
GF_INLINE void norm_row_bf16(uint16_t* out, const uint16_t* x, const uint16_t* w, int64_t i,
                             int64_t dim, float inv) {
  for (; i < dim; ++i)
    out[i] = f32_to_bf16(bf16_to_f32(w[i]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(x[i]) * inv)));
}

void norm_rows(uint16_t* out, const uint16_t* x, const uint16_t* w, int64_t rows, int64_t dim,
               float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * dim;
    double ss = 0.0;  // a serial fp32 sum over a row drifts further from torch's than the 8 lanes do
    for (int64_t i = 0; i < dim; ++i) ss += bf16_to_f32(xr[i]) * bf16_to_f32(xr[i]);
    norm_row_bf16(out + r * dim, xr, w, 0, dim, inv_rms(static_cast<float>(ss), dim, eps));
  }
}

GF_INLINE void norm_backward_tail_bf16(uint16_t* dx, const uint16_t* dy, const uint16_t* x,
                                       const uint16_t* w, int64_t i, int64_t dim, float inv, float c) {
  for (; i < dim; ++i)
    dx[i] = f32_to_bf16(inv * (bf16_to_f32(w[i]) * bf16_to_f32(dy[i])) - c * bf16_to_f32(x[i]));
}

void norm_backward_rows(uint16_t* dx, const uint16_t* dy, const uint16_t* x, const uint16_t* w,
                        int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t *xr = x + r * dim, *dyr = dy + r * dim;
    double ss = 0.0, dot = 0.0;
    for (int64_t i = 0; i < dim; ++i) {
      const float xv = bf16_to_f32(xr[i]);
      ss += xv * xv;
      dot += bf16_to_f32(w[i]) * bf16_to_f32(dyr[i]) * xv;
    }
    const float inv = inv_rms(static_cast<float>(ss), dim, eps);
    norm_backward_tail_bf16(dx + r * dim, dyr, xr, w, 0, dim, inv,
                            inv * inv * inv * static_cast<float>(dot) / static_cast<float>(dim));
  }
}

#ifdef GF_X86_DISPATCH
GF_AVX2 void norm_rows_avx2(uint16_t* out, const uint16_t* x, const uint16_t* w, int64_t rows,
                            int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * dim;
    uint16_t* o = out + r * dim;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
      const __m256 v = load8(xr + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum8(acc);
    for (int64_t j = i; j < dim; ++j) ss += bf16_to_f32(xr[j]) * bf16_to_f32(xr[j]);
    const float inv = inv_rms(ss, dim, eps);
    const __m256 iv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= dim; i += 8)
      store8(o + i, _mm256_mul_ps(load8(w + i), stored8(o, _mm256_mul_ps(load8(xr + i), iv))));
    norm_row_bf16(o, xr, w, i, dim, inv);
  }
}

GF_AVX2 void norm_backward_rows_avx2(uint16_t* dx, const uint16_t* dy, const uint16_t* x,
                                     const uint16_t* w, int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t *xr = x + r * dim, *dyr = dy + r * dim;
    __m256 ssv = _mm256_setzero_ps(), dotv = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
      const __m256 xv = load8(xr + i);
      ssv = _mm256_fmadd_ps(xv, xv, ssv);
      dotv = _mm256_fmadd_ps(_mm256_mul_ps(load8(w + i), load8(dyr + i)), xv, dotv);
    }
    float ss = hsum8(ssv), dot = hsum8(dotv);
    for (int64_t j = i; j < dim; ++j) {
      const float xv = bf16_to_f32(xr[j]);
      ss += xv * xv;
      dot += bf16_to_f32(w[j]) * bf16_to_f32(dyr[j]) * xv;
    }
    const float inv = inv_rms(ss, dim, eps), c = inv * inv * inv * dot / static_cast<float>(dim);
    const __m256 iv = _mm256_set1_ps(inv), cv = _mm256_set1_ps(c);
    for (i = 0; i + 8 <= dim; i += 8) {
      const __m256 g = _mm256_mul_ps(load8(w + i), load8(dyr + i));
      store8(dx + r * dim + i, _mm256_fnmadd_ps(cv, load8(xr + i), _mm256_mul_ps(iv, g)));
    }
    norm_backward_tail_bf16(dx + r * dim, dyr, xr, w, i, dim, inv, c);
  }
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

namespace {
template <typename T>
void forward_all(const char* name, uintptr_t out, uintptr_t x, uintptr_t weight, int64_t rows, int64_t dim,
                 float eps) {
  if (rows < 0 || dim < 1) throw std::invalid_argument(std::string(name) + ": need rows >= 0, dim >= 1");
  auto* o = reinterpret_cast<T*>(out);
  const auto* xp = reinterpret_cast<const T*>(x);
  const auto* w = reinterpret_cast<const T*>(weight);
  // A decode step's [32, 576] is ~18k values: one thread, no fork/join.
  over_rows(rows, dim, [&](int64_t b, int64_t n) {
#ifdef GF_X86_DISPATCH
    if (use_avx2()) return norm_rows_avx2(o + b * dim, xp + b * dim, w, n, dim, eps);
#endif
    norm_rows(o + b * dim, xp + b * dim, w, n, dim, eps);
  });
}

template <typename T>
void backward_all(const char* name, uintptr_t grad_x, uintptr_t grad_out, uintptr_t x, uintptr_t weight,
                  int64_t rows, int64_t dim, float eps) {
  if (rows < 0 || dim < 1) throw std::invalid_argument(std::string(name) + ": need rows >= 0, dim >= 1");
  auto* dx = reinterpret_cast<T*>(grad_x);
  const auto* dy = reinterpret_cast<const T*>(grad_out);
  const auto* xp = reinterpret_cast<const T*>(x);
  const auto* w = reinterpret_cast<const T*>(weight);
  over_rows(rows, dim, [&](int64_t b, int64_t n) {
#ifdef GF_X86_DISPATCH
    if (use_avx2()) return norm_backward_rows_avx2(dx + b * dim, dy + b * dim, xp + b * dim, w, n, dim, eps);
#endif
    norm_backward_rows(dx + b * dim, dy + b * dim, xp + b * dim, w, n, dim, eps);
  });
}
}  // namespace

void cpu_rms_norm(uintptr_t out, uintptr_t x, uintptr_t weight, int64_t rows, int64_t dim, float eps) {
  forward_all<float>("cpu_rms_norm", out, x, weight, rows, dim, eps);
}

void cpu_rms_norm_bf16(uintptr_t out, uintptr_t x, uintptr_t weight, int64_t rows, int64_t dim, float eps) {
  forward_all<uint16_t>("cpu_rms_norm_bf16", out, x, weight, rows, dim, eps);
}

void cpu_rms_norm_backward(uintptr_t grad_x, uintptr_t grad_out, uintptr_t x, uintptr_t weight, int64_t rows,
                           int64_t dim, float eps) {
  backward_all<float>("cpu_rms_norm_backward", grad_x, grad_out, x, weight, rows, dim, eps);
}

void cpu_rms_norm_backward_bf16(uintptr_t grad_x, uintptr_t grad_out, uintptr_t x, uintptr_t weight,
                                int64_t rows, int64_t dim, float eps) {
  backward_all<uint16_t>("cpu_rms_norm_backward_bf16", grad_x, grad_out, x, weight, rows, dim, eps);
}

}  // namespace grpo_fast
