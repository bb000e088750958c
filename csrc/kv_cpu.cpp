// CPU KV-cache kernels: append_kv, copy_blocks, paged decode attention, prefill attention.
//
// Attention is an online-softmax (flash-style) pass in fp32: keys are visited in chunks of
// kChunk tokens; per query head we keep the running max m, the running sum l of exp(s - m) and
// the unnormalized output acc, rescaled by exp(m_old - m_new) when the max grows. Each work item
// is one (sequence or query row, kv head) pair and handles all query heads of that GQA group,
// so every K/V row is read from memory once per group instead of once per query head.
#include "kv_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cascade_bf16_cpu.h"
#include "cascade_f32_cpu.h"
#include "common.h"
#include "cpu_common.h"
#include "parallel.h"
#include "vec_f32.h"


namespace grpo_fast {
namespace {

constexpr int kChunk = 32;   // keys scored per online-softmax step
constexpr int kMaxRep = 16;  // query heads per work item (larger GQA groups are split)

GF_INLINE float load(const float* p, int64_t i) { return p[i]; }
GF_INLINE float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
GF_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
GF_INLINE void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

template <int DC, typename T>
GF_INLINE float dot(const float* q, const T* k, int D) {
  const int n = DC ? DC : D;
  float a = 0.f;
#pragma omp simd reduction(+ : a)
  for (int d = 0; d < n; ++d) a += q[d] * load(k, d);
  return a;
}

// The end of an online-softmax pass over `rc` query heads: the normalized output (out, n == 0
// gives zeros), or with `partial` the unnormalized state [rc][D + 2] = (acc[D], m, l) for a
// later exact merge with other key ranges (cascade attention).
template <typename T>
GF_INLINE void finish(T* out, float* partial, const float* acc, const float* m, const float* l,
                      int rc, int D) {
  for (int r = 0; r < rc; ++r) {
    if (partial != nullptr) {
      float* pr = partial + r * (D + 2);
      for (int d = 0; d < D; ++d) pr[d] = acc[r * D + d];
      pr[D] = m[r];
      pr[D + 1] = l[r];
      continue;
    }
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // n == 0: zeros
    for (int d = 0; d < D; ++d) store(out, r * D + d, acc[r * D + d] * inv);
  }
}

// Attend `rc` consecutive query heads (q, out: [rc, D]) over n keys whose element offsets in the
// caches are row(j). Scores use q pre-multiplied by scale. DC: head_dim known at compile time
// (64, 128) or 0 (runtime D).
template <int DC, typename T, typename RowFn>
GF_INLINE void attend(T* out, const T* q, const T* kc, const T* vc, RowFn row, int64_t n, int Dr,
                      int rc, float scale, float* partial) {
  const int D = DC ? DC : Dr;
  alignas(64) float qs[kMaxRep * 256];  // D <= 256 (checked by the callers)
  alignas(64) float acc[kMaxRep * 256];
  alignas(64) float s[kMaxRep][kChunk];
  float m[kMaxRep], l[kMaxRep];
  for (int r = 0; r < rc; ++r) {
    for (int d = 0; d < D; ++d) {
      qs[r * D + d] = load(q, r * D + d) * scale;
      acc[r * D + d] = 0.f;
    }
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int cn = static_cast<int>(std::min<int64_t>(kChunk, n - j0));
    int64_t off[kChunk];
    for (int t = 0; t < cn; ++t) off[t] = row(j0 + t);
    for (int t = 0; t < cn; ++t)
      for (int r = 0; r < rc; ++r) s[r][t] = dot<DC>(qs + r * D, kc + off[t], D);
    for (int r = 0; r < rc; ++r) {
      float mb = m[r];
      for (int t = 0; t < cn; ++t) mb = std::max(mb, s[r][t]);
      const float corr = std::exp(m[r] - mb);  // exp(-inf) = 0 on the first chunk
      float lsum = 0.f;
      float* sr = s[r];
#pragma omp simd reduction(+ : lsum)
      for (int t = 0; t < cn; ++t) {
        sr[t] = exp_nonpos(sr[t] - mb);
        lsum += sr[t];
      }
      l[r] = l[r] * corr + lsum;
      m[r] = mb;
      if (corr != 1.f) {
        float* a = acc + r * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) a[d] *= corr;
      }
    }
    for (int t = 0; t < cn; ++t) {
      const T* v = vc + off[t];
      for (int r = 0; r < rc; ++r) {
        const float p = s[r][t];
        float* a = acc + r * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) a[d] += p * load(v, d);
      }
    }
  }
  finish(out, partial, acc, m, l, rc, D);
}

#ifdef GF_X86_DISPATCH
// ---- AVX2 + FMA micro-kernel (head_dim a multiple of 8) ---------------------------------------
// Same math as `attend`, with the register blocking spelled out: a score is two FMA chains
// over the head dim and one horizontal sum; P.V keeps a 64-wide panel of the output (8 ymm
// registers) in registers across the whole key chunk instead of a load/store per key.
// The 8 horizontal sums of a[0..7], as one vector: [sum(a[0]), ..., sum(a[7])].
GF_AVX2 inline __m256 hsum8x8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  // per 128-bit half: the partial sums of a[0..3] (resp. a[4..7]) over that half's 4 lanes
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// s[r][t] = scale * q_r . k_t for t < n8 (a multiple of 8) and r < rc, for a bf16 cache on
// AVX512-BF16 (D % 16 == 0): vdpbf16ps multiplies 16 dims of bf16 straight from q and the cache
// rows, 8 keys a step, one transposing reduction per 8 keys. The AVX2 loop converts every key row
// to fp32 again for each query head (3 ops per 8 products, where this takes 1 per 16).
GF_BF16DP void scores_bf16_dp(float (*s)[kChunk], const uint16_t* q, const uint16_t* kc, const int64_t* off,
                              int n8, int D, int rc, float scale) {
  const __m256 sc = _mm256_set1_ps(scale);
  for (int t = 0; t < n8; t += 8)
    for (int r = 0; r < rc; ++r) {
      const uint16_t* qr = q + r * D;
      __m256 a[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
      for (int d = 0; d < D; d += 16) {
        const __m256bh qv = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + d));
        for (int i = 0; i < 8; ++i)
          a[i] = _mm256_dpbf16_ps(a[i], qv, (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kc + off[t + i] + d)));
      }
      _mm256_storeu_ps(&s[r][t], _mm256_mul_ps(hsum8x8(a), sc));
    }
}

// The P.V panel, one body for each ISA (pv_panel.inc): on ymm 8 dims a register, up to a 64-wide
// panel in 8; on zmm (where the CPU has AVX-512) 16 dims a register, up to 64 in 4.
namespace ymm {
using V = Ymm;
#define GF_VEC GF_AVX2
#include "pv_panel.inc"
#undef GF_VEC
}  // namespace ymm

namespace zmm {
using V = Zmm;
#define GF_VEC GF_AVX512
#include "pv_panel.inc"
#undef GF_VEC
}  // namespace zmm

// fp32 V's panels on zmm; returns the dims covered (a multiple of 16; the rest go through ymm).
GF_AVX512 int pv_panels_512(float* a, float corr, const float* p, const float* vc, const int64_t* off, int cn,
                            int D) {
  int d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) zmm::pv_panel<4>(a + d0, corr, p, vc, off, cn, d0);
  for (; d0 + 16 <= D; d0 += 16) zmm::pv_panel<1>(a + d0, corr, p, vc, off, cn, d0);
  return d0;
}

template <typename T, typename RowFn>
GF_AVX2 inline void attend_avx2(T* out, const T* q, const T* kc, const T* vc, RowFn row,
                                int64_t n, int D, int rc, float scale, float* partial) {
  alignas(64) float qs[kMaxRep * 256];
  alignas(64) float acc[kMaxRep * 256];
  alignas(64) float s[kMaxRep][kChunk];
  float m[kMaxRep], l[kMaxRep], corr[kMaxRep];
  const bool dot_products = std::is_same_v<T, uint16_t> && D % 16 == 0 && use_avx512_bf16();
  for (int r = 0; r < rc; ++r) {
    for (int d = 0; d < D; ++d) {
      qs[r * D + d] = load(q, r * D + d) * scale;
      acc[r * D + d] = 0.f;
    }
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int cn = static_cast<int>(std::min<int64_t>(kChunk, n - j0));
    int64_t off[kChunk];
    for (int t = 0; t < cn; ++t) off[t] = row(j0 + t);
    int t = 0;
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (dot_products) {
        t = cn / 8 * 8;
        scores_bf16_dp(s, q, kc, off, t, D, rc, scale);
      }
    }
    for (; t + 8 <= cn; t += 8)  // 8 keys at a time: 8 accumulators, one transposing reduction
      for (int r = 0; r < rc; ++r) {
        const float* qr = qs + r * D;
        __m256 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qr + d);
          for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, load8(kc + off[t + i] + d), a[i]);
        }
        _mm256_storeu_ps(&s[r][t], hsum8x8(a));
      }
    for (; t < cn; ++t) {
      const T* k = kc + off[t];
      for (int r = 0; r < rc; ++r) {
        const float* qr = qs + r * D;
        __m256 a0 = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), load8(k + d), a0);
        s[r][t] = hsum8(a0);
      }
    }
    for (int r = 0; r < rc; ++r) {
      float mb = m[r];
      for (int t = 0; t < cn; ++t) mb = std::max(mb, s[r][t]);
      corr[r] = std::exp(m[r] - mb);  // exp(-inf) = 0 on the first chunk
      float lsum = 0.f;
      float* sr = s[r];
#pragma omp simd reduction(+ : lsum)
      for (int t = 0; t < cn; ++t) {
        sr[t] = exp_nonpos(sr[t] - mb);
        lsum += sr[t];
      }
      l[r] = l[r] * corr[r] + lsum;
      m[r] = mb;
    }
    for (int r = 0; r < rc; ++r) {
      float* a = acc + r * D;
      int d0 = 0;
      if constexpr (std::is_same_v<T, float>) {
        if (use_avx512()) d0 = pv_panels_512(a, corr[r], s[r], vc, off, cn, D);  // fp32 V on zmm
      }
      for (; d0 + 64 <= D; d0 += 64) ymm::pv_panel<8>(a + d0, corr[r], s[r], vc, off, cn, d0);
      for (; d0 + 8 <= D; d0 += 8) ymm::pv_panel<1>(a + d0, corr[r], s[r], vc, off, cn, d0);
    }
  }
  finish(out, partial, acc, m, l, rc, D);
}
#endif

// Picks the kernel: the AVX2 micro-kernel (AVX2 builds, D % 8 == 0), else `attend` with head_dim
// 64 / 128 unrolled at compile time, any other D at run time.
template <bool AVX2, typename T, typename RowFn>
GF_INLINE void attend_any(T* out, const T* q, const T* kc, const T* vc, RowFn row, int64_t n,
                          int D, int rc, float scale, float* partial = nullptr) {
#ifdef GF_X86_DISPATCH
  if constexpr (AVX2) {
    if (D % 8 == 0) return attend_avx2(out, q, kc, vc, row, n, D, rc, scale, partial);
  }
#endif
  if (D == 64)
    attend<64>(out, q, kc, vc, row, n, D, rc, scale, partial);
  else if (D == 128)
    attend<128>(out, q, kc, vc, row, n, D, rc, scale, partial);
  else
    attend<0>(out, q, kc, vc, row, n, D, rc, scale, partial);
}

// ---- decode: one work item = (sequence s, kv head g, query-head chunk) ------------------------
struct DecodeArgs {
  const int32_t* tables;
  const int32_t* lens;
  int64_t max_blocks;
  int hq, hkv, D, bs;
  float scale;
};

// Keys [j0, lens[s]) of sequence s (j0 = 0: all of them; cascade attention passes the end of
// the group's shared prefix, and a `partial` state to merge).
template <bool AVX2, typename T>
GF_INLINE void decode_item(T* out, const T* q, const T* kc, const T* vc, const DecodeArgs& a,
                           int64_t s, int g, int h0, int rc, int64_t j0, float* partial) {
  const int32_t* table = a.tables + s * a.max_blocks;
  const int bs = a.bs, hkv = a.hkv, D = a.D;
  // A power-of-two block size (the usual 16) maps a token to its slot with a shift and a mask
  // instead of an integer division per key.
  const bool pow2 = (bs & (bs - 1)) == 0;
  const int shift = __builtin_ctz(static_cast<unsigned>(bs));
  auto row = [=](int64_t i) {
    const int64_t j = j0 + i;
    const int64_t slot = pow2 ? static_cast<int64_t>(table[j >> shift]) * bs + (j & (bs - 1))
                              : token_slot(table, j, bs);
    return kv_offset(slot, g, hkv, D);
  };
  const int64_t qo = (s * a.hq + h0) * static_cast<int64_t>(a.D);
  attend_any<AVX2>(out + qo, q + qo, kc, vc, row, a.lens[s] - j0, a.D, rc, a.scale, partial);
}

// Instantiates `name` (baseline) and `name##_avx2` for one element type.
#define GF_VARIANTS(name, impl, T, ...)                                  \
  void name(T* out, const T* q, const T* k, const T* v, __VA_ARGS__) {   \
    impl<false>(out, q, k, v, ARGS_OF_##impl);                           \
  }                                                                      \
  GF_AVX2 void name##_avx2(T* out, const T* q, const T* k, const T* v, __VA_ARGS__) { \
    impl<true>(out, q, k, v, ARGS_OF_##impl);                            \
  }
#define ARGS_OF_decode_item a, s, g, h0, rc, j0, partial
GF_VARIANTS(decode_item_f32, decode_item, float, const DecodeArgs& a, int64_t s, int g, int h0,
            int rc, int64_t j0, float* partial)
GF_VARIANTS(decode_item_bf16, decode_item, uint16_t, const DecodeArgs& a, int64_t s, int g,
            int h0, int rc, int64_t j0, float* partial)


// Decode item dispatch: the dtype's kernel, AVX2 where the CPU has it.
void run_decode_item(int dtype, bool avx2, uintptr_t out, uintptr_t q, uintptr_t kc, uintptr_t vc,
                     const DecodeArgs& a, int64_t s, int g, int h0, int rc, int64_t j0,
                     float* partial) {
  if (dtype == kF32) {
    auto f = avx2 ? decode_item_f32_avx2 : decode_item_f32;
    f(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(q),
      reinterpret_cast<const float*>(kc), reinterpret_cast<const float*>(vc), a, s, g, h0, rc, j0,
      partial);
  } else {
    auto f = avx2 ? decode_item_bf16_avx2 : decode_item_bf16;
    f(reinterpret_cast<uint16_t*>(out), reinterpret_cast<const uint16_t*>(q),
      reinterpret_cast<const uint16_t*>(kc), reinterpret_cast<const uint16_t*>(vc), a, s, g, h0,
      rc, j0, partial);
  }
}

// ---- cascade: a group's queries together against its shared prefix ---------------------------
// One work item = (group, kv head, range of prefix keys). The nq = G * rep queries of the group
// for that kv head attend together over those keys, read once from the group's first sequence's
// blocks: the scores are a small GEMM (queries in the vector lanes, each key row broadcast from
// the cache), an online softmax per lane, then P V into the query rows (cascade_f32_cpu.h, or
// cascade_bf16_cpu.h's vdpbf16ps item for bf16 caches). The per-sequence kernel reads those keys
// G times, once per sequence, and does a matrix-vector pass per query head; here K/V traffic is
// divided by G and the arithmetic is register-blocked. Output: the unnormalized (acc, m, l) of
// every query, merged later with the sequence's own keys (and the other prefix ranges).
constexpr int64_t kPrefixSplit = 256;    // prefix keys per work item

struct CascadeArgs {
  DecodeArgs a;
  const int32_t* rows;    // rows of the step ordered by group
  const int32_t* starts;  // [groups + 1] into rows
  const int32_t* prefix;  // [groups] shared prefix length
};

// The prefix item without AVX2 (or D % 8 != 0): each query over the same shared keys with the
// per-sequence pass (correct, not faster).
template <typename T>
void prefix_item_base(const T* q, const T* kc, const T* vc, const CascadeArgs& c, int64_t g,
                      int h, int64_t k0, int64_t k1, float* part, int64_t part_stride) {
  const DecodeArgs& a = c.a;
  const int D = a.D, rep = a.hq / a.hkv;
  const int64_t first = c.starts[g], G = c.starts[g + 1] - first;
  const int32_t* table = a.tables + static_cast<int64_t>(c.rows[first]) * a.max_blocks;
  auto row = [=](int64_t i) { return kv_offset(token_slot(table, k0 + i, a.bs), h, a.hkv, D); };
  for (int64_t i = 0; i < G; ++i)
    for (int r0 = 0; r0 < rep; r0 += kMaxRep) {
      const int rc = std::min(kMaxRep, rep - r0);
      const int64_t qo = (static_cast<int64_t>(c.rows[first + i]) * a.hq + h * rep + r0) * D;
      float* dst = part + i * part_stride + (static_cast<int64_t>(h) * rep + r0) * (D + 2);
      attend_any<false>(static_cast<T*>(nullptr), q + qo, kc, vc, row, k1 - k0, D, rc, a.scale,
                        dst);
    }
}

void run_prefix_item(int dtype, bool avx2, uintptr_t q, uintptr_t kc, uintptr_t vc,
                     const CascadeArgs& c, int64_t g, int h, int64_t k0, int64_t k1, float* part,
                     int64_t part_stride) {
#ifdef GF_X86_DISPATCH
  if (avx2 && c.a.D % 8 == 0) {
    const int64_t first = c.starts[g];
    const GroupPrefix p{reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(kc),
                        reinterpret_cast<const void*>(vc),
                        c.a.tables + static_cast<int64_t>(c.rows[first]) * c.a.max_blocks, c.rows + first,
                        c.starts[g + 1] - first, c.a.hq, c.a.hkv, c.a.D, c.a.bs, c.a.scale, dtype == kBF16};
    if (p.bf16 && p.D % 16 == 0 && use_avx512_bf16()) return cascade_prefix_bf16(p, h, k0, k1, part, part_stride);
    return cascade_prefix_f32(p, use_avx512(), h, k0, k1, part, part_stride);
  }
#endif
  if (dtype == kF32)
    return prefix_item_base(reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(kc),
                            reinterpret_cast<const float*>(vc), c, g, h, k0, k1, part,
                            part_stride);
  prefix_item_base(reinterpret_cast<const uint16_t*>(q), reinterpret_cast<const uint16_t*>(kc),
                   reinterpret_cast<const uint16_t*>(vc), c, g, h, k0, k1, part, part_stride);
}

// out = the exact softmax merge of n partial states (acc, m, l), each [D + 2], `stride` apart.
template <typename T>
void merge_partials(T* out, const float* parts, int64_t stride, int n, int D) {
  float M = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i)
    if (parts[i * stride + D + 1] > 0.f) M = std::max(M, parts[i * stride + D]);
  float L = 0.f, o[256] = {};  // D <= 256 (checked)
  for (int i = 0; i < n; ++i) {
    const float* pi = parts + i * stride;
    if (!(pi[D + 1] > 0.f)) continue;  // a range with no keys
    const float w = std::exp(pi[D] - M);
    L += pi[D + 1] * w;
    for (int d = 0; d < D; ++d) o[d] += pi[d] * w;
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;  // no keys at all: zeros
  for (int d = 0; d < D; ++d) store(out, d, o[d] * inv);
}

#ifdef GF_X86_DISPATCH
// merge_partials for D % 8 == 0, 8 dims per step (the same operations per dim, in the same
// order, so the same results): the scalar loops with their zeroed o[256] were 11% of a cascade
// call at a 16-key prefix.
template <typename T>
GF_AVX2 void merge_partials_avx2(T* out, const float* parts, int64_t stride, int n, int D) {
  float M = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i)
    if (parts[i * stride + D + 1] > 0.f) M = std::max(M, parts[i * stride + D]);
  alignas(32) float o[256];  // D <= 256 (checked)
  for (int d = 0; d < D; d += 8) _mm256_store_ps(o + d, _mm256_setzero_ps());
  float L = 0.f;
  for (int i = 0; i < n; ++i) {
    const float* pi = parts + i * stride;
    if (!(pi[D + 1] > 0.f)) continue;  // a range with no keys
    const float w = std::exp(pi[D] - M);
    L += pi[D + 1] * w;
    const __m256 wv = _mm256_set1_ps(w);
    for (int d = 0; d < D; d += 8)
      _mm256_store_ps(o + d, _mm256_add_ps(_mm256_load_ps(o + d), _mm256_mul_ps(_mm256_loadu_ps(pi + d), wv)));
  }
  const __m256 inv = _mm256_set1_ps(L > 0.f ? 1.f / L : 0.f);  // no keys at all: zeros
  for (int d = 0; d < D; d += 8) store8(out + d, _mm256_mul_ps(_mm256_load_ps(o + d), inv));
}
#endif

// merge_partials, 8 dims at a time where `vec` (AVX2 in use, D % 8 == 0).
template <typename T>
void merge_row(bool vec, T* out, const float* parts, int64_t stride, int n, int D) {
#ifdef GF_X86_DISPATCH
  if (vec) return merge_partials_avx2(out, parts, stride, n, D);
#endif
  merge_partials(out, parts, stride, n, D);
}

// ---- prefill: one work item = (query token t, kv head g, query-head chunk) --------------------
// (the per-token kernel; with AVX2 and D % 8 == 0 tokens go in blocks, blocked_prefill below)
struct PrefillArgs {
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t batch;
  int hq, hkv, D;
  float scale;
};

// Query token t (rc heads from h0) over keys [j0, j0 + n) of the sequence whose keys start at
// k0: its output rows in `out` or, with `partial`, their unnormalized states (acc, m, l) for a
// merge (the blocked prefill's tokens past their block's shared keys).
template <bool AVX2, typename T>
GF_INLINE void prefill_item(T* out, const T* q, const T* k, const T* v, const PrefillArgs& a, int64_t t,
                            int g, int h0, int rc, int64_t k0, int64_t j0, int64_t n, float* partial) {
  const int hkv = a.hkv, D = a.D;
  auto row = [=](int64_t j) { return kv_offset(k0 + j0 + j, g, hkv, D); };
  const int64_t qo = (t * a.hq + h0) * static_cast<int64_t>(D);
  attend_any<AVX2>(partial != nullptr ? nullptr : out + qo, q + qo, k, v, row, n, D, rc, a.scale, partial);
}

#define ARGS_OF_prefill_item a, t, g, h0, rc, k0, j0, n, partial
GF_VARIANTS(prefill_item_f32, prefill_item, float, const PrefillArgs& a, int64_t t, int g, int h0, int rc,
            int64_t k0, int64_t j0, int64_t n, float* partial)
GF_VARIANTS(prefill_item_bf16, prefill_item, uint16_t, const PrefillArgs& a, int64_t t, int g, int h0,
            int rc, int64_t k0, int64_t j0, int64_t n, float* partial)

// prefill_item for every head of kv head g (kMaxRep at a time), the dtype's kernel, AVX2 where
// `avx2`; partial: the token's hq states, D + 2 apart (null: its output rows).
void prefill_token_keys(int dtype, bool avx2, uintptr_t out, uintptr_t query, uintptr_t key, uintptr_t value,
                        const PrefillArgs& a, int64_t t, int g, int64_t k0, int64_t j0, int64_t n, float* partial) {
  const int rep = a.hq / a.hkv;
  for (int h0 = g * rep; h0 < (g + 1) * rep; h0 += kMaxRep) {
    const int rc = std::min(kMaxRep, (g + 1) * rep - h0);
    float* p = partial != nullptr ? partial + static_cast<int64_t>(h0) * (a.D + 2) : nullptr;
    if (dtype == kF32)
      (avx2 ? prefill_item_f32_avx2 : prefill_item_f32)(
          reinterpret_cast<float*>(out), reinterpret_cast<const float*>(query), reinterpret_cast<const float*>(key),
          reinterpret_cast<const float*>(value), a, t, g, h0, rc, k0, j0, n, p);
    else
      (avx2 ? prefill_item_bf16_avx2 : prefill_item_bf16)(
          reinterpret_cast<uint16_t*>(out), reinterpret_cast<const uint16_t*>(query),
          reinterpret_cast<const uint16_t*>(key), reinterpret_cast<const uint16_t*>(value), a, t, g, h0, rc, k0, j0,
          n, p);
  }
}

// Query token t over every key it sees (bottom-right causal), its output rows for kv head g.
void prefill_token(int dtype, bool avx2, uintptr_t out, uintptr_t query, uintptr_t key, uintptr_t value,
                   const PrefillArgs& a, int64_t t, int g) {
  // sequence b owning query token t: last b with cu_q[b] <= t and a non-empty range
  const int64_t b = std::upper_bound(a.cu_q, a.cu_q + a.batch + 1, static_cast<int32_t>(t)) - a.cu_q - 1;
  const int64_t nq = a.cu_q[b + 1] - a.cu_q[b], nk = a.cu_k[b + 1] - a.cu_k[b];
  prefill_token_keys(dtype, avx2, out, query, key, value, a, t, g, a.cu_k[b], 0, nk - nq + (t - a.cu_q[b]) + 1,
                     nullptr);
}

// The prefill's query tokens of one sequence in blocks, as a cascade within the prompt: the
// block's QB tokens x rep heads of kv head g share the keys [0, s0) that its first token sees,
// attended together by the cascade's prefix item (queries in the vector lanes: a small GEMM per
// key chunk instead of a matrix-vector pass per token); each token's remaining keys (< QB of
// them, the causal diagonal) go through the per-token kernel; the two partial states merge
// exactly. Blocks whose shared keys are fewer than kPrefillMinShared run per token throughout.
constexpr int64_t kPrefillMinShared = 32;  // 16 lost at 40-token prompts (0.91-1.00x), measured


void check_attention_dims(int hq, int hkv, int D, int dtype) {
  if (hkv <= 0 || hq % hkv != 0) throw std::invalid_argument("num_q_heads must be a multiple of num_kv_heads");
  if (D <= 0 || D > 256) throw std::invalid_argument("head_dim must lie in [1, 256] on CPU");
  if (dtype != kF32 && dtype != kBF16)
    throw std::invalid_argument("CPU attention supports float32 and bfloat16 only");
}

// Every block a sequence reads must exist.
void check_decode_tables(const DecodeArgs& a, int64_t num_seqs, int64_t num_blocks) {
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t n = a.lens[s];
    if (n < 0 || n > a.max_blocks * a.bs)
      throw std::invalid_argument("context_lens[" + std::to_string(s) + "] out of range");
    for (int64_t i = 0; i < (n + a.bs - 1) / a.bs; ++i) {
      const int32_t b = a.tables[s * a.max_blocks + i];
      if (b < 0 || b >= num_blocks)
        throw std::invalid_argument("block_tables[" + std::to_string(s) + ", " +
                                    std::to_string(i) + "] = " + std::to_string(b) +
                                    " is not a block of the cache");
    }
  }
}

// Groups of a cascade step: group_starts rises from 0 to S, group_rows is a permutation of the
// rows, and each group's prefix lies in blocks that every row of the group shares.
void check_cascade_groups(const CascadeArgs& c, int64_t num_seqs, int64_t num_groups) {
  if (num_groups < 0 || c.starts[0] != 0 || c.starts[num_groups] != num_seqs)
    throw std::invalid_argument("group_starts must rise from 0 to the number of sequences");
  std::vector<char> seen(num_seqs, 0);
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t b = c.starts[g], e = c.starts[g + 1];
    if (e < b) throw std::invalid_argument("group_starts must not decrease");
    for (int64_t i = b; i < e; ++i) {
      const int32_t r = c.rows[i];
      if (r < 0 || r >= num_seqs || seen[r])
        throw std::invalid_argument("group_rows must be a permutation of the sequences");
      seen[r] = 1;
    }
    const int64_t p = c.prefix[g];
    if (p == 0) continue;
    if (p < 0 || e == b) throw std::invalid_argument("prefix_lens[" + std::to_string(g) + "] < 0, or an empty group");
    const int32_t* t0 = c.a.tables + static_cast<int64_t>(c.rows[b]) * c.a.max_blocks;
    for (int64_t i = b; i < e; ++i) {
      const int32_t r = c.rows[i];
      if (c.a.lens[r] < p)
        throw std::invalid_argument("prefix_lens[" + std::to_string(g) + "] exceeds the context of row " + std::to_string(r));
      const int32_t* t = c.a.tables + static_cast<int64_t>(r) * c.a.max_blocks;
      for (int64_t k = 0; k < (p + c.a.bs - 1) / c.a.bs; ++k)
        if (t[k] != t0[k])
          throw std::invalid_argument("group " + std::to_string(g) + ": row " + std::to_string(r) +
                                      " does not share the prefix's block " + std::to_string(k));
    }
  }
}

size_t elem_size(int dtype) {
  if (dtype == kF32) return 4;
  if (dtype == kBF16 || dtype == kF16) return 2;
  throw std::invalid_argument("unknown dtype code " + std::to_string(dtype));
}

}  // namespace

void cpu_append_kv(uintptr_t key_cache, uintptr_t value_cache, uintptr_t key, uintptr_t value,
                   uintptr_t slot_mapping, int64_t num_tokens, int64_t num_slots,
                   int num_kv_heads, int head_dim, int dtype) {
  const size_t row = elem_size(dtype) * num_kv_heads * head_dim;  // bytes per token
  const int32_t* slots = reinterpret_cast<const int32_t*>(slot_mapping);
  for (int64_t t = 0; t < num_tokens; ++t)
    if (slots[t] >= num_slots)
      throw std::invalid_argument("slot_mapping[" + std::to_string(t) + "] = " +
                                  std::to_string(slots[t]) + " >= num_blocks * block_size");
  char* kc = reinterpret_cast<char*>(key_cache);
  char* vc = reinterpret_cast<char*>(value_cache);
  const char* k = reinterpret_cast<const char*>(key);
  const char* v = reinterpret_cast<const char*>(value);
  // a decode step's few rows: one thread; a prefill's thousands: chunks of ~256 KiB
  const int64_t per = std::max<int64_t>(1, (int64_t{1} << 18) / static_cast<int64_t>(row));
  const int64_t chunks = chunk_count(num_tokens, parallel_threads(), per);
  parallel_for(chunks, [&](int64_t c) {
    const auto [t0, t1] = chunk_range(c, chunks, num_tokens);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = slots[t];
      if (s < 0) continue;  // padding
      std::memcpy(kc + s * row, k + t * row, row);
      std::memcpy(vc + s * row, v + t * row, row);
    }
  }, num_tokens * static_cast<int64_t>(row) > (1 << 16) ? 0 : 1);
}

void cpu_copy_blocks(uintptr_t key_cache, uintptr_t value_cache, uintptr_t block_mapping,
                     int64_t num_pairs, int64_t num_blocks, int64_t block_elems, int dtype) {
  const size_t bytes = elem_size(dtype) * block_elems;
  const int64_t* map = reinterpret_cast<const int64_t*>(block_mapping);
  for (int64_t i = 0; i < 2 * num_pairs; ++i)
    if (map[i] < 0 || map[i] >= num_blocks)
      throw std::invalid_argument("block_mapping entry " + std::to_string(map[i]) +
                                  " outside [0, num_blocks)");
  char* caches[2] = {reinterpret_cast<char*>(key_cache), reinterpret_cast<char*>(value_cache)};
  parallel_for(2 * num_pairs, [&](int64_t i) {
    char* c = caches[i & 1];
    const int64_t p = i >> 1;
    std::memcpy(c + map[2 * p + 1] * bytes, c + map[2 * p] * bytes, bytes);
  }, num_pairs * static_cast<int64_t>(bytes) > (1 << 16) ? 0 : 1);
}

void cpu_paged_decode_attention(uintptr_t out, uintptr_t query, uintptr_t key_cache,
                                uintptr_t value_cache, uintptr_t block_tables,
                                uintptr_t context_lens, int64_t num_seqs, int num_q_heads,
                                int num_kv_heads, int head_dim, int block_size,
                                int64_t max_blocks, int64_t num_blocks, float scale, int dtype) {
  check_attention_dims(num_q_heads, num_kv_heads, head_dim, dtype);
  DecodeArgs a{reinterpret_cast<const int32_t*>(block_tables),
               reinterpret_cast<const int32_t*>(context_lens), max_blocks, num_q_heads,
               num_kv_heads, head_dim, block_size, scale};
  check_decode_tables(a, num_seqs, num_blocks);
  const int rep = num_q_heads / num_kv_heads;
  const int chunks = (rep + kMaxRep - 1) / kMaxRep;
  const int64_t items = num_seqs * num_kv_heads * chunks;
  const bool avx2 = use_avx2();
  parallel_for(items, [&](int64_t it) {
    const int c = static_cast<int>(it % chunks);
    const int g = static_cast<int>((it / chunks) % num_kv_heads);
    const int64_t s = it / (static_cast<int64_t>(chunks) * num_kv_heads);
    run_decode_item(dtype, avx2, out, query, key_cache, value_cache, a, s, g, g * rep + c * kMaxRep,
                    std::min(kMaxRep, rep - c * kMaxRep), 0, nullptr);
  });
}

void cpu_cascade_decode_attention(uintptr_t out, uintptr_t query, uintptr_t key_cache,
                                  uintptr_t value_cache, uintptr_t block_tables,
                                  uintptr_t context_lens, int64_t num_seqs, int num_q_heads,
                                  int num_kv_heads, int head_dim, int block_size,
                                  int64_t max_blocks, int64_t num_blocks, float scale, int dtype,
                                  uintptr_t group_rows, uintptr_t group_starts,
                                  uintptr_t prefix_lens, int64_t num_groups) {
  check_attention_dims(num_q_heads, num_kv_heads, head_dim, dtype);
  CascadeArgs c{{reinterpret_cast<const int32_t*>(block_tables),
                 reinterpret_cast<const int32_t*>(context_lens), max_blocks, num_q_heads,
                 num_kv_heads, head_dim, block_size, scale},
                reinterpret_cast<const int32_t*>(group_rows),
                reinterpret_cast<const int32_t*>(group_starts),
                reinterpret_cast<const int32_t*>(prefix_lens)};
  const DecodeArgs& a = c.a;
  check_decode_tables(a, num_seqs, num_blocks);
  check_cascade_groups(c, num_seqs, num_groups);
  const int D = head_dim, hq = num_q_heads, rep = hq / num_kv_heads;
  const int chunks = (rep + kMaxRep - 1) / kMaxRep;
  // Partial states: per group [1 + splits][G][hq][D + 2], part 0 = the rows' own keys.
  std::vector<int64_t> base(num_groups + 1, 0), splits(num_groups);
  std::vector<int32_t> group_of(num_seqs), index_in(num_seqs);
  const int64_t row_stride = static_cast<int64_t>(hq) * (D + 2);
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t G = c.starts[g + 1] - c.starts[g];
    splits[g] = (c.prefix[g] + kPrefixSplit - 1) / kPrefixSplit;
    base[g + 1] = base[g] + (1 + splits[g]) * G * row_stride;
    for (int64_t i = 0; i < G; ++i) {
      group_of[c.rows[c.starts[g] + i]] = static_cast<int32_t>(g);
      index_in[c.rows[c.starts[g] + i]] = static_cast<int32_t>(i);
    }
  }
  thread_local std::vector<float> parts;
  if (static_cast<int64_t>(parts.size()) < base[num_groups]) parts.resize(base[num_groups]);
  float* pp = parts.data();
  // Work items: prefix items (g, kv head, split) first (the large ones), then the rows' own keys.
  struct Item { int64_t g, s; int h, c; };
  std::vector<Item> work;
  for (int64_t g = 0; g < num_groups; ++g)
    for (int h = 0; h < num_kv_heads; ++h)
      for (int64_t j = 0; j < splits[g]; ++j) work.push_back({g, -1 - j, h, 0});
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int h = 0; h < num_kv_heads; ++h)
      for (int ch = 0; ch < chunks; ++ch) work.push_back({group_of[s], s, h, ch});
  const bool avx2 = use_avx2();
  parallel_for(static_cast<int64_t>(work.size()), [&](int64_t it) {
    const Item& w = work[it];
    const int64_t G = c.starts[w.g + 1] - c.starts[w.g];
    const int64_t stride = G * row_stride;  // between parts of one (row, head)
    if (w.s < 0) {  // prefix keys [j * split, (j + 1) * split) of group g
      const int64_t j = -1 - w.s, k0 = j * kPrefixSplit;
      const int64_t k1 = std::min<int64_t>(c.prefix[w.g], k0 + kPrefixSplit);
      run_prefix_item(dtype, avx2, query, key_cache, value_cache, c, w.g, w.h, k0, k1,
                      pp + base[w.g] + (1 + j) * stride, row_stride);
      return;
    }
    const int h0 = w.h * rep + w.c * kMaxRep;
    float* dst = pp + base[w.g] + index_in[w.s] * row_stride + static_cast<int64_t>(h0) * (D + 2);
    run_decode_item(dtype, avx2, out, query, key_cache, value_cache, a, w.s, w.h, h0,
                    std::min(kMaxRep, rep - w.c * kMaxRep), c.prefix[w.g], dst);
  });
  // merge: out[s, h] from its 1 + splits partial states
  const bool merge8 = avx2 && D % 8 == 0;
  parallel_for_ranges(num_seqs * hq, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t it = m0; it < m1; ++it) {
      const int64_t s = it / hq, h = it % hq, g = group_of[s];
      const int64_t G = c.starts[g + 1] - c.starts[g];
      const float* src = pp + base[g] + index_in[s] * row_stride + h * (D + 2);
      const int n = static_cast<int>(1 + splits[g]);
      if (dtype == kF32)
        merge_row(merge8, reinterpret_cast<float*>(out) + it * D, src, G * row_stride, n, D);
      else
        merge_row(merge8, reinterpret_cast<uint16_t*>(out) + it * D, src, G * row_stride, n, D);
    }
  });
}

static void blocked_prefill(uintptr_t out, uintptr_t query, uintptr_t key, uintptr_t value, const PrefillArgs& a,
                     int dtype) {
  const int hq = a.hq, hkv = a.hkv, D = a.D, rep = hq / hkv;
  const int QB = block_tokens(rep);
  const size_t esize = elem_size(dtype);
  const int64_t head_stride = static_cast<int64_t>(hq) * (D + 2);  // one query row's states
  struct Block { int64_t b, i0; int g; };
  std::vector<Block> work;  // the longest blocks (the last tokens) first
  for (int64_t b = 0; b < a.batch; ++b)
    for (int64_t i0 = (a.cu_q[b + 1] - a.cu_q[b] - 1) / QB * QB; i0 >= 0; i0 -= QB)
      for (int g = 0; g < hkv; ++g) work.push_back({b, i0, g});
  const bool merge8 = D % 8 == 0;
  parallel_for(static_cast<int64_t>(work.size()), [&](int64_t w) {
    const auto [b, i0, g] = work[w];
    const int64_t nq = a.cu_q[b + 1] - a.cu_q[b], nk = a.cu_k[b + 1] - a.cu_k[b], k0 = a.cu_k[b];
    const int64_t i1 = std::min<int64_t>(nq, i0 + QB), t0 = a.cu_q[b];
    const int64_t s0 = nk - nq + i0 + 1;  // the keys every token of the block sees
    if (s0 < kPrefillMinShared) {  // per token: s0 + (i - i0) keys each
      for (int64_t i = i0; i < i1; ++i)
        prefill_token_keys(dtype, true, out, query, key, value, a, t0 + i, g, k0, 0, s0 + (i - i0), nullptr);
      return;
    }
    // states [2][QB][hq][D + 2]: the shared keys', then the token's own
    thread_local std::vector<float> states;
    const int64_t part = QB * head_stride;
    if (static_cast<int64_t>(states.size()) < 2 * part) states.resize(2 * part);
    float* st = states.data();
    int32_t rows[kBlockQueryLanes];
    for (int64_t i = i0; i < i1; ++i) rows[i - i0] = static_cast<int32_t>(t0 + i);
    // the sequence's keys as a one-block table: slot j is key k0 + j
    const int32_t table = 0, starts[2] = {0, static_cast<int32_t>(i1 - i0)};
    const CascadeArgs c{{&table, nullptr, 0, hq, hkv, D, 1 << 30, a.scale}, rows, starts, nullptr};
    const uintptr_t kb = key + kv_offset(k0, 0, hkv, D) * esize, vb = value + kv_offset(k0, 0, hkv, D) * esize;
    run_prefix_item(dtype, true, query, kb, vb, c, 0, g, 0, s0, st, head_stride);
    for (int64_t i = i0; i < i1; ++i)
      prefill_token_keys(dtype, true, out, query, key, value, a, t0 + i, g, k0, s0, i - i0,
                         st + part + (i - i0) * head_stride);
    for (int64_t i = i0; i < i1; ++i)
      for (int h = g * rep; h < (g + 1) * rep; ++h) {
        const float* src = st + (i - i0) * head_stride + static_cast<int64_t>(h) * (D + 2);
        const int64_t o = ((t0 + i) * hq + h) * static_cast<int64_t>(D);
        if (dtype == kF32)
          merge_row(merge8, reinterpret_cast<float*>(out) + o, src, part, 2, D);
        else
          merge_row(merge8, reinterpret_cast<uint16_t*>(out) + o, src, part, 2, D);
      }
  });
}

void cpu_prefill_attention(uintptr_t out, uintptr_t query, uintptr_t key, uintptr_t value,
                           uintptr_t cu_seqlens, uintptr_t cu_seqlens_k, int64_t batch,
                           int64_t num_tokens, int num_q_heads, int num_kv_heads, int head_dim,
                           float scale, int dtype) {
  check_attention_dims(num_q_heads, num_kv_heads, head_dim, dtype);
  PrefillArgs a{reinterpret_cast<const int32_t*>(cu_seqlens),
                reinterpret_cast<const int32_t*>(cu_seqlens_k), batch, num_q_heads, num_kv_heads,
                head_dim, scale};
  if (a.cu_q[0] != 0 || a.cu_q[batch] != num_tokens)
    throw std::invalid_argument("cu_seqlens must rise from 0 to the number of query tokens");
  for (int64_t b = 0; b < batch; ++b)
    if (a.cu_q[b + 1] < a.cu_q[b] || a.cu_k[b + 1] - a.cu_k[b] < a.cu_q[b + 1] - a.cu_q[b])
      throw std::invalid_argument("cu_seqlens / cu_seqlens_k are inconsistent");
  const bool avx2 = use_avx2();
  if (avx2 && head_dim % 8 == 0 && !env_is_one("GRPO_FAST_NO_BLOCKED_PREFILL"))
    return blocked_prefill(out, query, key, value, a, dtype);
  // per token: chunks of consecutive items (a query token's kv heads, then the next token's)
  parallel_for_ranges(num_tokens * num_kv_heads, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it)
      prefill_token(dtype, avx2, out, query, key, value, a, it / num_kv_heads, static_cast<int>(it % num_kv_heads));
  });
}

}  // namespace grpo_fast
