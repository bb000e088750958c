// RMSNorm over the last dim of fp32 rows on the CPU (see rms_norm_cpu.cpp).
#pragma once

#include <cstdint>

namespace grpo_fast {

// out[r, :] = weight * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)) for r < rows; x and out
// contiguous [rows, dim] fp32, weight [dim] fp32. out may be x.
void cpu_rms_norm(uintptr_t out, uintptr_t x, uintptr_t weight, int64_t rows, int64_t dim,
                  float eps);

}  // namespace grpo_fast
