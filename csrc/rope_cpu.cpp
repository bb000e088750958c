// RoPE for a decode step's q and k in one pass: the torch version is ~8 tensor ops per layer
// (half slices, a cat, two multiplies, an add, for q and for k), each a few microseconds of
// dispatch at 32 tokens. Same math as HF's apply_rotary_pos_emb:
//   out[:h] = x[:h] * cos[:h] - x[h:] * sin[:h];   out[h:] = x[h:] * cos[h:] + x[:h] * sin[h:]
#include "rope_cpu.h"

#include <stdexcept>

#include "cpu_common.h"

namespace grpo_fast {
namespace {

GF_INLINE void rope_heads(float* out, const float* x, const float* c, const float* s, int heads,
                          int D) {
  const int h = D / 2;
  for (int hd = 0; hd < heads; ++hd) {
    const float* xi = x + hd * D;
    float* o = out + hd * D;
#pragma omp simd
    for (int i = 0; i < h; ++i) {
      o[i] = xi[i] * c[i] - xi[i + h] * s[i];
      o[i + h] = xi[i + h] * c[i + h] + xi[i] * s[i + h];
    }
  }
}

GF_INLINE void rope_rows(float* qo, float* ko, const float* q, const float* k, const float* c,
                         const float* s, int64_t T, int hq, int hkv, int D) {
  for (int64_t t = 0; t < T; ++t) {
    rope_heads(qo + t * hq * D, q + t * hq * D, c + t * D, s + t * D, hq, D);
    rope_heads(ko + t * hkv * D, k + t * hkv * D, c + t * D, s + t * D, hkv, D);
  }
}

void rope_rows_base(float* qo, float* ko, const float* q, const float* k, const float* c,
                    const float* s, int64_t T, int hq, int hkv, int D) {
  rope_rows(qo, ko, q, k, c, s, T, hq, hkv, D);
}

#ifdef GF_X86_DISPATCH
GF_AVX2 void rope_rows_avx2(float* qo, float* ko, const float* q, const float* k, const float* c,
                            const float* s, int64_t T, int hq, int hkv, int D) {
  rope_rows(qo, ko, q, k, c, s, T, hq, hkv, D);
}
#endif

}  // namespace

void cpu_rope_qk(uintptr_t q_out, uintptr_t k_out, uintptr_t q, uintptr_t k, uintptr_t cos,
                 uintptr_t sin, int64_t tokens, int num_q_heads, int num_kv_heads, int head_dim) {
  if (tokens < 0 || num_q_heads < 1 || num_kv_heads < 1 || head_dim < 2 || head_dim % 2)
    throw std::invalid_argument("cpu_rope_qk: need tokens >= 0, heads >= 1 and an even head_dim");
  auto* qo = reinterpret_cast<float*>(q_out);
  auto* ko = reinterpret_cast<float*>(k_out);
  const auto* qp = reinterpret_cast<const float*>(q);
  const auto* kp = reinterpret_cast<const float*>(k);
  const auto* c = reinterpret_cast<const float*>(cos);
  const auto* s = reinterpret_cast<const float*>(sin);
  // 32 tokens x 12 heads x 64 is ~25k floats: one thread, no fork/join.
#ifdef GF_X86_DISPATCH
  if (use_avx2())
    return rope_rows_avx2(qo, ko, qp, kp, c, s, tokens, num_q_heads, num_kv_heads, head_dim);
#endif
  rope_rows_base(qo, ko, qp, kp, c, s, tokens, num_q_heads, num_kv_heads, head_dim);
}

}  // namespace grpo_fast
