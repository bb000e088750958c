// Few-row fp32 linear layers on the CPU, AVX2+FMA (see linear_cpu.cpp). Pointers arrive as
// integers from Python (grpo_fast/models/cpu_linear.py), which has checked shapes, dtypes and
// strides; these functions check the sizes they are given.
#pragma once

#include <cstdint>

namespace grpo_fast {

// Whether this build and CPU can run the kernels below (AVX2 + FMA).
bool cpu_linear_available();

// out[m, n] = (accumulate ? out[m, n] : 0) + alpha * sum_k x[m, k] * weight[n, k] + bias[n]
// for m < M, n < N. x rows are ldx floats apart, out rows ldo; weight is contiguous [N, K];
// bias may be 0 (none). out must not overlap x or weight.
void cpu_linear(uintptr_t out, uintptr_t x, uintptr_t weight, uintptr_t bias, int64_t M,
                int64_t N, int64_t K, int64_t ldx, int64_t ldo, float alpha, bool accumulate);

// out[m, n] = silu(x @ w_gate^T)[m, n] * (x @ w_up^T)[m, n]: a gated MLP's input projections
// and activation in one pass (w_gate, w_up contiguous [N, K]).
void cpu_silu_mul_linear(uintptr_t out, uintptr_t x, uintptr_t w_gate, uintptr_t w_up, int64_t M,
                         int64_t N, int64_t K, int64_t ldx, int64_t ldo);

}  // namespace grpo_fast
