// peft's fp32 LoRA terms added into a bf16 base layer's output on the CPU (see lora_bf16_cpu.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "linear_cpu.h"  // LoraTerm

namespace grpo_fast {

// out[m, n] = bf16(float(out[m, n]) + sum_t scale_t * sum_j (sum_k float(x[m, k]) A_t[j, k]) B_t[n, j])
// for m < M, n < N: out and x bf16 rows (row strides ldo, ldx), the terms' A [r, K] and B [N, r]
// contiguous fp32. out must not overlap x.
void cpu_lora_add_bf16(uintptr_t out, uintptr_t x, int64_t M, int64_t N, int64_t K, int64_t ldx,
                       int64_t ldo, const std::vector<LoraTerm>& terms);

// The same added into a transposed base product, in place: out_t[n, m] (rows ldo apart, unit
// stride over m) = bf16(float(out_t[n, m]) + sum_t scale_t * sum_j B_t[n, j] u_t[m, j]), u_t[m, j]
// = sum_k float(x[m, k]) A_t[j, k], with x given as [M, K] rows (x_transposed false) or as
// x^T [K, M] (true), rows ldx apart either way. out_t must not overlap x.
void cpu_lora_add_bf16_t(uintptr_t out_t, uintptr_t x, int64_t M, int64_t N, int64_t K, int64_t ldx,
                         bool x_transposed, int64_t ldo, const std::vector<LoraTerm>& terms);

}  // namespace grpo_fast
