// RMSNorm over the last dim of fp32 rows on the CPU (see rms_norm_cpu.cpp).
#pragma once

#include <cstdint>

namespace grpo_fast {

// out[r, :] = weight * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)) for r < rows; x and out
// contiguous [rows, dim] fp32, weight [dim] fp32. out may be x.
void cpu_rms_norm(uintptr_t out, uintptr_t x, uintptr_t weight, int64_t rows, int64_t dim,
                  float eps);

// dL/dx of the above for the given dL/dout, weight held fixed (its gradient is the caller's):
// grad_x[r, :] = inv * weight * grad_out[r, :] - x[r, :] * inv^3 * mean(weight * grad_out[r, :] * x[r, :]),
// inv = 1 / sqrt(mean(x[r, :]^2) + eps). All contiguous fp32; grad_x must not overlap the inputs.
void cpu_rms_norm_backward(uintptr_t grad_x, uintptr_t grad_out, uintptr_t x, uintptr_t weight,
                           int64_t rows, int64_t dim, float eps);

// The same two over bf16 x, weight, out / grad_out, grad_x (contiguous), as HF's module computes
// the forward in bf16: out = bf16(weight * bf16(x * inv)), the sum of squares and the backward in
// fp32 from the bf16 values, each result rounded once (torch's round to nearest even).
void cpu_rms_norm_bf16(uintptr_t out, uintptr_t x, uintptr_t weight, int64_t rows, int64_t dim,
                       float eps);
void cpu_rms_norm_backward_bf16(uintptr_t grad_x, uintptr_t grad_out, uintptr_t x, uintptr_t weight,
                                int64_t rows, int64_t dim, float eps);

}  // namespace grpo_fast
