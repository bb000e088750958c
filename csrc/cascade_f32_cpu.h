// The cascade's shared-prefix item in fp32 arithmetic, for an fp32 KV cache (and a bf16 one where
// cascade_bf16_cpu.h's vdpbf16ps item cannot run), on AVX2 (ymm) or AVX-512 F (zmm). Called by
// kv_cpu.cpp's cascade for each (group, kv head, prefix split).
#pragma once

#include <cstdint>

#include "cascade_prefix.h"

namespace grpo_fast {

// Query tokens per block where the query-lane kernels take a run of tokens at once (the blocked
// prefill, the training attention): QB tokens x rep heads fill 48 lanes, 3 zmm / 6 ymm registers.
constexpr int kBlockQueryLanes = 48;
inline int block_tokens(int rep) { return rep >= kBlockQueryLanes ? 1 : kBlockQueryLanes / rep; }

// Keys [k0, k1) of the prefix for kv head h, all nq = G * rep queries of the group at once. For
// row i < G and query head r < rep of that kv head, writes the unnormalized online-softmax state
// (acc[D], m, l) at part + i * part_stride + (h * rep + r) * (D + 2):
//   s_j = (scale * q) . k_j,  m = max_j s_j,  l = sum_j exp(s_j - m),  acc = sum_j exp(s_j - m) v_j,
// all in fp32. wide: zmm (16 lanes, use_avx512()) instead of ymm (8). Both do the same
// operations per output element in the same order, so their results are equal bit for bit.
void cascade_prefix_f32(const GroupPrefix& p, bool wide, int h, int64_t k0, int64_t k1, float* part,
                        int64_t part_stride);

}  // namespace grpo_fast
