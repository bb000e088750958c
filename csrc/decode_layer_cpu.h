// The decoder stack of a CPU decode step in one call (see decode_layer_cpu.cpp).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "linear_cpu.h"

namespace grpo_fast {

// One Llama-family decoder layer's weights, read in place at every call: {in_norm, wq, bq, wk, bk,
// wv, bv, wo, bo, post_norm, wg, wu, wd} (biases may be 0), all contiguous fp32; the two norm
// eps; and the active LoRA adapters of q, k, v, o, gate, up, down (peft's lora_A / lora_B
// weights and scaling, any number per projection, none for a plain layer).
struct DecodeLayerWeights {
  std::vector<uintptr_t> w;
  std::vector<double> eps;
  std::array<std::vector<LoraTerm>, 7> lora;
};

// The stack: built once per generate call (grpo_fast/models/native_decode.py), so a step does no
// per-layer argument conversion; the weights behind the pointers may change between calls.
struct DecodeModel {
  int64_t hidden, intermediate;
  int num_q_heads, num_kv_heads, head_dim;
  std::vector<DecodeLayerWeights> layers;
};

// The rows' paged KV metadata of one decode step (checked by the attention kernel): slots [M],
// block_tables [M, max_blocks], context_lens [M] int32; with num_groups > 0, cascade attention:
// rows of group g = group_rows[group_starts[g] .. group_starts[g + 1]) share their first
// prefix_lens[g] tokens' blocks (kv_cpu.h: cpu_cascade_decode_attention).
struct DecodeStepMeta {
  uintptr_t slots, block_tables, context_lens;
  int64_t max_blocks, num_blocks;
  int block_size;
  float scale;
  uintptr_t group_rows, group_starts, prefix_lens;
  int64_t num_groups;
};

// hidden [M, H] fp32 goes through every layer in place:
//   x = rms_norm(hidden, in_norm);  q, k, v = x Wq^T + bq + lora_q(x), ...
//   q, k = rope(q, k; cos, sin);  append k, v at `slots`;  a = paged attention(q; tables, lens)
//   hidden += a Wo^T + bo + lora_o(a);  x = rms_norm(hidden, post_norm)
//   hidden += (silu(x Wg^T + lora_g(x)) * (x Wu^T + lora_u(x))) Wd^T + lora_d(.)
// cos/sin [M, D]; kv_cache: layer l's key cache at kv_cache + 2 l layer_bytes, its value cache
// layer_bytes further, each [num_blocks, block_size, Hkv, D] fp32.
void cpu_decode_layers(const DecodeModel& model, uintptr_t hidden, int64_t M, uintptr_t cos,
                       uintptr_t sin, uintptr_t kv_cache, int64_t layer_bytes,
                       const DecodeStepMeta& step);

}  // namespace grpo_fast
