// CPU implementations of the KV-cache kernels (OpenMP). Pointers arrive as integers from
// Python (tensor.data_ptr()); the Python wrappers have checked shapes, dtypes and contiguity.
// These functions re-check every index they dereference (slots, block ids) and throw
// std::invalid_argument (a Python ValueError) instead of touching memory out of range.
#pragma once

#include <cstdint>

namespace grpo_fast {

// cache.view(-1, H, D)[slot[t]] = key[t] for slot[t] >= 0. dtype: kF32 / kBF16 (any 2-byte type
// is copied bitwise, so kF16 works here too).
void cpu_append_kv(uintptr_t key_cache, uintptr_t value_cache, uintptr_t key, uintptr_t value,
                   uintptr_t slot_mapping, int64_t num_tokens, int64_t num_slots,
                   int num_kv_heads, int head_dim, int dtype);

// cache[dst] = cache[src] for each (src, dst) row of an int64 [M, 2] mapping.
void cpu_copy_blocks(uintptr_t key_cache, uintptr_t value_cache, uintptr_t block_mapping,
                     int64_t num_pairs, int64_t num_blocks, int64_t block_elems, int dtype);

// One query per sequence over its paged K/V; fp32 accumulation; out has the query's dtype.
void cpu_paged_decode_attention(uintptr_t out, uintptr_t query, uintptr_t key_cache,
                                uintptr_t value_cache, uintptr_t block_tables,
                                uintptr_t context_lens, int64_t num_seqs, int num_q_heads,
                                int num_kv_heads, int head_dim, int block_size,
                                int64_t max_blocks, int64_t num_blocks, float scale, int dtype);

// Causal varlen attention, bottom-right aligned when a sequence has more keys than queries.
void cpu_prefill_attention(uintptr_t out, uintptr_t query, uintptr_t key, uintptr_t value,
                           uintptr_t cu_seqlens, uintptr_t cu_seqlens_k, int64_t batch,
                           int64_t num_tokens, int num_q_heads, int num_kv_heads, int head_dim,
                           float scale, int dtype);

}  // namespace grpo_fast
