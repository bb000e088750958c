// CPU token sampler (csrc/sampling_cpu.cpp): temperature, top-k, top-p, min-p, greedy, with the
// counter-based RNG of common.h. Pointers arrive as integers from Python (tensor.data_ptr());
// the Python wrapper has checked shapes, dtypes and contiguity.
#pragma once

#include <cstdint>

namespace grpo_fast {

// Sampling (see grpo_fast/sampler/sampling_op.py: sample): tokens int64 [S], logprobs fp32 [S].
void cpu_sample(uintptr_t tokens, uintptr_t logprobs, uintptr_t logits, uintptr_t temperature,
                uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seeds,
                uintptr_t steps, int64_t num_rows, int64_t vocab);

}  // namespace grpo_fast
