// The training pass's attention on the CPU in fp32, forward and backward (flash attention's
// recomputing backward), with GQA at the kv heads' own size and a keep mask. The kernels live in
// cascade_f32_cpu.cpp beside the cascade's prefix item, whose query-lane tiles they share
// (train_attention_item.inc). Python: grpo_fast/train/cpu_attention.py.
#pragma once

#include <cstdint>

namespace grpo_fast {

struct TrainAttention {
  const float* q;          // [B, Hq, T, D], contiguous
  const float* k;          // [B, Hkv, S, D]
  const float* v;          // [B, Hkv, S, D]
  const uint8_t* keep;     // [Bm, T, S] 1 = attend (Bm = B, or 1 with keep_bstride 0); null: no mask
  int64_t keep_bstride;    // elements between batch rows of keep (T * S, or 0)
  bool causal;             // no keep mask: token i attends keys j <= i (T == S)
  int64_t B;
  int Hq, Hkv;
  int64_t T, S;
  int D;                   // D % 8 == 0
  float scale;
};

// out [B, Hq, T, D] = softmax(scale q k^T + mask) v, lse [B, Hq, T] = log-sum-exp of each row's
// scores (+inf for a token that attends no key; its output is 0). wide: zmm, else ymm.
void cpu_train_attention_forward(const TrainAttention& a, float* out, float* lse, bool wide);

// dq, dk, dv (shapes of q, k, v) from dout and the forward's out and lse.
void cpu_train_attention_backward(const TrainAttention& a, const float* out, const float* lse, const float* dout,
                                  float* dq, float* dk, float* dv, bool wide);

}  // namespace grpo_fast
