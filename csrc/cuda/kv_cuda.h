// CUDA launchers of the KV-cache kernels: same contracts as csrc/kv_cpu.h, plus the stream
// (torch.cuda.current_stream().cuda_stream) as the last argument. dtype: kF32 / kBF16 / kF16.
// No host-side index checks here (they would need a device sync): the kernels skip slots and
// block ids outside the cache instead of touching memory out of range.
#pragma once

#include <cstdint>

namespace grpo_fast {

void cuda_append_kv(uintptr_t key_cache, uintptr_t value_cache, uintptr_t key, uintptr_t value,
                    uintptr_t slot_mapping, int64_t num_tokens, int64_t num_slots,
                    int num_kv_heads, int head_dim, int dtype, uintptr_t stream);

void cuda_copy_blocks(uintptr_t key_cache, uintptr_t value_cache, uintptr_t block_mapping,
                      int64_t num_pairs, int64_t num_blocks, int64_t block_elems, int dtype,
                      uintptr_t stream);

void cuda_paged_decode_attention(uintptr_t out, uintptr_t query, uintptr_t key_cache,
                                 uintptr_t value_cache, uintptr_t block_tables,
                                 uintptr_t context_lens, int64_t num_seqs, int num_q_heads,
                                 int num_kv_heads, int head_dim, int block_size,
                                 int64_t max_blocks, int64_t num_blocks, float scale, int dtype,
                                 uintptr_t stream);

// cpu_cascade_decode_attention's contract (kv_cpu.h), head_dim <= 128, with what the host
// knows and the device would need a sync for: max_prefix >= every prefix_lens[g] and max_group
// >= every group's size (they size the grid), and a workspace of at least
// cascade_workspace_floats(...) fp32 for the partial states. The prefix blocks are not checked
// here (the caller built the groups from the tables).
void cuda_cascade_decode_attention(uintptr_t out, uintptr_t query, uintptr_t key_cache,
                                   uintptr_t value_cache, uintptr_t block_tables,
                                   uintptr_t context_lens, int64_t num_seqs, int num_q_heads,
                                   int num_kv_heads, int head_dim, int block_size,
                                   int64_t max_blocks, int64_t num_blocks, float scale, int dtype,
                                   uintptr_t group_rows, uintptr_t group_starts,
                                   uintptr_t prefix_lens, int64_t num_groups,
                                   int64_t max_prefix, int64_t max_group, uintptr_t workspace,
                                   int64_t workspace_floats, uintptr_t stream);
int64_t cascade_workspace_floats(int64_t num_seqs, int num_q_heads, int head_dim,
                                 int64_t num_groups, int64_t max_prefix, int64_t max_group);

void cuda_prefill_attention(uintptr_t out, uintptr_t query, uintptr_t key, uintptr_t value,
                            uintptr_t cu_seqlens, uintptr_t cu_seqlens_k, int64_t batch,
                            int64_t num_tokens, int num_q_heads, int num_kv_heads, int head_dim,
                            float scale, int dtype, uintptr_t stream);

}  // namespace grpo_fast
