// One decoder layer of a CPU decode step as a single call into the kernels it is made of
// (rms_norm_cpu, linear_cpu, rope_cpu, kv_cpu). Called layer by layer from Python, the same
// chain cost ~0.6 ms of interpreter and tensor bookkeeping per layer at 32 sequences, ~10% of a
// SmolLM2-135M decode step; here it is a dozen direct calls into scratch buffers that live as
// long as the thread.
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

uintptr_t ptr(const std::vector<float>& v) { return reinterpret_cast<uintptr_t>(v.data()); }
}  // namespace

void cpu_decode_layer(uintptr_t hidden, int64_t M, int64_t H, int64_t I, int num_q_heads,
                      int num_kv_heads, int head_dim, const std::vector<uintptr_t>& w,
                      const std::vector<double>& eps, uintptr_t cos, uintptr_t sin,
                      uintptr_t key_cache, uintptr_t value_cache, uintptr_t slots,
                      uintptr_t block_tables, uintptr_t context_lens, int64_t max_blocks,
                      int64_t num_blocks, int block_size, float scale) {
  if (w.size() != kNumWeights || eps.size() != 2)
    throw std::invalid_argument("cpu_decode_layer: need 13 weight pointers and 2 eps values");
  for (int i : {kInNorm, kQ, kK, kV, kO, kPostNorm, kGate, kUp, kDown})
    if (w[i] == 0) throw std::invalid_argument("cpu_decode_layer: weight " + std::to_string(i) + " is null");
  const int64_t qd = static_cast<int64_t>(num_q_heads) * head_dim;
  const int64_t kd = static_cast<int64_t>(num_kv_heads) * head_dim;
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
  cpu_rms_norm(ptr(x), hidden, w[kInNorm], M, H, static_cast<float>(eps[0]));
  cpu_linear_many({ptr(q), ptr(k), ptr(v)}, ptr(x), {w[kQ], w[kK], w[kV]},
                  {w[kQBias], w[kKBias], w[kVBias]}, {qd, kd, kd}, {qd, kd, kd}, M, H, H);
  cpu_rope_qk(ptr(q_rot), ptr(k_rot), ptr(q), ptr(k), cos, sin, M, num_q_heads, num_kv_heads,
              head_dim);
  cpu_append_kv(key_cache, value_cache, ptr(k_rot), ptr(v), slots, M, num_blocks * block_size,
                num_kv_heads, head_dim, kF32);
  cpu_paged_decode_attention(ptr(attn), ptr(q_rot), key_cache, value_cache, block_tables,
                             context_lens, M, num_q_heads, num_kv_heads, head_dim, block_size,
                             max_blocks, num_blocks, scale, kF32);
  cpu_linear(hidden, ptr(attn), w[kO], w[kOBias], M, H, qd, qd, H, 1.f, true);
  // MLP block
  cpu_rms_norm(ptr(x), hidden, w[kPostNorm], M, H, static_cast<float>(eps[1]));
  cpu_silu_mul_linear(ptr(inner), ptr(x), w[kGate], w[kUp], M, I, H, H, I);
  cpu_linear(hidden, ptr(inner), w[kDown], 0, M, H, I, I, H, 1.f, true);
}

}  // namespace grpo_fast
