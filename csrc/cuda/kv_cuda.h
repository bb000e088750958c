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

void cuda_prefill_attention(uintptr_t out, uintptr_t query, uintptr_t key, uintptr_t value,
                            uintptr_t cu_seqlens, uintptr_t cu_seqlens_k, int64_t batch,
                            int64_t num_tokens, int num_q_heads, int num_kv_heads, int head_dim,
                            float scale, int dtype, uintptr_t stream);

}  // namespace grpo_fast
