// A bf16 product computed transposed (W x^T: the sampler's bf16 decode runs its projections so,
// which oneDNN does ~20% faster than x W^T at 32 rows) back into rows: as a copy, or added into
// the residual stream. torch's transposing copy of a [576, 32] bf16 matrix took ~9 µs and its
// add of a transposed view ~39 µs; here 8 x 8 blocks go through registers as fp32 (exact for
// bf16 values) and come back as bf16: a plain copy keeps the high 16 bits, an add rounds as
// torch's does (common.h's f32_to_bf16 on 8 lanes).
#include "transpose_bf16_cpu.h"

#include <stdexcept>

#include "common.h"
#include "cpu_common.h"

namespace grpo_fast {
namespace {

// Element by element: in the rows of whole 8-row blocks from column n_done on (what the blocks
// left), in the rows past them from column 0.
void transpose_base(uint16_t* dst, const uint16_t* src, int64_t M, int64_t N, int64_t ldd, int64_t lds,
                    bool accumulate, int64_t n_done) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = m < M / 8 * 8 ? n_done : 0; n < N; ++n) {
      const uint16_t v = src[n * lds + m];
      uint16_t* d = dst + m * ldd + n;
      *d = accumulate ? f32_to_bf16(bf16_to_f32(*d) + bf16_to_f32(v)) : v;
    }
}

#ifdef GF_X86_DISPATCH
// The whole 8 x 8 blocks; returns without the ragged right and bottom edges.
GF_AVX2 void transpose_avx2(uint16_t* dst, const uint16_t* src, int64_t M, int64_t N, int64_t ldd, int64_t lds,
                            bool accumulate) {
  for (int64_t n0 = 0; n0 + 8 <= N; n0 += 8)
    for (int64_t m0 = 0; m0 + 8 <= M; m0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(src + (n0 + i) * lds + m0);  // r[i][j] = src_t[n0 + i, m0 + j]
      transpose8x8(r);                                                        // r[j][i]: row m0 + j
      for (int j = 0; j < 8; ++j) {
        uint16_t* d = dst + (m0 + j) * ldd + n0;
        if (accumulate) {
          store8(d, _mm256_add_ps(load8(d), r[j]));
        } else {  // bf16 values: the high halves as they are
          const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(r[j]), 16);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d),
                           _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
        }
      }
    }
}
#endif

}  // namespace

void cpu_transpose_bf16(uintptr_t dst, uintptr_t src_t, int64_t M, int64_t N, int64_t ld_dst, int64_t ld_src,
                        bool accumulate) {
  if (M < 0 || N < 0 || ld_dst < N || ld_src < M)
    throw std::invalid_argument("cpu_transpose_bf16: need M, N >= 0, ld_dst >= N, ld_src >= M");
  auto* d = reinterpret_cast<uint16_t*>(dst);
  const auto* s = reinterpret_cast<const uint16_t*>(src_t);
#ifdef GF_X86_DISPATCH
  if (use_avx2()) {
    transpose_avx2(d, s, M, N, ld_dst, ld_src, accumulate);
    return transpose_base(d, s, M, N, ld_dst, ld_src, accumulate, N / 8 * 8);  // the ragged edges
  }
#endif
  transpose_base(d, s, M, N, ld_dst, ld_src, accumulate, 0);
}

}  // namespace grpo_fast
