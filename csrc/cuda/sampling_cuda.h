// CUDA launcher of the token sampler (csrc/cuda/sampling_cuda.cu): same contract as
// csrc/sampling_cpu.h, plus a workspace and the stream (torch.cuda.current_stream().cuda_stream)
// as the last argument.
#pragma once

#include <cstdint>

namespace grpo_fast {

// workspace: fp32 [num_rows, vocab] scratch for the probabilities.
void cuda_sample(uintptr_t tokens, uintptr_t logprobs, uintptr_t logits, uintptr_t temperature,
                 uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seeds,
                 uintptr_t steps, int64_t num_rows, int64_t vocab, uintptr_t workspace,
                 uintptr_t stream);

}  // namespace grpo_fast
