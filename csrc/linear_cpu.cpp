// Few-row fp32 linear layers on the CPU (the sampler's decode step): out = x @ W^T for an x of a
// few dozen rows and a weight streamed from memory once.
//
// Why not MKL: at M = 32 rows sgemm packs the whole weight into its panel format on every call,
// which for a weight read exactly once is an extra pass over it; measured here (AMD EPYC, AVX2,
// 2 threads, weights not in cache) x @ W^T runs at 44-54 GFLOPS, this kernel at 58-67 (the
// machine's FMA peak is ~69).
//
// Layout: x is packed once per call into x^T tiles [K][32] (zero padded past M), so one k step
// is 4 ymm loads of x and one broadcast per weight row; the micro-tile is 3 weight rows x 32 x
// rows = 12 accumulators. The weight is read in place, row-major [N, K], no copy. Work is split
// over blocks of 3 weight rows (OpenMP, static, so each thread streams one contiguous slice).
// The sum over k runs in registers kKBlock steps at a time and is added into the tile's partial
// sums between blocks, which keeps the rounding error of long K close to a blocked GEMM's.
#include "linear_cpu.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "cpu_common.h"

namespace grpo_fast {
namespace {

constexpr int kRows = 3;       // weight rows per micro-tile
constexpr int kCols = 32;      // x rows per micro-tile (4 ymm)
constexpr int kKBlock = 128;   // k steps summed in registers before joining the partial sums

#ifdef GF_X86_DISPATCH
// tile[r][0:8*MV] = sum_k w_r[k] * xt[k][0:8*MV] for r < NR.
template <int MV, int NR>
GF_AVX2 GF_INLINE void micro_tile(float* tile, const float* xt, const float* w, int64_t ldw,
                                  int64_t K) {
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t k1 = std::min<int64_t>(K, k0 + kKBlock);
    __m256 acc[NR][MV];
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      const float* xk = xt + k * kCols;
      for (int r = 0; r < NR; ++r) {
        const __m256 b = _mm256_broadcast_ss(w + r * ldw + k);
        for (int v = 0; v < MV; ++v)
          acc[r][v] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xk + 8 * v), acc[r][v]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < MV; ++v) {
        float* t = tile + r * kCols + 8 * v;
        _mm256_storeu_ps(t, k0 == 0 ? acc[r][v] : _mm256_add_ps(_mm256_loadu_ps(t), acc[r][v]));
      }
  }
}

template <int NR>
GF_AVX2 void micro_tile_cols(int mv, float* tile, const float* xt, const float* w, int64_t ldw,
                             int64_t K) {
  switch (mv) {
    case 4: return micro_tile<4, NR>(tile, xt, w, ldw, K);
    case 3: return micro_tile<3, NR>(tile, xt, w, ldw, K);
    case 2: return micro_tile<2, NR>(tile, xt, w, ldw, K);
    default: return micro_tile<1, NR>(tile, xt, w, ldw, K);
  }
}

// tile [nr][32] for weight rows w[0:nr] against the x^T tile xt [K][32] (mv ymm of it valid).
GF_AVX2 void weight_tile(int nr, int mv, float* tile, const float* xt, const float* w,
                         int64_t ldw, int64_t K) {
  if (nr == 3) return micro_tile_cols<3>(mv, tile, xt, w, ldw, K);
  if (nr == 2) return micro_tile_cols<2>(mv, tile, xt, w, ldw, K);
  return micro_tile_cols<1>(mv, tile, xt, w, ldw, K);
}

// silu(g) * u = g * u / (1 + exp(-g)), with exp of a non-positive argument only.
GF_AVX2 void silu_mul_tile(float* g, const float* u, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float e = exp_nonpos(-std::fabs(g[i]));  // exp(-|g|)
    const float sig = g[i] >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
    g[i] = g[i] * sig * u[i];
  }
}
#endif

struct Problem {
  const float* x;
  int64_t M, K, ldx;
  int64_t m_tiles() const { return (M + kCols - 1) / kCols; }
};

// x^T tiles [m_tiles][K][32], rows past M zero; each thread packs a slice of k.
void pack_xt(float* xt, const Problem& p) {
  const int64_t tiles = p.m_tiles();
#pragma omp for schedule(static)
  for (int64_t k = 0; k < p.K; ++k)
    for (int64_t t = 0; t < tiles; ++t) {
      float* dst = xt + (t * p.K + k) * kCols;
      for (int c = 0; c < kCols; ++c) {
        const int64_t m = t * kCols + c;
        dst[c] = m < p.M ? p.x[m * p.ldx + k] : 0.f;
      }
    }
}

void check(const Problem& p, int64_t N, int64_t ldo) {
  if (p.M < 0 || N < 0 || p.K < 1)
    throw std::invalid_argument("cpu_linear: need M >= 0, N >= 0, K >= 1");
  if (p.ldx < p.K || ldo < N)
    throw std::invalid_argument("cpu_linear: row strides must be >= the row lengths");
  if (!use_avx2()) throw std::invalid_argument("cpu_linear: this CPU has no AVX2+FMA");
}

// One weight of a (possibly multi-weight) linear call: out [M, n] (rows ldo apart) from w [n, K].
struct Segment {
  const float* w;
  const float* bias;
  float* out;
  int64_t n, ldo;
};

// The loop both linear kernels share: x packed once into x^T tiles, then the `blocks` 3-row
// weight blocks split over the threads (static: each streams one contiguous slice), and per block
// and x tile fn(block, xt_tile, m0, mr) with the tile's first row m0 and valid rows mr.
template <typename BlockFn>
void for_each_block_tile(const Problem& p, int64_t blocks, BlockFn fn) {
  const int64_t tiles = p.m_tiles();
  std::vector<float> xt(tiles * p.K * kCols);
#pragma omp parallel
  {
    pack_xt(xt.data(), p);  // ends in the implicit barrier of its omp for
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t t = 0; t < tiles; ++t)
        fn(b, xt.data() + t * p.K * kCols, t * kCols,
           static_cast<int>(std::min<int64_t>(kCols, p.M - t * kCols)));
  }
}

// out_i (+)= alpha * x @ w_i^T + bias_i for every segment: the weight rows of all segments are
// one list of 3-row blocks.
void run_linear(const Problem& p, const std::vector<Segment>& segs, float alpha, bool accumulate) {
#ifdef GF_X86_DISPATCH
  std::vector<int64_t> first{0};  // first global block of each segment
  for (const Segment& sg : segs) first.push_back(first.back() + (sg.n + kRows - 1) / kRows);
  const int64_t K = p.K;
  for_each_block_tile(p, first.back(), [&](int64_t gb, const float* xt, int64_t m0, int mr) {
    size_t si = 0;
    while (gb >= first[si + 1]) ++si;
    const Segment& sg = segs[si];
    const int64_t n0 = (gb - first[si]) * kRows;
    const int nr = static_cast<int>(std::min<int64_t>(kRows, sg.n - n0));
    alignas(32) float tile[kRows * kCols];
    weight_tile(nr, (mr + 7) / 8, tile, xt, sg.w + n0 * K, K, K);
    for (int r = 0; r < nr; ++r) {
      const float add = sg.bias ? sg.bias[n0 + r] : 0.f;
      for (int m = 0; m < mr; ++m) {
        float* dst = sg.out + (m0 + m) * sg.ldo + n0 + r;
        const float v = alpha * tile[r * kCols + m] + add;
        *dst = accumulate ? *dst + v : v;
      }
    }
  });
#endif
}

}  // namespace

bool cpu_linear_available() { return use_avx2(); }

void cpu_linear(uintptr_t out, uintptr_t x, uintptr_t weight, uintptr_t bias, int64_t M,
                int64_t N, int64_t K, int64_t ldx, int64_t ldo, float alpha, bool accumulate) {
  const Problem p{reinterpret_cast<const float*>(x), M, K, ldx};
  check(p, N, ldo);
  run_linear(p,
             {{reinterpret_cast<const float*>(weight), reinterpret_cast<const float*>(bias),
               reinterpret_cast<float*>(out), N, ldo}},
             alpha, accumulate);
}

void cpu_linear_many(const std::vector<uintptr_t>& outs, uintptr_t x,
                     const std::vector<uintptr_t>& weights, const std::vector<uintptr_t>& biases,
                     const std::vector<int64_t>& ns, const std::vector<int64_t>& ldos, int64_t M,
                     int64_t K, int64_t ldx) {
  const size_t count = weights.size();
  if (outs.size() != count || biases.size() != count || ns.size() != count || ldos.size() != count)
    throw std::invalid_argument("cpu_linear_many: outs, weights, biases, ns, ldos differ in length");
  const Problem p{reinterpret_cast<const float*>(x), M, K, ldx};
  std::vector<Segment> segs;
  for (size_t i = 0; i < count; ++i) {
    check(p, ns[i], ldos[i]);
    segs.push_back({reinterpret_cast<const float*>(weights[i]),
                    reinterpret_cast<const float*>(biases[i]), reinterpret_cast<float*>(outs[i]),
                    ns[i], ldos[i]});
  }
  run_linear(p, segs, 1.f, false);
}

void cpu_silu_mul_linear(uintptr_t out, uintptr_t x, uintptr_t w_gate, uintptr_t w_up, int64_t M,
                         int64_t N, int64_t K, int64_t ldx, int64_t ldo) {
  const Problem p{reinterpret_cast<const float*>(x), M, K, ldx};
  check(p, N, ldo);
#ifdef GF_X86_DISPATCH
  auto* o = reinterpret_cast<float*>(out);
  const auto* wg = reinterpret_cast<const float*>(w_gate);
  const auto* wu = reinterpret_cast<const float*>(w_up);
  const int64_t blocks = (N + kRows - 1) / kRows;
  for_each_block_tile(p, blocks, [&](int64_t b, const float* xt, int64_t m0, int mr) {
    const int64_t n0 = b * kRows;
    const int nr = static_cast<int>(std::min<int64_t>(kRows, N - n0));
    alignas(32) float gate[kRows * kCols], up[kRows * kCols];
    weight_tile(nr, (mr + 7) / 8, gate, xt, wg + n0 * K, K, K);
    weight_tile(nr, (mr + 7) / 8, up, xt, wu + n0 * K, K, K);
    silu_mul_tile(gate, up, nr * kCols);
    for (int r = 0; r < nr; ++r)
      for (int m = 0; m < mr; ++m) o[(m0 + m) * ldo + n0 + r] = gate[r * kCols + m];
  });
#endif
}

}  // namespace grpo_fast
