// Rotary position embedding of a decode step's q and k on the CPU (see rope_cpu.cpp).
#pragma once

#include <cstdint>

namespace grpo_fast {

// x_out[t, h, :] = x[t, h, :] * cos[t, :] + rotate_half(x[t, h, :]) * sin[t, :] for q (Hq heads)
// and k (Hkv heads), rotate_half(x) = cat(-x[D/2:], x[:D/2]) (HF's convention). q, k, cos, sin,
// q_out, k_out contiguous fp32: q [T, Hq, D], k [T, Hkv, D], cos/sin [T, D]; D even.
void cpu_rope_qk(uintptr_t q_out, uintptr_t k_out, uintptr_t q, uintptr_t k, uintptr_t cos,
                 uintptr_t sin, int64_t tokens, int num_q_heads, int num_kv_heads, int head_dim);

// The same over bf16 tensors (all six), each op rounded to bf16 as torch's bf16 ops round it:
// HF's apply_rotary_pos_emb on a bf16 model, bit for bit.
void cpu_rope_qk_bf16(uintptr_t q_out, uintptr_t k_out, uintptr_t q, uintptr_t k, uintptr_t cos,
                      uintptr_t sin, int64_t tokens, int num_q_heads, int num_kv_heads, int head_dim);

}  // namespace grpo_fast
