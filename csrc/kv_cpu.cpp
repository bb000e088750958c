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
#include <vector>

#include "common.h"
#include "cpu_common.h"


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

// Attend `rc` consecutive query heads (q, out: [rc, D]) over n keys whose element offsets in the
// caches are row(j). Scores use q pre-multiplied by scale. DC: head_dim known at compile time
// (64, 128) or 0 (runtime D).
template <int DC, typename T, typename RowFn>
GF_INLINE void attend(T* out, const T* q, const T* kc, const T* vc, RowFn row, int64_t n, int Dr,
                      int rc, float scale) {
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
  for (int r = 0; r < rc; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // n == 0: zeros
    for (int d = 0; d < D; ++d) store(out, r * D + d, acc[r * D + d] * inv);
  }
}

#ifdef GF_X86_DISPATCH
// ---- AVX2 + FMA micro-kernel (head_dim a multiple of 8) ---------------------------------------
// Same math as `attend`, with the register blocking spelled out: a score is two FMA chains
// over the head dim and one horizontal sum; P.V keeps a 64-wide panel of the output (8 ymm
// registers) in registers across the whole key chunk instead of a load/store per key.
GF_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
GF_AVX2 inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> 8 fp32 (shift into the high half)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
GF_AVX2 inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// The 8 horizontal sums of a[0..7], as one vector: [sum(a[0]), ..., sum(a[7])].
GF_AVX2 inline __m256 hsum8x8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  // per 128-bit half: the partial sums of a[0..3] (resp. a[4..7]) over that half's 4 lanes
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// acc[0:8*NV] = acc * corr + sum_t p[t] * v_t[0:8*NV]
template <int NV, typename T>
GF_AVX2 inline void pv_panel(float* acc, float corr, const float* p, const T* vc,
                             const int64_t* off, int cn, int d0) {
  __m256 a[NV];
  const __m256 c = _mm256_set1_ps(corr);
  for (int i = 0; i < NV; ++i) a[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * i), c);
  for (int t = 0; t < cn; ++t) {
    const __m256 pt = _mm256_set1_ps(p[t]);
    const T* v = vc + off[t] + d0;
    for (int i = 0; i < NV; ++i) a[i] = _mm256_fmadd_ps(pt, load8(v + 8 * i), a[i]);
  }
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
}

template <typename T, typename RowFn>
GF_AVX2 inline void attend_avx2(T* out, const T* q, const T* kc, const T* vc, RowFn row,
                                int64_t n, int D, int rc, float scale) {
  alignas(64) float qs[kMaxRep * 256];
  alignas(64) float acc[kMaxRep * 256];
  alignas(64) float s[kMaxRep][kChunk];
  float m[kMaxRep], l[kMaxRep], corr[kMaxRep];
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
      for (; d0 + 64 <= D; d0 += 64) pv_panel<8>(a + d0, corr[r], s[r], vc, off, cn, d0);
      for (; d0 + 8 <= D; d0 += 8) pv_panel<1>(a + d0, corr[r], s[r], vc, off, cn, d0);
    }
  }
  for (int r = 0; r < rc; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // n == 0: zeros
    for (int d = 0; d < D; ++d) store(out, r * D + d, acc[r * D + d] * inv);
  }
}
#endif

// Picks the kernel: the AVX2 micro-kernel (AVX2 builds, D % 8 == 0), else `attend` with head_dim
// 64 / 128 unrolled at compile time, any other D at run time.
template <bool AVX2, typename T, typename RowFn>
GF_INLINE void attend_any(T* out, const T* q, const T* kc, const T* vc, RowFn row, int64_t n,
                          int D, int rc, float scale) {
#ifdef GF_X86_DISPATCH
  if constexpr (AVX2) {
    if (D % 8 == 0) return attend_avx2(out, q, kc, vc, row, n, D, rc, scale);
  }
#endif
  if (D == 64)
    attend<64>(out, q, kc, vc, row, n, D, rc, scale);
  else if (D == 128)
    attend<128>(out, q, kc, vc, row, n, D, rc, scale);
  else
    attend<0>(out, q, kc, vc, row, n, D, rc, scale);
}

// ---- decode: one work item = (sequence s, kv head g, query-head chunk) ------------------------
struct DecodeArgs {
  const int32_t* tables;
  const int32_t* lens;
  int64_t max_blocks;
  int hq, hkv, D, bs;
  float scale;
};

template <bool AVX2, typename T>
GF_INLINE void decode_item(T* out, const T* q, const T* kc, const T* vc, const DecodeArgs& a,
                           int64_t s, int g, int h0, int rc) {
  const int32_t* table = a.tables + s * a.max_blocks;
  const int bs = a.bs, hkv = a.hkv, D = a.D;
  // A power-of-two block size (the usual 16) maps a token to its slot with a shift and a mask
  // instead of an integer division per key.
  const bool pow2 = (bs & (bs - 1)) == 0;
  const int shift = __builtin_ctz(static_cast<unsigned>(bs));
  auto row = [=](int64_t j) {
    const int64_t slot = pow2 ? static_cast<int64_t>(table[j >> shift]) * bs + (j & (bs - 1))
                              : token_slot(table, j, bs);
    return kv_offset(slot, g, hkv, D);
  };
  const int64_t qo = (s * a.hq + h0) * static_cast<int64_t>(a.D);
  attend_any<AVX2>(out + qo, q + qo, kc, vc, row, a.lens[s], a.D, rc, a.scale);
}

// Instantiates `name` (baseline) and `name##_avx2` for one element type.
#define GF_VARIANTS(name, impl, T, ...)                                  \
  void name(T* out, const T* q, const T* k, const T* v, __VA_ARGS__) {   \
    impl<false>(out, q, k, v, ARGS_OF_##impl);                           \
  }                                                                      \
  GF_AVX2 void name##_avx2(T* out, const T* q, const T* k, const T* v, __VA_ARGS__) { \
    impl<true>(out, q, k, v, ARGS_OF_##impl);                            \
  }
#define ARGS_OF_decode_item a, s, g, h0, rc
GF_VARIANTS(decode_item_f32, decode_item, float, const DecodeArgs& a, int64_t s, int g, int h0,
            int rc)
GF_VARIANTS(decode_item_bf16, decode_item, uint16_t, const DecodeArgs& a, int64_t s, int g,
            int h0, int rc)

// ---- prefill: one work item = (query token t, kv head g, query-head chunk) --------------------
struct PrefillArgs {
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t batch;
  int hq, hkv, D;
  float scale;
};

template <bool AVX2, typename T>
GF_INLINE void prefill_item(T* out, const T* q, const T* k, const T* v, const PrefillArgs& a,
                            int64_t t, int g, int h0, int rc) {
  // sequence b owning query token t: last b with cu_q[b] <= t and a non-empty range
  const int64_t b = std::upper_bound(a.cu_q, a.cu_q + a.batch + 1, static_cast<int32_t>(t)) -
                    a.cu_q - 1;
  const int64_t nq = a.cu_q[b + 1] - a.cu_q[b];
  const int64_t nk = a.cu_k[b + 1] - a.cu_k[b];
  const int64_t i = t - a.cu_q[b];
  const int64_t n = nk - nq + i + 1;  // keys visible to query i (bottom-right causal)
  const int64_t k0 = a.cu_k[b];
  const int hkv = a.hkv, D = a.D;
  auto row = [=](int64_t j) { return kv_offset(k0 + j, g, hkv, D); };
  const int64_t qo = (t * a.hq + h0) * static_cast<int64_t>(a.D);
  attend_any<AVX2>(out + qo, q + qo, k, v, row, n, a.D, rc, a.scale);
}

#define ARGS_OF_prefill_item a, t, g, h0, rc
GF_VARIANTS(prefill_item_f32, prefill_item, float, const PrefillArgs& a, int64_t t, int g, int h0,
            int rc)
GF_VARIANTS(prefill_item_bf16, prefill_item, uint16_t, const PrefillArgs& a, int64_t t, int g,
            int h0, int rc)

void check_attention_dims(int hq, int hkv, int D, int dtype) {
  if (hkv <= 0 || hq % hkv != 0) throw std::invalid_argument("num_q_heads must be a multiple of num_kv_heads");
  if (D <= 0 || D > 256) throw std::invalid_argument("head_dim must lie in [1, 256] on CPU");
  if (dtype != kF32 && dtype != kBF16)
    throw std::invalid_argument("CPU attention supports float32 and bfloat16 only");
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
#pragma omp parallel for schedule(static) if (num_tokens * row > (1 << 16))
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t s = slots[t];
    if (s < 0) continue;  // padding
    std::memcpy(kc + s * row, k + t * row, row);
    std::memcpy(vc + s * row, v + t * row, row);
  }
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
#pragma omp parallel for schedule(static) if (num_pairs * bytes > (1 << 16))
  for (int64_t i = 0; i < 2 * num_pairs; ++i) {
    char* c = caches[i & 1];
    const int64_t p = i >> 1;
    std::memcpy(c + map[2 * p + 1] * bytes, c + map[2 * p] * bytes, bytes);
  }
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
  for (int64_t s = 0; s < num_seqs; ++s) {  // every block a sequence reads must exist
    const int64_t n = a.lens[s];
    if (n < 0 || n > max_blocks * block_size)
      throw std::invalid_argument("context_lens[" + std::to_string(s) + "] out of range");
    for (int64_t i = 0; i < (n + block_size - 1) / block_size; ++i) {
      const int32_t b = a.tables[s * max_blocks + i];
      if (b < 0 || b >= num_blocks)
        throw std::invalid_argument("block_tables[" + std::to_string(s) + ", " +
                                    std::to_string(i) + "] = " + std::to_string(b) +
                                    " is not a block of the cache");
    }
  }
  const int rep = num_q_heads / num_kv_heads;
  const int chunks = (rep + kMaxRep - 1) / kMaxRep;
  const int64_t items = num_seqs * num_kv_heads * chunks;
  const bool avx2 = use_avx2();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < items; ++it) {
    const int c = static_cast<int>(it % chunks);
    const int g = static_cast<int>((it / chunks) % num_kv_heads);
    const int64_t s = it / (static_cast<int64_t>(chunks) * num_kv_heads);
    const int h0 = g * rep + c * kMaxRep;
    const int rc = std::min(kMaxRep, rep - c * kMaxRep);
    if (dtype == kF32) {
      auto f = avx2 ? decode_item_f32_avx2 : decode_item_f32;
      f(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(query),
        reinterpret_cast<const float*>(key_cache), reinterpret_cast<const float*>(value_cache), a,
        s, g, h0, rc);
    } else {
      auto f = avx2 ? decode_item_bf16_avx2 : decode_item_bf16;
      f(reinterpret_cast<uint16_t*>(out), reinterpret_cast<const uint16_t*>(query),
        reinterpret_cast<const uint16_t*>(key_cache),
        reinterpret_cast<const uint16_t*>(value_cache), a, s, g, h0, rc);
    }
  }
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
  const int rep = num_q_heads / num_kv_heads;
  const int chunks = (rep + kMaxRep - 1) / kMaxRep;
  const int64_t items = num_tokens * num_kv_heads * chunks;
  const bool avx2 = use_avx2();
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t it = 0; it < items; ++it) {
    const int c = static_cast<int>(it % chunks);
    const int g = static_cast<int>((it / chunks) % num_kv_heads);
    const int64_t t = it / (static_cast<int64_t>(chunks) * num_kv_heads);
    const int h0 = g * rep + c * kMaxRep;
    const int rc = std::min(kMaxRep, rep - c * kMaxRep);
    if (dtype == kF32) {
      auto f = avx2 ? prefill_item_f32_avx2 : prefill_item_f32;
      f(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(query),
        reinterpret_cast<const float*>(key), reinterpret_cast<const float*>(value), a, t, g, h0,
        rc);
    } else {
      auto f = avx2 ? prefill_item_bf16_avx2 : prefill_item_bf16;
      f(reinterpret_cast<uint16_t*>(out), reinterpret_cast<const uint16_t*>(query),
        reinterpret_cast<const uint16_t*>(key), reinterpret_cast<const uint16_t*>(value), a, t, g,
        h0, rc);
    }
  }
}

}  // namespace grpo_fast
