// The kernels with a block of queries in the vector lanes, in fp32: the cascade's shared-prefix
// item (cascade_f32_cpu.h; layout: cascade_f32_item.inc), which the blocked prefill also runs, and
// the training pass's attention forward and backward (train_attention_cpu.h,
// train_attention_item.inc), which share its tiles. Each body is written once and built twice
// here: over 8-lane ymm (AVX2 + FMA) and over 16-lane zmm (AVX-512 F), picked per call by the
// caller's use_avx512().
#include "cascade_f32_cpu.h"
#include "train_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "cpu_common.h"
#include "parallel.h"
#include "vec_f32.h"

namespace grpo_fast {

#ifdef GF_X86_DISPATCH
namespace {

constexpr int kKeys = 64;  // prefix keys per online-softmax step

GF_INLINE float load_f32(float x) { return x; }
GF_INLINE float load_f32(uint16_t x) { return bf16_to_f32(x); }

// The cascade's tiles on ymm: scores 4 keys x 3 query vectors (12 accumulators + 3 + 1 of 16
// ymm), P.V 3 query rows x 32 dims (12 + 3 + 1).
struct CascadeYmm : Ymm {
  static constexpr int kKeyTile = 4, kQueryVecs = 3, kPvRows = 3, kPvVecs = 4;
};

// On zmm (32 registers): scores 8 keys x 3 query vectors (24 + 3 + 1), P.V 6 query rows x 32
// dims (12 + 6 + 1).
struct CascadeZmm : Zmm {
  static constexpr int kKeyTile = 8, kQueryVecs = 3, kPvRows = 6, kPvVecs = 2;
};

namespace ymm {
using V = CascadeYmm;
#define GF_VEC GF_AVX2
#include "cascade_f32_item.inc"
#include "train_attention_item.inc"
#undef GF_VEC
}  // namespace ymm

namespace zmm {
using V = CascadeZmm;
#define GF_VEC GF_AVX512
#include "cascade_f32_item.inc"
#include "train_attention_item.inc"
#undef GF_VEC
}  // namespace zmm

}  // namespace

void cascade_prefix_f32(const GroupPrefix& p, bool wide, int h, int64_t k0, int64_t k1, float* part,
                        int64_t part_stride) {
  if (p.D % 8 != 0) throw std::invalid_argument("cascade_prefix_f32: head_dim must be a multiple of 8");
  if (wide)
    zmm::prefix(p, h, k0, k1, part, part_stride);
  else
    ymm::prefix(p, h, k0, k1, part, part_stride);
}

// What the kernels take: D % 8 == 0, whole GQA groups of at most 16 x kBlockQueryLanes heads.
static void check_train_attention(const TrainAttention& a) {
  if (a.D % 8 != 0 || a.Hq % a.Hkv != 0 || a.Hq / a.Hkv > 16 * kBlockQueryLanes)
    throw std::invalid_argument("cpu_train_attention: head_dim % 8, Hq % Hkv (at most 768 per kv head)");
}

void cpu_train_attention_forward(const TrainAttention& a, float* out, float* lse, bool wide) {
  check_train_attention(a);
  const int64_t QB = block_tokens(a.Hq / a.Hkv);
  struct Item { int64_t b, i0; int g; };
  std::vector<Item> work;  // the last blocks (the most keys under a causal mask) first
  for (int64_t i0 = (a.T - 1) / QB * QB; i0 >= 0; i0 -= QB)
    for (int64_t b = 0; b < a.B; ++b)
      for (int g = 0; g < a.Hkv; ++g) work.push_back({b, i0, g});
  parallel_for(static_cast<int64_t>(work.size()), [&](int64_t w) {
    const Item& it = work[w];
    const int64_t i1 = std::min(a.T, it.i0 + QB);
    if (wide)
      zmm::train_forward_item(a, it.b, it.g, it.i0, i1, out, lse);
    else
      ymm::train_forward_item(a, it.b, it.g, it.i0, i1, out, lse);
  });
}

void cpu_train_attention_backward(const TrainAttention& a, const float* out, const float* lse, const float* dout,
                                  float* dq, float* dk, float* dv, bool wide) {
  check_train_attention(a);
  parallel_for(a.B * a.Hkv, [&](int64_t w) {  // one (b, kv head) per item: its dK, dV sum over all its queries
    const int64_t b = w / a.Hkv;
    const int g = static_cast<int>(w % a.Hkv);
    if (wide)
      zmm::train_backward_item(a, b, g, out, lse, dout, dq, dk, dv);
    else
      ymm::train_backward_item(a, b, g, out, lse, dout, dq, dk, dv);
  });
}

#else  // not x86-64 GCC / Clang: kv_cpu.cpp's baseline item runs

void cpu_train_attention_forward(const TrainAttention&, float*, float*, bool) {
  throw std::invalid_argument("cpu_train_attention: built without x86 dispatch");
}
void cpu_train_attention_backward(const TrainAttention&, const float*, const float*, const float*, float*, float*,
                                  float*, bool) {
  throw std::invalid_argument("cpu_train_attention: built without x86 dispatch");
}

void cascade_prefix_f32(const GroupPrefix&, bool, int, int64_t, int64_t, float*, int64_t) {
  throw std::invalid_argument("cascade_prefix_f32: built without x86 dispatch");
}

#endif

}  // namespace grpo_fast
