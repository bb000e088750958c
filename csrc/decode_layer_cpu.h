// A whole Llama-family decoder layer of a CPU decode step in one call (see decode_layer_cpu.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace grpo_fast {

// hidden [M, H] fp32 is updated in place:
//   x = rms_norm(hidden, w[in_norm]);  q, k, v = x Wq^T + bq, x Wk^T + bk, x Wv^T + bv
//   q, k = rope(q, k; cos, sin);  append k, v at `slots`;  a = paged attention(q; tables, lens)
//   hidden += a Wo^T + bo;  x = rms_norm(hidden, w[post_norm]);  hidden += (silu(x Wg^T) * x Wu^T) Wd^T
// weights: {in_norm, wq, bq, wk, bk, wv, bv, wo, bo, post_norm, wg, wu, wd} (biases may be 0),
// all contiguous fp32; eps: {in_norm eps, post_norm eps}; cos/sin [M, D]; caches
// [num_blocks, block_size, Hkv, D] fp32; slots [M], context_lens [M], block_tables
// [M, max_blocks] int32 (checked by the kernels).
void cpu_decode_layer(uintptr_t hidden, int64_t M, int64_t H, int64_t I, int num_q_heads,
                      int num_kv_heads, int head_dim, const std::vector<uintptr_t>& weights,
                      const std::vector<double>& eps, uintptr_t cos, uintptr_t sin,
                      uintptr_t key_cache, uintptr_t value_cache, uintptr_t slots,
                      uintptr_t block_tables, uintptr_t context_lens, int64_t max_blocks,
                      int64_t num_blocks, int block_size, float scale);

}  // namespace grpo_fast
