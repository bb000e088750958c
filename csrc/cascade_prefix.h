// The cascade's shared-prefix work item as kv_cpu.cpp hands it to the prefix items
// (cascade_f32_cpu.h: fp32 arithmetic; cascade_bf16_cpu.h: vdpbf16ps over a bf16 cache), and the
// walk over the prefix's cache rows that both items take.
#pragma once

#include <cstdint>

#include "common.h"

namespace grpo_fast {

// One group of a cascade step against its shared prefix.
struct GroupPrefix {
  const void* q;          // query [S, hq, D], fp32 or bf16 (as the cache)
  const void* kc;         // key cache [blocks, bs, hkv, D]
  const void* vc;         // value cache, same layout
  const int32_t* table;   // block table row of the group's first sequence (prefix blocks shared)
  const int32_t* rows;    // the group's G query rows
  int64_t G;
  int hq, hkv, D, bs;     // D % 8 == 0 (the bf16 item: D % 16 == 0)
  float scale;
  bool bf16;              // the caches (and q) hold bf16, else fp32
};

// The cache rows (K, V) of prefix keys [j0, j0 + n) of kv head h (kc, vc: p's caches as T),
// walking the block table without a division per key.
template <typename T>
inline void cache_rows(const GroupPrefix& p, const T* kc, const T* vc, int h, int64_t j0, int n, const T** k,
                       const T** v) {
  int64_t block = j0 / p.bs;
  int in_block = static_cast<int>(j0 % p.bs);
  for (int t = 0; t < n; ++t) {
    const int64_t off = kv_offset(static_cast<int64_t>(p.table[block]) * p.bs + in_block, h, p.hkv, p.D);
    k[t] = kc + off;
    v[t] = vc + off;
    if (++in_block == p.bs) {
      in_block = 0;
      ++block;
    }
  }
}

}  // namespace grpo_fast
