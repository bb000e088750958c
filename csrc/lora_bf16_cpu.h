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

// The same added into transposed base products, in place, for several outputs that read the same
// x (a layer's q, k and v; gate and up): out_t[o][n, m] (rows ldos[o] apart, unit stride over
// m, n < ns[o]) = bf16(float(out_t[o][n, m]) + sum_t scale_t * sum_j B_t[n, j] u_t[m, j]) over
// output o's terms, u_t[m, j] = sum_k float(x[m, k]) A_t[j, k], with x given as [M, K] rows
// (x_transposed false) or as x^T [K, M] (true), rows ldx apart either way. The outputs must
// not overlap x or each other.
void cpu_lora_add_bf16_t(const std::vector<uintptr_t>& outs_t, const std::vector<int64_t>& ns,
                         const std::vector<int64_t>& ldos, uintptr_t x, int64_t M, int64_t K, int64_t ldx,
                         bool x_transposed, const std::vector<std::vector<LoraTerm>>& terms);

}  // namespace grpo_fast
