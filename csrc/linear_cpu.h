// Few-row fp32 linear layers on the CPU, AVX2+FMA (see linear_cpu.cpp). Pointers arrive as
// integers from Python (grpo_fast/models/cpu_linear.py), which has checked shapes, dtypes and
// strides; these functions check the sizes they are given.
#pragma once

#include <cstdint>
#include <vector>

namespace grpo_fast {

// Whether this build and CPU can run the kernels below (AVX2 + FMA).
bool cpu_linear_available();

// out[m, n] = (accumulate ? out[m, n] : 0) + alpha * sum_k x[m, k] * weight[n, k] + bias[n]
// for m < M, n < N. x rows are ldx floats apart, out rows ldo; weight is contiguous [N, K];
// bias may be 0 (none). out must not overlap x or weight.
void cpu_linear(uintptr_t out, uintptr_t x, uintptr_t weight, uintptr_t bias, int64_t M,
                int64_t N, int64_t K, int64_t ldx, int64_t ldo, float alpha, bool accumulate);

// out_i = x @ weights_i^T + biases_i for several weights read by the same x (a layer's q, k, v):
// x packed once, one parallel pass over the rows of all of them. ns[i] rows of weight i,
// outs[i] [M, ns[i]] with rows ldos[i] apart, biases[i] may be 0.
void cpu_linear_many(const std::vector<uintptr_t>& outs, uintptr_t x,
                     const std::vector<uintptr_t>& weights, const std::vector<uintptr_t>& biases,
                     const std::vector<int64_t>& ns, const std::vector<int64_t>& ldos, int64_t M,
                     int64_t K, int64_t ldx);

// out[m, n] = silu(x @ w_gate^T)[m, n] * (x @ w_up^T)[m, n]: a gated MLP's input projections
// and activation in one pass (w_gate, w_up contiguous [N, K]).
void cpu_silu_mul_linear(uintptr_t out, uintptr_t x, uintptr_t w_gate, uintptr_t w_up, int64_t M,
                         int64_t N, int64_t K, int64_t ldx, int64_t ldo);

}  // namespace grpo_fast
