// fp32 vector types for kernels written once over the vector width: Ymm (AVX2, 8 lanes) and Zmm
// (AVX-512 F, 16 lanes). A file that uses them includes its kernel body twice, once per type,
// with GF_VEC the matching target attribute (cascade_f32_cpu.cpp, linear_cpu.cpp), so both builds
// do the same operations per output element in the same order.
#pragma once

#include "cpu_common.h"

namespace grpo_fast {

#ifdef GF_X86_DISPATCH
struct Ymm {
  using R = __m256;
  static constexpr int W = 8;
  GF_AVX2 static GF_INLINE R zero() { return _mm256_setzero_ps(); }
  GF_AVX2 static GF_INLINE R set1(float x) { return _mm256_set1_ps(x); }
  GF_AVX2 static GF_INLINE R load(const float* p) { return _mm256_loadu_ps(p); }
  // bf16 arrays: W values widened to fp32; stored rounded as common.h's f32_to_bf16
  GF_AVX2 static GF_INLINE R load(const uint16_t* p) { return bf16x8_to_f32(p); }
  GF_AVX2 static GF_INLINE void store(uint16_t* p, R x) { store8(p, x); }
  GF_AVX2 static GF_INLINE void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  GF_AVX2 static GF_INLINE R load_part(const float* p, int) { return _mm256_loadu_ps(p); }  // D % 8 == 0
  GF_AVX2 static GF_INLINE void store_part(float* p, R x, int) { _mm256_storeu_ps(p, x); }
  GF_AVX2 static GF_INLINE R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  GF_AVX2 static GF_INLINE R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  GF_AVX2 static GF_INLINE R add(R a, R b) { return _mm256_add_ps(a, b); }
  GF_AVX2 static GF_INLINE R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  GF_AVX2 static GF_INLINE R max(R a, R b) { return _mm256_max_ps(a, b); }
  GF_AVX2 static GF_INLINE R round(R x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^i for integral i in [-126, 127]
  GF_AVX2 static GF_INLINE R exp2i(R i) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23));
  }
};

struct Zmm {
  using R = __m512;
  static constexpr int W = 16;
  GF_AVX512 static GF_INLINE R zero() { return _mm512_setzero_ps(); }
  GF_AVX512 static GF_INLINE R set1(float x) { return _mm512_set1_ps(x); }
  GF_AVX512 static GF_INLINE R load(const float* p) { return _mm512_loadu_ps(p); }
  GF_AVX512 static GF_INLINE R load(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // to_bf16_bits's rounding on 16 lanes (ties to even; a NaN quieted, its sign and top payload kept)
  GF_AVX512 static GF_INLINE void store(uint16_t* p, R x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i high = _mm512_srli_epi32(bits, 16);
    const __m512i lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512i out = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(out));
  }
  GF_AVX512 static GF_INLINE void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  // the first n lanes (n = 8 or 16: D % 16 == 8 leaves a last 8 dims); the rest read as 0
  GF_AVX512 static GF_INLINE __mmask16 lanes(int n) { return static_cast<__mmask16>((1u << n) - 1); }
  GF_AVX512 static GF_INLINE R load_part(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
  GF_AVX512 static GF_INLINE void store_part(float* p, R x, int n) { _mm512_mask_storeu_ps(p, lanes(n), x); }
  GF_AVX512 static GF_INLINE R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  GF_AVX512 static GF_INLINE R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  GF_AVX512 static GF_INLINE R add(R a, R b) { return _mm512_add_ps(a, b); }
  GF_AVX512 static GF_INLINE R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  GF_AVX512 static GF_INLINE R max(R a, R b) { return _mm512_max_ps(a, b); }
  GF_AVX512 static GF_INLINE R round(R x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  GF_AVX512 static GF_INLINE R exp2i(R i) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(i), _mm512_set1_epi32(127)), 23));
  }
};
#endif

}  // namespace grpo_fast
