// Shared by the CPU kernels (kv_cpu.cpp, linear_cpu.cpp): run-time AVX2 dispatch and a
// vectorizable exp.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
// The hot loops are built twice: for baseline x86-64 and for AVX2+FMA, picked at run time by
// CPU features (wheels must run on any x86-64; AVX2+FMA is several times faster where present).
#define GF_X86_DISPATCH 1
#define GF_AVX2 __attribute__((target("avx2,fma")))
// AVX512-BF16 (vdpbf16ps on ymm), picked at run time by cascade_bf16_cpu.h's use_avx512_bf16().
#define GF_BF16DP __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512bf16")))
// AVX-512 F (zmm FMAs), picked at run time by use_avx512().
#define GF_AVX512 __attribute__((target("avx2,fma,avx512f")))
#include <immintrin.h>
#else
#define GF_AVX2
#define GF_AVX512
#endif
#define GF_INLINE inline __attribute__((always_inline))

namespace grpo_fast {

// Whether the environment variable `name` is set to "1" (the kernels' off switches, read once by
// their callers).
inline bool env_is_one(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Whether the AVX2+FMA variants may run: the CPU has both and GRPO_FAST_NO_AVX2=1 is not set
// (tests run both paths on one machine).
inline bool use_avx2() {
#ifdef GF_X86_DISPATCH
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          !env_is_one("GRPO_FAST_NO_AVX2");
  return yes;
#else
  return false;
#endif
}

// Whether the AVX-512 variants may run: AVX2 is in use, the CPU has AVX-512 F and
// GRPO_FAST_NO_AVX512=1 is not set (tests run both paths on one machine).
inline bool use_avx512() {
#ifdef GF_X86_DISPATCH
  static const bool yes = use_avx2() && __builtin_cpu_supports("avx512f") && !env_is_one("GRPO_FAST_NO_AVX512");
  return yes;
#else
  return false;
#endif
}

// exp(x) for x <= 0 as 2^i * P(f), x log2(e) = i + f, |f| <= 1/2, P the degree-6 Taylor
// polynomial of 2^f: relative error < 2e-7 (below fp32 accumulation noise); x < -87 gives
// ~1e-38 (the weight of such a key is below fp32 resolution anyway).
// Plain arithmetic, so `omp simd` loops vectorize it (std::exp stays scalar).
GF_INLINE float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float fi = (t + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick)
  const float f = (t - fi) * 0.693147180559945309f;  // e^f = 2^(t - fi)
  float p = 1.f / 720;
  p = p * f + 1.f / 120;
  p = p * f + 1.f / 24;
  p = p * f + 1.f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return p * scale;
}

#ifdef GF_X86_DISPATCH
// 8 bf16 -> 8 fp32, exactly (the 16 bits shifted into the high half): common.h's bf16_to_f32 on
// 8 lanes.
GF_AVX2 GF_INLINE __m256 bf16x8_to_f32(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 lanes of a float or bf16 array as fp32.
GF_AVX2 GF_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
GF_AVX2 GF_INLINE __m256 load8(const uint16_t* p) { return bf16x8_to_f32(p); }

// common.h's f32_to_bf16 on 8 lanes (ties to even; a NaN keeps its sign and top payload bits,
// quieted), as 8 32-bit lanes holding the 16-bit results.
GF_AVX2 GF_INLINE __m256i to_bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i high = _mm256_srli_epi32(bits, 16);
  const __m256i lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_or_si256(high, _mm256_set1_epi32(0x40)), nan);
}

// 8 fp32 lanes into a float or bf16 array (bf16: rounded as f32_to_bf16).
GF_AVX2 GF_INLINE void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
GF_AVX2 GF_INLINE void store8(uint16_t* p, __m256 v) {
  const __m256i b = to_bf16_bits(v);  // values <= 0xFFFF: packus's unsigned saturation keeps them
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

// v as an array of T holds it: itself for float; rounded to bf16 for bf16 (the rounding PyTorch
// applies between two ops on bf16 tensors).
GF_AVX2 GF_INLINE __m256 stored8(const float*, __m256 v) { return v; }
GF_AVX2 GF_INLINE __m256 stored8(const uint16_t*, __m256 v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(to_bf16_bits(v), 16));
}

// r[i][j] <- r[j][i] for an 8 x 8 block of fp32 in 8 registers.
GF_AVX2 GF_INLINE void transpose8x8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

GF_AVX2 GF_INLINE float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// exp_nonpos on 8 lanes, the same operations in the same order (so the same results).
GF_AVX2 GF_INLINE __m256 exp_nonpos8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 magic = _mm256_set1_ps(12582912.f);
  const __m256 fi = _mm256_sub_ps(_mm256_add_ps(t, magic), magic);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, fi), _mm256_set1_ps(0.693147180559945309f));
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.f / 120));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.f / 24));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.f / 6));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(0.5f));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.f));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fi), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

}  // namespace grpo_fast
