// Few-row fp32 linear layers on the CPU, AVX2+FMA (see linear_cpu.cpp). Pointers arrive as
// integers from Python (grpo_fast/models/cpu_ops.py), which has checked shapes, dtypes and
// strides; these functions check the sizes they are given.
#pragma once

#include <cstdint>
#include <vector>

namespace grpo_fast {

// Whether this build and CPU can run the kernels below (AVX2 + FMA).
bool cpu_linear_available();

// Whether they run their AVX-512 tiles (6 weight rows x 32 x rows on zmm) rather than the AVX2
// ones: use_avx2, AVX-512 F, and GRPO_FAST_NO_AVX512=1 not set. Same results bit for bit.
bool cpu_linear_avx512();

// One LoRA adapter of a linear layer: adds scale * (x A^T) B^T, A [r, K] and B [N, r] contiguous
// fp32 (peft's lora_A / lora_B weights, read in place).
struct LoraTerm {
  const float* a;
  const float* b;
  int64_t r;
  float scale;
};

// out[m, n] = (accumulate ? out[m, n] : 0) + alpha * (sum_k x[m, k] * weight[n, k] + lora) + bias[n]
// for m < M, n < N, lora = sum over the terms of scale * (x A^T B^T)[m, n]. x rows are ldx
// floats apart, out rows ldo; weight is contiguous [N, K]; bias may be 0 (none). out must not
// overlap x or the weights.
void cpu_linear(uintptr_t out, uintptr_t x, uintptr_t weight, uintptr_t bias, int64_t M,
                int64_t N, int64_t K, int64_t ldx, int64_t ldo, float alpha, bool accumulate,
                const std::vector<LoraTerm>& lora = {});

// out_i = x @ weights_i^T + lora_i(x) + biases_i for several weights read by the same x (a
// layer's q, k, v): x packed once, one parallel pass over the rows of all of them. ns[i] rows of
// weight i, outs[i] [M, ns[i]] with rows ldos[i] apart, biases[i] may be 0; lora: empty, or one
// (possibly empty) list of terms per weight.
void cpu_linear_many(const std::vector<uintptr_t>& outs, uintptr_t x,
                     const std::vector<uintptr_t>& weights, const std::vector<uintptr_t>& biases,
                     const std::vector<int64_t>& ns, const std::vector<int64_t>& ldos, int64_t M,
                     int64_t K, int64_t ldx, const std::vector<std::vector<LoraTerm>>& lora = {});

// out[m, n] = silu(g)[m, n] * u[m, n], g = x @ w_gate^T + lora_gate(x), u = x @ w_up^T +
// lora_up(x): a gated MLP's input projections and activation in one pass (w_gate, w_up
// contiguous [N, K]).
void cpu_silu_mul_linear(uintptr_t out, uintptr_t x, uintptr_t w_gate, uintptr_t w_up, int64_t M,
                         int64_t N, int64_t K, int64_t ldx, int64_t ldo,
                         const std::vector<LoraTerm>& lora_gate = {},
                         const std::vector<LoraTerm>& lora_up = {});

}  // namespace grpo_fast
