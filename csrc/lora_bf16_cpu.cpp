// peft's LoRA term over a bf16 base layer, for a decode step's few rows, in one native call.
//
// peft keeps a bf16 model's adapters in fp32 (autocast_adapter_dtype) and computes, after the
// base product y = x W^T (bf16):
//     y = bf16( float(y) + s_1 * (float(x) A_1^T) B_1^T + s_2 * ... )
// which torch runs as ~8 ops (cast x, two tiny GEMMs with K = r or N = r, scale, add with type
// promotion, cast back): at 32 rows ~120 µs a layer against the 90 µs of the base product itself
// (oneDNN's bf16 GEMM). Here: the same math in two passes,
//     u_t[m, j] = sum_k float(x[m, k]) A_t[j, k]                 (fp32, [M, r] per term)
//     y[m, n]   = bf16(float(y[m, n]) + sum_t (sum_j u_t[m, j] B_t[n, j]) * s_t)
// terms added in peft's order, each scaled after its dot product as peft does (two roundings:
// the build turns off FMA contraction for this file); the bf16 rounding is common.h's
// f32_to_bf16 (torch's round to nearest even; NaN stays NaN). Summation order inside the dot
// products differs from MKL's, so results agree with peft's to fp32 rounding before the final
// bf16 rounding.
//
// Two layouts of the base product:
// - rows, y [M, N] = x W^T (cpu_lora_add_bf16): the decode's fallback for inputs with strided
//   rows, and a public op (cpu_ops.lora_add_bf16_);
// - transposed, y^T [N, M] = W x^T (+ b, in the same op) (cpu_lora_add_bf16_t): how the decode
//   computes a bf16 layer (oneDNN runs W x^T ~20% faster than x W^T at 32 rows), for several
//   outputs of one input per call (q, k, v; gate, up), x given as rows or as x^T (the MLP's inner
//   activations).
#include "lora_bf16_cpu.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "cpu_common.h"
#include "parallel.h"
#include "vec_f32.h"

namespace grpo_fast {
namespace {

constexpr int64_t kLanes = 16;  // outputs per block of the up pass, adapter ranks per block of the down pass
constexpr int64_t kRows = 4;    // x rows per tile: 4 x 16 independent sums hide the FMA latency

struct Problem {
  uint16_t* out;
  const uint16_t* x;
  int64_t M, N, K, ldx, ldo;
  const std::vector<LoraTerm>* terms;
  int64_t ranks;  // sum of the terms' ranks: u's columns, the terms one after another
};

// u[m * su_m + c * su_c] = sum_k float(x[m, k]) A_c[k] for rows [m_begin, m_end) and every rank c
// (the terms' A rows one after another): [M, ranks] rows for the row-major output (su_c = 1),
// [ranks, M] for the transposed one (su_m = 1). The portable build: k summed in order.
void down_rows_base(const uint16_t* x, int64_t ldx, int64_t K, const float* const* a_rows, int64_t ranks, float* u,
                    int64_t su_m, int64_t su_c, int64_t m_begin, int64_t m_end) {
  for (int64_t m = m_begin; m < m_end; ++m)
    for (int64_t c = 0; c < ranks; ++c) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += bf16_to_f32(x[m * ldx + k]) * a_rows[c][k];
      u[m * su_m + c * su_c] = acc;
    }
}

// The B rows of one term for outputs n0.. n0 + lanes, transposed: bt[j * ld + i] = B[n0 + i, j],
// zero for lanes <= i < kLanes.
GF_INLINE void transpose_term(const LoraTerm& t, float* bt, int64_t n0, int64_t lanes, int64_t ld = kLanes) {
  for (int64_t j = 0; j < t.r; ++j)
    for (int64_t i = 0; i < kLanes; ++i) bt[j * ld + i] = i < lanes ? t.b[(n0 + i) * t.r + j] : 0.f;
}

// bt[c * ld + i] = B[n0 + i, j] for the terms' columns c (term t's j-th), i < kLanes, zero for
// i >= lanes: one output block's rows of every B, transposed so a tile reads kLanes outputs'
// weights at once (ld >= kLanes: blocks side by side in wider rows).
GF_INLINE void transpose_block(const Problem& p, float* bt, int64_t n0, int64_t lanes, int64_t ld = kLanes) {
  for (const LoraTerm& t : *p.terms) {
    transpose_term(t, bt, n0, lanes, ld);
    bt += t.r * ld;
  }
}

// Every output block of kLanes columns: the block's rows of every B transposed once
// ([ranks][kLanes], zero past N), then kRows rows of out at a time get their kLanes outputs,
// each term's sum scaled and added in turn (peft's order).
GF_INLINE void up_blocks(const Problem& p, const float* u, int64_t n_begin, int64_t n_end) {
  std::vector<float> bt(p.ranks * kLanes);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kLanes) {
    const int64_t lanes = p.N - n0 < kLanes ? p.N - n0 : kLanes;
    transpose_block(p, bt.data(), n0, lanes);
    for (int64_t m = 0; m < p.M; m += kRows) {
      const int64_t n_rows = p.M - m < kRows ? p.M - m : kRows;
      float y[kRows][kLanes] = {};
      for (int64_t r = 0; r < n_rows; ++r) {
        const uint16_t* ym = p.out + (m + r) * p.ldo + n0;
        if (lanes == kLanes) {
#pragma omp simd
          for (int64_t i = 0; i < kLanes; ++i) y[r][i] = bf16_to_f32(ym[i]);
        } else {
          for (int64_t i = 0; i < lanes; ++i) y[r][i] = bf16_to_f32(ym[i]);
        }
      }
      const float* bj = bt.data();
      int64_t c = 0;
      for (const LoraTerm& t : *p.terms) {
        float acc[kRows][kLanes] = {};
        for (int64_t j = 0; j < t.r; ++j, bj += kLanes) {
          for (int64_t r = 0; r < kRows; ++r) {
            const float uv = r < n_rows ? u[(m + r) * p.ranks + c + j] : 0.f;
#pragma omp simd
            for (int64_t i = 0; i < kLanes; ++i) acc[r][i] += uv * bj[i];
          }
        }
        for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
          for (int64_t i = 0; i < kLanes; ++i) y[r][i] += acc[r][i] * t.scale;
        }
        c += t.r;
      }
      for (int64_t r = 0; r < n_rows; ++r) {
        uint16_t* ym = p.out + (m + r) * p.ldo + n0;
        if (lanes == kLanes) {
#pragma omp simd
          for (int64_t i = 0; i < kLanes; ++i) ym[i] = f32_to_bf16(y[r][i]);
        } else {
          for (int64_t i = 0; i < lanes; ++i) ym[i] = f32_to_bf16(y[r][i]);
        }
      }
    }
  }
}

void up_blocks_base(const Problem& p, const float* u, int64_t n_begin, int64_t n_end) {
  up_blocks(p, u, n_begin, n_end);
}
#ifdef GF_X86_DISPATCH
// rows [0, n) of x (ldx apart) as fp32 rows of K, K apart: the down passes' copy of a tile's rows.
GF_AVX2 void widen_rows(const uint16_t* x, int64_t ldx, int64_t K, int64_t n, float* rows) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t r = 0; r < n; ++r) {
    const uint16_t* xm = x + r * ldx;
    float* dst = rows + r * K;
    int64_t k = 0;
    for (; k < K8; k += 8) _mm256_storeu_ps(dst + k, bf16x8_to_f32(xm + k));
    for (; k < K; ++k) dst[k] = bf16_to_f32(xm[k]);
  }
}

// u[m, c] for rows [m_begin, m_end), as dot products along k with A read in place (no A^T copy,
// which at one row cost more than the sums): each row's fp32 copy against two of A's rows at a
// time, 8 k per step in 4 x 2 accumulators, summed across the lanes at the end and then the
// k % 8 tail. A row's sums do not depend on which rows share its tile, so any split of the rows
// gives the same u.
// u[m * su_m + c * su_c]: [M, ranks] rows for the row-major output, [ranks, M] for the
// transposed one (su_m = 1).
GF_AVX2 void down_rows_avx2(const uint16_t* x, int64_t ldx, int64_t K, const float* const* a_rows, int64_t ranks,
                            float* u, int64_t su_m, int64_t su_c, int64_t m_begin, int64_t m_end) {
  const int64_t K8 = K / 8 * 8;
  thread_local std::vector<float> rows;
  rows.assign(kRows * K, 0.f);
  for (int64_t m = m_begin; m < m_end; m += kRows) {
    const int64_t n_rows = m_end - m < kRows ? m_end - m : kRows;
    widen_rows(x + m * ldx, ldx, K, n_rows, rows.data());
    for (int64_t c = 0; c < ranks; c += 2) {
      const float* a0 = a_rows[c];
      const float* a1 = a_rows[c + 1 < ranks ? c + 1 : c];  // an odd last rank: computed twice, kept once
      __m256 acc[kRows][2];
      for (int64_t r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 w0 = _mm256_loadu_ps(a0 + k), w1 = _mm256_loadu_ps(a1 + k);
        for (int64_t r = 0; r < kRows; ++r) {
          const __m256 xv = _mm256_loadu_ps(rows.data() + r * K + k);
          acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
        }
      }
      for (int64_t r = 0; r < n_rows; ++r) {
        const float* xr = rows.data() + r * K;
        float s0 = hsum8(acc[r][0]), s1 = hsum8(acc[r][1]);
        for (int64_t k = K8; k < K; ++k) s0 += xr[k] * a0[k], s1 += xr[k] * a1[k];
        u[(m + r) * su_m + c * su_c] = s0;
        if (c + 1 < ranks) u[(m + r) * su_m + (c + 1) * su_c] = s1;
      }
    }
  }
}

// transpose_block with 8 x 8 register transposes where a term's rank is a multiple of 8 and the
// block is whole (r x 16 values each moved once by scalar code cost as much as the sums at one
// row).
GF_AVX2 void transpose_block_avx2(const Problem& p, float* bt, int64_t n0, int64_t lanes, int64_t ld = kLanes) {
  if (lanes < kLanes) return transpose_block(p, bt, n0, lanes, ld);
  for (const LoraTerm& t : *p.terms) {
    if (t.r % 8 != 0) {
      transpose_term(t, bt, n0, kLanes, ld);
    } else {
      for (int64_t i0 = 0; i0 < kLanes; i0 += 8)
        for (int64_t j0 = 0; j0 < t.r; j0 += 8) {
          __m256 v[8];
          for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(t.b + (n0 + i0 + i) * t.r + j0);
          transpose8x8(v);  // v[j] = B[n0 + i0 + 0..7, j0 + j]
          for (int j = 0; j < 8; ++j) _mm256_storeu_ps(bt + (j0 + j) * ld + i0, v[j]);
        }
    }
    bt += t.r * ld;
  }
}


// ---- the row-major add on zmm (where use_avx512()) ----
//
// The same sums as the AVX2 passes, twice as wide. The up pass is one body for both ISAs
// (lora_up_pass.inc: the same bits); the down pass sums k in 16 lanes instead of 8, so u can
// differ from the AVX2 pass's in fp32 rounding (and the result, rarely, by one bf16 step). At 32
// rows the AVX2 passes ran at 52-77 GFLOPS on one core of this AMD EPYC, and were 17% of a LoRA
// bf16 policy's decode (benchmarks/RESULTS.md, "bf16 LoRA's add on zmm").

// down_rows_avx2 on zmm: each row's fp32 copy against four of A's rows at a time, 16 k per step
// in 4 x 4 accumulators, summed across the lanes at the end, then the k % 16 tail.
GF_AVX512 void down_rows_512(const uint16_t* x, int64_t ldx, int64_t K, const float* const* a_rows, int64_t ranks,
                             float* u, int64_t su_m, int64_t su_c, int64_t m_begin, int64_t m_end) {
  constexpr int kRanks = 4;
  const int64_t K16 = K / 16 * 16;
  thread_local std::vector<float> rows;
  rows.assign(kRows * K, 0.f);
  for (int64_t m = m_begin; m < m_end; m += kRows) {
    const int64_t n_rows = m_end - m < kRows ? m_end - m : kRows;
    widen_rows(x + m * ldx, ldx, K, n_rows, rows.data());
    for (int64_t c = 0; c < ranks; c += kRanks) {
      const float* a[kRanks];  // ranks past the last: the last one again, computed and not stored
      for (int i = 0; i < kRanks; ++i) a[i] = a_rows[c + i < ranks ? c + i : ranks - 1];
      __m512 acc[kRows][kRanks];
      for (int64_t r = 0; r < kRows; ++r)
        for (int i = 0; i < kRanks; ++i) acc[r][i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K16; k += 16) {
        __m512 w[kRanks];
        for (int i = 0; i < kRanks; ++i) w[i] = _mm512_loadu_ps(a[i] + k);
        for (int64_t r = 0; r < kRows; ++r) {
          const __m512 xv = _mm512_loadu_ps(rows.data() + r * K + k);
          for (int i = 0; i < kRanks; ++i) acc[r][i] = _mm512_fmadd_ps(xv, w[i], acc[r][i]);
        }
      }
      for (int64_t r = 0; r < n_rows; ++r) {
        const float* xr = rows.data() + r * K;
        for (int i = 0; i < kRanks && c + i < ranks; ++i) {
          float sum = _mm512_reduce_add_ps(acc[r][i]);
          for (int64_t k = K16; k < K; ++k) sum += xr[k] * a[i][k];
          u[(m + r) * su_m + (c + i) * su_c] = sum;
        }
      }
    }
  }
}

// The up pass, one body for each ISA (lora_up_pass.inc): kRows rows x 2W outputs a tile, two
// vectors a row (on ymm one 16-output block, on zmm two side by side).
namespace ymm {
using V = Ymm;
#define GF_VEC GF_AVX2
#include "lora_up_pass.inc"
#undef GF_VEC
}  // namespace ymm

namespace zmm {
using V = Zmm;
#define GF_VEC GF_AVX512
#include "lora_up_pass.inc"
#undef GF_VEC
}  // namespace zmm

#endif

// ---- the transposed layout: out_t [N, M] (a base product computed as W x^T) ----
//
// Both passes with the rows m as the vector lanes: u^T [ranks, Mp] (Mp = M rounded up to 8, the
// pad zero), then out_t[n, m] += s * sum_j B[n, j] u^T[j, m] with B[n, j] broadcast from B as it
// lies ([N, r]: no transposed copy of B). x is [M, K] rows, or x^T [K, M] (the transposed MLP's
// inner activations, fed to the down projection as they are).
struct TProblem {
  const uint16_t* x;
  int64_t ldx;
  bool x_transposed;
  int64_t M, K, Mp;
  int64_t ranks;               // every output's terms' ranks: u^T's rows
  const float* const* a_rows;  // their A rows in place, output after output, term after term
};

// One output of several that read the same x (a layer's q, k, v): out_t [N, M] rows ldo apart,
// its terms' rows of u^T from rank0 on.
struct TOut {
  uint16_t* out_t;
  int64_t N, ldo;
  const std::vector<LoraTerm>* terms;
  int64_t rank0;
};

// u^T[c, m] for every rank and row, x as x^T [K, M] (the portable build).
void down_cols_base(const TProblem& p, float* ut) {
  for (int64_t c = 0; c < p.ranks; ++c)
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < p.K; ++k) acc += p.a_rows[c][k] * bf16_to_f32(p.x[k * p.ldx + m]);
      ut[c * p.Mp + m] = acc;
    }
}

void up_rows_t_base(const TProblem& p, const TOut& out, const float* ut, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      uint16_t* o = out.out_t + n * out.ldo + m;
      float y = bf16_to_f32(*o);
      int64_t c = out.rank0;
      for (const LoraTerm& t : *out.terms) {
        float acc = 0.f;
        for (int64_t j = 0; j < t.r; ++j) acc += t.b[n * t.r + j] * ut[(c + j) * p.Mp + m];
        y += acc * t.scale;
        c += t.r;
      }
      *o = f32_to_bf16(y);
    }
}

#ifdef GF_X86_DISPATCH
// u^T[c..c+NR, m0..m0+8*MV] from xf (x^T's rows widened to fp32, ldf apart, column f0 = row m0):
// NR ranks by up to 16 rows a tile, k summed in order, so no split changes a value. Ranks past
// the last are the last one again, computed and not stored.
template <int NR, int MV>
GF_AVX2 GF_INLINE void down_cols_tile(const TProblem& p, const float* xf, int64_t ldf, int64_t f0, float* ut,
                                      int64_t c, int64_t m0) {
  const float* a[NR];
  for (int i = 0; i < NR; ++i) a[i] = p.a_rows[c + i < p.ranks ? c + i : p.ranks - 1];
  __m256 acc[NR][MV];
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < MV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < p.K; ++k) {
    __m256 w[NR];
    for (int i = 0; i < NR; ++i) w[i] = _mm256_broadcast_ss(a[i] + k);
    const float* xk = xf + k * ldf + f0;
    for (int v = 0; v < MV; ++v) {
      const __m256 xv = _mm256_loadu_ps(xk + 8 * v);
      for (int i = 0; i < NR; ++i) acc[i][v] = _mm256_fmadd_ps(w[i], xv, acc[i][v]);
    }
  }
  for (int i = 0; i < NR && c + i < p.ranks; ++i)
    for (int v = 0; v < MV; ++v) _mm256_storeu_ps(ut + (c + i) * p.Mp + m0 + 8 * v, acc[i][v]);
}

// u^T for rows [m_begin, m_end) (multiples of 8, m_end <= Mp), x^T [K, M]: those rows' columns
// of x^T widened to fp32 on this thread (zero past M), then every rank for them.
GF_AVX2 void down_cols_avx2(const TProblem& p, float* ut, int64_t m_begin, int64_t m_end) {
  const int64_t width = m_end - m_begin;
  thread_local std::vector<float> xf;
  xf.resize(p.K * width);
  for (int64_t k = 0; k < p.K; ++k) {
    const uint16_t* src = p.x + k * p.ldx;
    float* dst = xf.data() + k * width;
    for (int64_t m = m_begin; m < m_end; m += 8) {
      if (m + 8 <= p.M) {
        _mm256_storeu_ps(dst + (m - m_begin), bf16x8_to_f32(src + m));
      } else {
        for (int64_t l = 0; l < 8; ++l) dst[m - m_begin + l] = m + l < p.M ? bf16_to_f32(src[m + l]) : 0.f;
      }
    }
  }
  for (int64_t m0 = m_begin; m0 < m_end; m0 += 16) {
    const bool two = m0 + 16 <= m_end;
    for (int64_t c = 0; c < p.ranks; c += 4) {
      if (two) down_cols_tile<4, 2>(p, xf.data(), width, m0 - m_begin, ut, c, m0);
      else down_cols_tile<4, 1>(p, xf.data(), width, m0 - m_begin, ut, c, m0);
    }
  }
}

// Outputs n0, n0 + 1 (NB of them) by up to 32 rows from m0: each term's sums in registers, then
// y = float(out) + sum * s term after term (peft's order) through a small fp32 tile, rounded
// once. Rows past M (the last vector of a ragged M) go through a copy.
template <int NB, int MV>
GF_AVX2 GF_INLINE void up_t_tile(const TProblem& p, const TOut& out, const float* ut, int64_t n0, int64_t m0) {
  alignas(32) float y[NB][32];
  alignas(32) uint16_t part[8];
  for (int i = 0; i < NB; ++i)
    for (int v = 0; v < MV; ++v) {
      const uint16_t* o = out.out_t + (n0 + i) * out.ldo + m0 + 8 * v;
      const int64_t lanes = p.M - (m0 + 8 * v);
      if (lanes >= 8) {
        _mm256_store_ps(y[i] + 8 * v, load8(o));
      } else {
        for (int l = 0; l < 8; ++l) part[l] = l < lanes ? o[l] : 0;
        _mm256_store_ps(y[i] + 8 * v, load8(part));
      }
    }
  int64_t c = out.rank0;
  for (const LoraTerm& t : *out.terms) {
    __m256 acc[NB][MV];
    for (int i = 0; i < NB; ++i)
      for (int v = 0; v < MV; ++v) acc[i][v] = _mm256_setzero_ps();
    const int64_t r = t.r, ldu = p.Mp;  // (locals: the loop then keeps its addresses in registers)
    const float* brow[NB];
    for (int i = 0; i < NB; ++i) brow[i] = t.b + (n0 + i) * r;
    const float* uj = ut + c * ldu + m0;
    for (int64_t j = 0; j < r; ++j, uj += ldu) {
      __m256 b[NB];
      for (int i = 0; i < NB; ++i) b[i] = _mm256_broadcast_ss(brow[i] + j);
      for (int v = 0; v < MV; ++v) {
        const __m256 uv = _mm256_loadu_ps(uj + 8 * v);
        for (int i = 0; i < NB; ++i) acc[i][v] = _mm256_fmadd_ps(b[i], uv, acc[i][v]);
      }
    }
    const __m256 scale = _mm256_set1_ps(t.scale);
    for (int i = 0; i < NB; ++i)
      for (int v = 0; v < MV; ++v)  // y + (sum * s): peft's two roundings, not one FMA
        _mm256_store_ps(y[i] + 8 * v, _mm256_add_ps(_mm256_load_ps(y[i] + 8 * v), _mm256_mul_ps(acc[i][v], scale)));
    c += t.r;
  }
  for (int i = 0; i < NB; ++i)
    for (int v = 0; v < MV; ++v) {
      uint16_t* o = out.out_t + (n0 + i) * out.ldo + m0 + 8 * v;
      const int64_t lanes = p.M - (m0 + 8 * v);
      if (lanes >= 8) {
        store8(o, _mm256_load_ps(y[i] + 8 * v));
      } else {
        store8(part, _mm256_load_ps(y[i] + 8 * v));
        for (int l = 0; l < lanes; ++l) o[l] = part[l];
      }
    }
}

template <int NB>
GF_AVX2 GF_INLINE void up_t_outputs(const TProblem& p, const TOut& out, const float* ut, int64_t n0) {
  for (int64_t m0 = 0; m0 < p.Mp; m0 += 32) {
    switch (std::min<int64_t>(4, (p.Mp - m0) / 8)) {
      case 4: up_t_tile<NB, 4>(p, out, ut, n0, m0); break;
      case 3: up_t_tile<NB, 3>(p, out, ut, n0, m0); break;
      case 2: up_t_tile<NB, 2>(p, out, ut, n0, m0); break;
      default: up_t_tile<NB, 1>(p, out, ut, n0, m0); break;
    }
  }
}

GF_AVX2 void up_rows_t_avx2(const TProblem& p, const TOut& out, const float* ut, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 2 <= n_end; n += 2) up_t_outputs<2>(p, out, ut, n);
  if (n < n_end) up_t_outputs<1>(p, out, ut, n);
}
#endif

// The down pass over x's rows for either layout (u[m * su_m + c * su_c]), by tiles of rows over
// the threads where `split` (AVX2 only), else all rows in one chunk.
void down_rows_all(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const float* const* a_rows, int64_t ranks,
                   float* u, int64_t su_m, int64_t su_c, bool avx2, bool split) {
  const int64_t row_tiles = (M + kRows - 1) / kRows;
  const int64_t chunks = avx2 && split && row_tiles >= 2 ? std::min<int64_t>(row_tiles, 2 * parallel_threads()) : 1;
  parallel_for(chunks, [&](int64_t i) {
    const int64_t m0 = row_tiles * i / chunks * kRows, m1 = std::min(M, row_tiles * (i + 1) / chunks * kRows);
#ifdef GF_X86_DISPATCH
    if (avx2 && use_avx512()) return down_rows_512(x, ldx, K, a_rows, ranks, u, su_m, su_c, m0, m1);
    if (avx2) return down_rows_avx2(x, ldx, K, a_rows, ranks, u, su_m, su_c, m0, m1);
#endif
    down_rows_base(x, ldx, K, a_rows, ranks, u, su_m, su_c, m0, m1);
  });
}

}  // namespace

void cpu_lora_add_bf16(uintptr_t out, uintptr_t x, int64_t M, int64_t N, int64_t K, int64_t ldx,
                       int64_t ldo, const std::vector<LoraTerm>& terms) {
  if (M < 0 || N < 1 || K < 1 || ldx < K || ldo < N)
    throw std::invalid_argument("cpu_lora_add_bf16: need M >= 0, N >= 1, K >= 1, ldx >= K, ldo >= N");
  int64_t ranks = 0;
  for (const LoraTerm& t : terms) ranks += t.r;
  if (M == 0 || ranks == 0) return;
  const bool avx2 = use_avx2();
  std::vector<const float*> a_rows;  // every term's A rows in place
  for (const LoraTerm& t : terms)
    for (int64_t j = 0; j < t.r; ++j) a_rows.push_back(t.a + j * K);
  const Problem p{reinterpret_cast<uint16_t*>(out), reinterpret_cast<const uint16_t*>(x), M, N, K, ldx, ldo,
                  &terms, ranks};
  std::vector<float> u((M + kRows - 1) / kRows * kRows * ranks, 0.f);  // [M rounded up to kRows, ranks]
  // Both passes on several threads only where the caller runs its regions on libgomp's team (the
  // sampler's per-module decode: native.openmp_regions), whose worker is awake between torch
  // ops: the down pass by tiles of rows, the up pass by blocks of outputs. On the pool all stays
  // on one thread: the pool's helper then spun against oneDNN's bf16 GEMM that runs next
  // (measured: the base products 1.35x slower with two threads, for a 15% faster add). On zmm a
  // decode step's add (32 rows) is quick enough that the region costs more than the second thread
  // saves: the LoRA policy's decode ran 1.02x faster with it on one thread (alternating in one
  // process), so there both passes split only from kSplitRows rows on (a prefill).
  constexpr int64_t kSplitRows = 64;
  const bool split = openmp_regions() && (!use_avx512() || M >= kSplitRows);
  down_rows_all(p.x, ldx, M, K, a_rows.data(), ranks, u.data(), ranks, 1, avx2, split);
  constexpr int64_t kChunk = 8 * kLanes;  // outputs per parallel chunk
  // below 4 chunks the region costs what it saves (192 outputs: 0.95x; 576: 1.02x; 1,536: 1.09x)
  const int64_t chunks = split && N >= 4 * kChunk ? (N + kChunk - 1) / kChunk : 1;
  parallel_for(chunks, [&](int64_t i) {
    const int64_t n0 = i * kChunk, n1 = chunks == 1 ? N : std::min<int64_t>(N, n0 + kChunk);
#ifdef GF_X86_DISPATCH
    if (avx2 && use_avx512()) return zmm::up_blocks(p, u.data(), n0, n1);
    if (avx2) return ymm::up_blocks(p, u.data(), n0, n1);
#endif
    up_blocks_base(p, u.data(), n0, n1);
  });
}


void cpu_lora_add_bf16_t(const std::vector<uintptr_t>& outs_t, const std::vector<int64_t>& ns,
                         const std::vector<int64_t>& ldos, uintptr_t x, int64_t M, int64_t K, int64_t ldx,
                         bool x_transposed, const std::vector<std::vector<LoraTerm>>& terms) {
  const size_t n_outs = outs_t.size();
  if (ns.size() != n_outs || ldos.size() != n_outs || terms.size() != n_outs)
    throw std::invalid_argument("cpu_lora_add_bf16_t: need one N, row stride and list of terms per output");
  if (M < 0 || K < 1 || ldx < (x_transposed ? M : K))
    throw std::invalid_argument("cpu_lora_add_bf16_t: need M >= 0, K >= 1, ldx >= K (x rows) or M (x^T rows)");
  std::vector<TOut> outs;
  std::vector<const float*> a_rows;
  for (size_t o = 0; o < n_outs; ++o) {
    if (ns[o] < 1 || ldos[o] < M)
      throw std::invalid_argument("cpu_lora_add_bf16_t: need N >= 1 and a row stride >= M for every output");
    outs.push_back({reinterpret_cast<uint16_t*>(outs_t[o]), ns[o], ldos[o], &terms[o],
                    static_cast<int64_t>(a_rows.size())});
    for (const LoraTerm& t : terms[o])
      for (int64_t j = 0; j < t.r; ++j) a_rows.push_back(t.a + j * K);
  }
  const int64_t ranks = static_cast<int64_t>(a_rows.size());
  if (M == 0 || ranks == 0) return;
  const int64_t Mp = (M + 7) / 8 * 8;
  const TProblem p{reinterpret_cast<const uint16_t*>(x), ldx, x_transposed, M, K, Mp, ranks, a_rows.data()};
  std::vector<float> ut(ranks * Mp, 0.f);  // [ranks, Mp]
  const bool avx2 = use_avx2();
  // Split over the threads only on libgomp's team (see cpu_lora_add_bf16): the down pass by
  // tiles of rows, the up pass by runs of outputs.
  const bool split = openmp_regions() && avx2;
  if (x_transposed) {
    // by vectors of 8 rows: each chunk widens its own columns of x^T
    const int64_t vectors = Mp / 8;
    const int64_t chunks = split ? std::min<int64_t>(vectors, parallel_threads()) : 1;
    parallel_for(chunks, [&](int64_t i) {
      const int64_t m0 = vectors * i / chunks * 8, m1 = vectors * (i + 1) / chunks * 8;
#ifdef GF_X86_DISPATCH
      if (avx2) return down_cols_avx2(p, ut.data(), m0, m1);
#endif
      down_cols_base(p, ut.data());  // the portable build: all rows, one chunk
    });
  } else {
    down_rows_all(p.x, ldx, M, K, a_rows.data(), ranks, ut.data(), 1, Mp, avx2, split);
  }
  // Every output's rows in runs of about 32 (at 32 rows and r = 16: ~5 µs of sums each), the
  // outputs' runs one after another in one region.
  struct Run {
    int64_t out, n0, n1;
  };
  std::vector<Run> runs;
  for (size_t o = 0; o < n_outs; ++o) {
    if (terms[o].empty()) continue;
    const int64_t count = split ? std::max<int64_t>(1, (ns[o] + 31) / 32) : 1;
    for (int64_t i = 0; i < count; ++i) {
      const auto [n0, n1] = chunk_range(i, count, ns[o]);
      runs.push_back({static_cast<int64_t>(o), n0, n1});
    }
  }
  parallel_for(static_cast<int64_t>(runs.size()), [&](int64_t i) {
    const Run& r = runs[i];
#ifdef GF_X86_DISPATCH
    if (avx2) return up_rows_t_avx2(p, outs[r.out], ut.data(), r.n0, r.n1);
#endif
    up_rows_t_base(p, outs[r.out], ut.data(), r.n0, r.n1);
  });
}

}  // namespace grpo_fast
