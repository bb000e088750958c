// A bf16 matrix transposed into rows, or added into them, on the CPU (see transpose_bf16_cpu.cpp).
#pragma once

#include <cstdint>

namespace grpo_fast {

// dst[m, n] = src_t[n, m] (accumulate false), or bf16(float(dst[m, n]) + float(src_t[n, m]))
// (true: torch's bf16 add, rounded to nearest even) for m < M, n < N. src_t rows ld_src apart,
// dst rows ld_dst apart, both unit stride; they must not overlap.
void cpu_transpose_bf16(uintptr_t dst, uintptr_t src_t, int64_t M, int64_t N, int64_t ld_dst, int64_t ld_src,
                        bool accumulate);

}  // namespace grpo_fast
