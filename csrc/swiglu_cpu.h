// The gated MLP's activation silu(gate) * up over fp32 tensors on the CPU, forward and backward,
// each in one pass (see swiglu_cpu.cpp; Python side: grpo_fast/swiglu.py).
#pragma once

#include <cstdint>

namespace grpo_fast {

// out[i] = silu(gate[i]) * up[i] for i < n; all contiguous fp32. out may be gate or up.
void cpu_silu_mul(uintptr_t out, uintptr_t gate, uintptr_t up, int64_t n);

// With s = sigmoid(gate[i]), for i < n:
//   grad_up[i]   = grad[i] * gate[i] * s
//   grad_gate[i] = grad[i] * up[i] * s * (1 + gate[i] * (1 - s))
// grad_gate or grad_up may be 0 (not wanted); all contiguous fp32, outputs not overlapping inputs.
void cpu_silu_mul_backward(uintptr_t grad_gate, uintptr_t grad_up, uintptr_t grad, uintptr_t gate,
                           uintptr_t up, int64_t n);

// The backward over bf16 tensors: in fp32 from the bf16 values, each gradient rounded once.
void cpu_silu_mul_backward_bf16(uintptr_t grad_gate, uintptr_t grad_up, uintptr_t grad, uintptr_t gate,
                                uintptr_t up, int64_t n);

}  // namespace grpo_fast
