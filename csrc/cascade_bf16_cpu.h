// The cascade's shared-prefix item for a bf16 KV cache on CPUs with AVX512-BF16 (vdpbf16ps:
// bf16 pairs multiplied, fp32 accumulation). Called by kv_cpu.cpp's cascade in place of its
// AVX2 prefix item, which converts every bf16 key and value to fp32 first.
#pragma once

#include <cstdint>

#include "cascade_prefix.h"

namespace grpo_fast {

// Whether cascade_prefix_bf16 (and kv_cpu.cpp's vdpbf16ps scores of the per-sequence kernel) may
// run: AVX2 is in use (use_avx2), the CPU has AVX512 F / VL / BW and BF16, and
// GRPO_FAST_NO_AVX512_BF16=1 is not set (tests run both paths on one machine).
bool use_avx512_bf16();

// Keys [k0, k1) of the prefix for kv head h (p: a bf16 cache, D % 16 == 0), all G * rep queries
// of the group at once. For row i < G and query head r < rep of that kv head, writes the
// unnormalized online-softmax state (acc[D], m, l) at part + i * part_stride + (h * rep + r) * (D + 2):
//   s_j = scale * q . k_j (fp32 sums of exact bf16 products), m = max_j s_j,
//   l = sum_j exp(s_j - m), acc = sum_j bf16(exp(s_j - m)) v_j.
// The weights are rounded to bf16 for the P.V products (as flash attention does on GPUs); l
// sums them unrounded, so the merged output differs from fp32 weights by < 2^-9 relative.
void cascade_prefix_bf16(const GroupPrefix& p, int h, int64_t k0, int64_t k1, float* part,
                         int64_t part_stride);

}  // namespace grpo_fast
