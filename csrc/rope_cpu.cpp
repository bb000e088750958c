// RoPE for a decode step's q and k in one pass: the torch version is ~8 tensor ops per layer
// (half slices, a cat, two multiplies, an add, for q and for k), each a few microseconds of
// dispatch at 32 tokens. Same math as HF's apply_rotary_pos_emb:
//   out[:h] = x[:h] * cos[:h] - x[h:] * sin[:h];   out[h:] = x[h:] * cos[h:] + x[:h] * sin[h:]
// bf16 (a bf16 model's decode, cos / sin in bf16 as HF's rotary module returns them): the same
// ops, each rounded to bf16 where torch's bf16 ops round: the two products (exact in fp32, then
// rounded), then their sum. So the result is HF's bit for bit.
#include "rope_cpu.h"

#include <stdexcept>
#include <string>

#include "common.h"
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

GF_INLINE float rounded(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// One head's half-dims [i0, h) in bf16, element by element.
GF_INLINE void rope_head_bf16_tail(uint16_t* o, const uint16_t* x, const uint16_t* c, const uint16_t* s, int i0,
                                   int h) {
  for (int i = i0; i < h; ++i) {
    const float x1 = bf16_to_f32(x[i]), x2 = bf16_to_f32(x[i + h]);
    o[i] = f32_to_bf16(rounded(x1 * bf16_to_f32(c[i])) - rounded(x2 * bf16_to_f32(s[i])));
    o[i + h] = f32_to_bf16(rounded(x2 * bf16_to_f32(c[i + h])) + rounded(x1 * bf16_to_f32(s[i + h])));
  }
}

void rope_rows_bf16_base(uint16_t* qo, uint16_t* ko, const uint16_t* q, const uint16_t* k, const uint16_t* c,
                         const uint16_t* s, int64_t T, int hq, int hkv, int D) {
  for (int64_t t = 0; t < T; ++t) {
    for (int hd = 0; hd < hq; ++hd)
      rope_head_bf16_tail(qo + (t * hq + hd) * D, q + (t * hq + hd) * D, c + t * D, s + t * D, 0, D / 2);
    for (int hd = 0; hd < hkv; ++hd)
      rope_head_bf16_tail(ko + (t * hkv + hd) * D, k + (t * hkv + hd) * D, c + t * D, s + t * D, 0, D / 2);
  }
}

#ifdef GF_X86_DISPATCH
GF_AVX2 GF_INLINE void rope_head_bf16_avx2(uint16_t* o, const uint16_t* x, const uint16_t* c, const uint16_t* s,
                                           int h) {
  const uint16_t* bf = nullptr;  // (stored8's overload tag: round to bf16)
  int i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 x1 = load8(x + i), x2 = load8(x + i + h);
    const __m256 a = stored8(bf, _mm256_mul_ps(x1, load8(c + i)));  // products rounded before the sum,
    const __m256 b = stored8(bf, _mm256_mul_ps(x2, load8(s + i)));  // as torch's bf16 ops round them
    store8(o + i, _mm256_sub_ps(a, b));
    const __m256 d = stored8(bf, _mm256_mul_ps(x2, load8(c + i + h)));
    const __m256 e = stored8(bf, _mm256_mul_ps(x1, load8(s + i + h)));
    store8(o + i + h, _mm256_add_ps(d, e));
  }
  rope_head_bf16_tail(o, x, c, s, i, h);
}

GF_AVX2 void rope_rows_bf16_avx2(uint16_t* qo, uint16_t* ko, const uint16_t* q, const uint16_t* k, const uint16_t* c,
                                 const uint16_t* s, int64_t T, int hq, int hkv, int D) {
  for (int64_t t = 0; t < T; ++t) {
    for (int hd = 0; hd < hq; ++hd)
      rope_head_bf16_avx2(qo + (t * hq + hd) * D, q + (t * hq + hd) * D, c + t * D, s + t * D, D / 2);
    for (int hd = 0; hd < hkv; ++hd)
      rope_head_bf16_avx2(ko + (t * hkv + hd) * D, k + (t * hkv + hd) * D, c + t * D, s + t * D, D / 2);
  }
}
#endif

// The rows on the fastest build there is: fp32, then bf16.
void rope_rows_any(float* qo, float* ko, const float* q, const float* k, const float* c, const float* s, int64_t T,
                   int hq, int hkv, int D) {
#ifdef GF_X86_DISPATCH
  if (use_avx2()) return rope_rows_avx2(qo, ko, q, k, c, s, T, hq, hkv, D);
#endif
  rope_rows_base(qo, ko, q, k, c, s, T, hq, hkv, D);
}

void rope_rows_any(uint16_t* qo, uint16_t* ko, const uint16_t* q, const uint16_t* k, const uint16_t* c,
                   const uint16_t* s, int64_t T, int hq, int hkv, int D) {
#ifdef GF_X86_DISPATCH
  if (use_avx2()) return rope_rows_bf16_avx2(qo, ko, q, k, c, s, T, hq, hkv, D);
#endif
  rope_rows_bf16_base(qo, ko, q, k, c, s, T, hq, hkv, D);
}

template <typename T>
void rope_qk_all(const char* name, uintptr_t q_out, uintptr_t k_out, uintptr_t q, uintptr_t k, uintptr_t cos,
                 uintptr_t sin, int64_t tokens, int num_q_heads, int num_kv_heads, int head_dim) {
  if (tokens < 0 || num_q_heads < 1 || num_kv_heads < 1 || head_dim < 2 || head_dim % 2)
    throw std::invalid_argument(std::string(name) + ": need tokens >= 0, heads >= 1 and an even head_dim");
  // 32 tokens x 12 heads x 64 is ~25k values: one thread, no fork/join.
  rope_rows_any(reinterpret_cast<T*>(q_out), reinterpret_cast<T*>(k_out), reinterpret_cast<const T*>(q),
                reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(cos), reinterpret_cast<const T*>(sin), tokens,
                num_q_heads, num_kv_heads, head_dim);
}

}  // namespace

void cpu_rope_qk(uintptr_t q_out, uintptr_t k_out, uintptr_t q, uintptr_t k, uintptr_t cos,
                 uintptr_t sin, int64_t tokens, int num_q_heads, int num_kv_heads, int head_dim) {
  rope_qk_all<float>("cpu_rope_qk", q_out, k_out, q, k, cos, sin, tokens, num_q_heads, num_kv_heads, head_dim);
}

void cpu_rope_qk_bf16(uintptr_t q_out, uintptr_t k_out, uintptr_t q, uintptr_t k, uintptr_t cos,
                      uintptr_t sin, int64_t tokens, int num_q_heads, int num_kv_heads, int head_dim) {
  rope_qk_all<uint16_t>("cpu_rope_qk_bf16", q_out, k_out, q, k, cos, sin, tokens, num_q_heads, num_kv_heads,
                        head_dim);
}

}  // namespace grpo_fast
