// CPU implementations of the KV-cache kernels (threads: parallel.h). Pointers arrive as integers from
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

// paged_decode_attention of sequences in groups that share a prefix: the rows of group g are
// group_rows[group_starts[g] .. group_starts[g + 1]) (group_starts [G + 1] rises from 0 to
// num_seqs, group_rows [num_seqs] is a permutation of the rows, both int32), and their first
// prefix_lens[g] tokens (int32 [G]; 0 = nothing shared) lie in the same blocks of every row's
// table (checked). The prefix is attended once for the whole group (its queries as one block,
// each key read once), each row's own keys [prefix, len) apart, and the two merged exactly
// through their log-sum-exp: out equals paged_decode_attention's to fp32 rounding.
void cpu_cascade_decode_attention(uintptr_t out, uintptr_t query, uintptr_t key_cache,
                                  uintptr_t value_cache, uintptr_t block_tables,
                                  uintptr_t context_lens, int64_t num_seqs, int num_q_heads,
                                  int num_kv_heads, int head_dim, int block_size,
                                  int64_t max_blocks, int64_t num_blocks, float scale, int dtype,
                                  uintptr_t group_rows, uintptr_t group_starts,
                                  uintptr_t prefix_lens, int64_t num_groups);

// Causal varlen attention, bottom-right aligned when a sequence has more keys than queries.
void cpu_prefill_attention(uintptr_t out, uintptr_t query, uintptr_t key, uintptr_t value,
                           uintptr_t cu_seqlens, uintptr_t cu_seqlens_k, int64_t batch,
                           int64_t num_tokens, int num_q_heads, int num_kv_heads, int head_dim,
                           float scale, int dtype);

}  // namespace grpo_fast
