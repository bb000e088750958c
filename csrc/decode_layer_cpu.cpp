// The decoder stack of a CPU decode step as a single call into the kernels it is made of
// (rms_norm_cpu, linear_cpu, rope_cpu, kv_cpu). Called layer by layer from Python, the same
// chain cost ~0.6 ms of interpreter and tensor bookkeeping per layer at 32 sequences, ~10% of a
// SmolLM2-135M decode step; here it is a dozen direct calls per layer into scratch buffers that
// live as long as the thread, and the weights (LoRA adapters included) are a DecodeModel built
// once per generate call.
#include "decode_layer_cpu.h"

#include <stdexcept>
#include <string>

#include "common.h"
#include "kv_cpu.h"
#include "linear_cpu.h"
#include "rms_norm_cpu.h"
#include "rope_cpu.h"

namespace grpo_fast {

namespace {
enum Weight {
  kInNorm, kQ, kQBias, kK, kKBias, kV, kVBias, kO, kOBias, kPostNorm, kGate, kUp, kDown, kNumWeights
};
enum Proj { kProjQ, kProjK, kProjV, kProjO, kProjGate, kProjUp, kProjDown };

uintptr_t ptr(const std::vector<float>& v) { return reinterpret_cast<uintptr_t>(v.data()); }

void check_layer(const DecodeLayerWeights& l, size_t idx) {
  const std::string where = "cpu_decode_layers: layer " + std::to_string(idx);
  if (l.w.size() != kNumWeights || l.eps.size() != 2)
    throw std::invalid_argument(where + ": need 13 weight pointers and 2 eps values");
  for (int i : {kInNorm, kQ, kK, kV, kO, kPostNorm, kGate, kUp, kDown})
    if (l.w[i] == 0) throw std::invalid_argument(where + ": weight " + std::to_string(i) + " is null");
  for (const auto& terms : l.lora)
    for (const LoraTerm& t : terms)
      if (t.a == nullptr || t.b == nullptr || t.r < 1)
        throw std::invalid_argument(where + ": a LoRA term has a null weight or rank < 1");
}

void decode_layer(const DecodeModel& md, const DecodeLayerWeights& L, uintptr_t hidden, int64_t M,
                  uintptr_t cos, uintptr_t sin, uintptr_t key_cache, uintptr_t value_cache,
                  const DecodeStepMeta& st) {
  const int64_t H = md.hidden, I = md.intermediate;
  const int hq = md.num_q_heads, hkv = md.num_kv_heads, D = md.head_dim;
  const int64_t qd = static_cast<int64_t>(hq) * D, kd = static_cast<int64_t>(hkv) * D;
  const std::vector<uintptr_t>& w = L.w;
  thread_local std::vector<float> x, q, k, v, q_rot, k_rot, attn, inner;
  x.resize(M * H);
  q.resize(M * qd);
  q_rot.resize(M * qd);
  attn.resize(M * qd);
  k.resize(M * kd);
  k_rot.resize(M * kd);
  v.resize(M * kd);
  inner.resize(M * I);

  // attention block
  cpu_rms_norm(ptr(x), hidden, w[kInNorm], M, H, static_cast<float>(L.eps[0]));
  cpu_linear_many({ptr(q), ptr(k), ptr(v)}, ptr(x), {w[kQ], w[kK], w[kV]},
                  {w[kQBias], w[kKBias], w[kVBias]}, {qd, kd, kd}, {qd, kd, kd}, M, H, H,
                  {L.lora[kProjQ], L.lora[kProjK], L.lora[kProjV]});
  cpu_rope_qk(ptr(q_rot), ptr(k_rot), ptr(q), ptr(k), cos, sin, M, hq, hkv, D);
  cpu_append_kv(key_cache, value_cache, ptr(k_rot), ptr(v), st.slots, M,
                st.num_blocks * st.block_size, hkv, D, kF32);
  if (st.num_groups > 0)
    cpu_cascade_decode_attention(ptr(attn), ptr(q_rot), key_cache, value_cache, st.block_tables,
                                 st.context_lens, M, hq, hkv, D, st.block_size, st.max_blocks,
                                 st.num_blocks, st.scale, kF32, st.group_rows, st.group_starts,
                                 st.prefix_lens, st.num_groups);
  else
    cpu_paged_decode_attention(ptr(attn), ptr(q_rot), key_cache, value_cache, st.block_tables,
                               st.context_lens, M, hq, hkv, D, st.block_size, st.max_blocks,
                               st.num_blocks, st.scale, kF32);
  cpu_linear(hidden, ptr(attn), w[kO], w[kOBias], M, H, qd, qd, H, 1.f, true, L.lora[kProjO]);
  // MLP block
  cpu_rms_norm(ptr(x), hidden, w[kPostNorm], M, H, static_cast<float>(L.eps[1]));
  cpu_silu_mul_linear(ptr(inner), ptr(x), w[kGate], w[kUp], M, I, H, H, I, L.lora[kProjGate],
                      L.lora[kProjUp]);
  cpu_linear(hidden, ptr(inner), w[kDown], 0, M, H, I, I, H, 1.f, true, L.lora[kProjDown]);
}
}  // namespace

void cpu_decode_layers(const DecodeModel& model, uintptr_t hidden, int64_t M, uintptr_t cos,
                       uintptr_t sin, uintptr_t kv_cache, int64_t layer_bytes,
                       const DecodeStepMeta& step) {
  for (size_t i = 0; i < model.layers.size(); ++i) check_layer(model.layers[i], i);
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const uintptr_t key = kv_cache + 2 * i * static_cast<uintptr_t>(layer_bytes);
    decode_layer(model, model.layers[i], hidden, M, cos, sin, key, key + layer_bytes, step);
  }
}

}  // namespace grpo_fast
