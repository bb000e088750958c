// Few-row fp32 linear layers on the CPU (the sampler's decode step): out = x @ W^T for an x of a
// few dozen rows and a weight streamed from memory once.
//
// Why not MKL: at M = 32 rows sgemm packs the whole weight into its panel format on every call,
// which for a weight read exactly once is an extra pass over it; measured here (AMD EPYC, AVX2,
// 2 threads, weights not in cache) x @ W^T runs at 44-54 GFLOPS, this kernel at 58-67 (the
// machine's FMA peak is ~69). On the Zen 4 EPYC (AVX512; MKL's best GEMM ~190 GFLOPS), with the
// weight prefetch and the run-wise output below: 80-153 GFLOPS at 32 rows vs MKL's 63-108, the LM
// head 137-153 vs 63-64 (benchmarks/bench_gemm.py).
//
// Layout: x is packed once per call into x^T tiles [K][32] (zero padded past M), so one k step
// is 4 ymm loads of x and one broadcast per weight row; the micro-tile is 3 weight rows x 32 x
// rows = 12 accumulators. The weight is read in place, row-major [N, K], no copy. Work is split
// over chunks of consecutive 3-row weight blocks (~30 µs each) that the threads claim
// (parallel.h). The sum over k runs in registers kKBlock steps at a time and is added into the
// tile's partial sums between blocks, which keeps the rounding error of long K close to a
// blocked GEMM's.
//
// LoRA (peft's base(x) + s * B(A(x)), read from the live adapter weights): the packed input
// gets r more rows per adapter, (s * x A^T)^T, computed right after the packing. B's rows then
// continue the base weight's k loop in the same micro-tile: the packed input is [x, s x A^T] and
// the weight [W, B], one sum of K + r steps in the same registers: no extra pass over the output
// and no extra micro-tile call per tile. B's rows are not prefetched (linear_tile.inc). Before
// (a separate r-step B call per tile, its rows prefetched as the base weight's) SmolLM2's LoRA
// r = 16 layers ran at 0.85-0.87x the plain ones' speed for 4.6% more FLOPs; now 0.91-0.92x
// (benchmarks/RESULTS.md, "LoRA's B in the base weight's registers").
#include "linear_cpu.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "cpu_common.h"
#include "parallel.h"
#include "vec_f32.h"

namespace grpo_fast {
namespace {

constexpr int kRows = 3;       // weight rows per micro-tile
constexpr int kCols = 32;      // x rows per micro-tile (4 ymm)
constexpr int kKBlock = 128;   // k steps summed in registers before joining the partial sums
// Weight rows per micro-tile on zmm (a multiple of kRows): 12 accumulators at 32 x rows. 6 ran at
// or above 9 and 12 (24 accumulators) on every SmolLM2 shape at 32 and 64 rows, alternating in
// one process (weights from memory, medians of 7: e.g. 240 / 225 / 212 GFLOPS for [1,536, 576]).
constexpr int kWideRows = 6;
constexpr int kMaxRuns = 4;  // k runs a micro-tile sums in one go: the base weight and 3 adapters

// A micro-tile's k steps come in runs: run j pairs rows w[r * ldw + i] (r < NR) of one weight
// with the x^T rows xt[(k0 + i) * kCols], i < len. The base weight is one run over [0, K); each
// LoRA adapter's B one more, over its rows of the packed input (see Packed).
struct KRun {
  const float* w;
  int64_t ldw, k0, len;
};

#ifdef GF_X86_DISPATCH
// One cache line of each row of the *next* block of weight rows (the thread's next tile as a
// rule: rows are consecutive in memory), issued every 16 k steps. The hardware prefetcher alone
// kept 3 interleaved row streams fed at ~70% of the FMA rate on this AMD EPYC (a weight read
// once per call comes from memory); a block ahead it runs at 80-90%. (Address arithmetic in
// integers: past the last block it points outside the weight, which a prefetch may do but a
// pointer may not.)
template <int NR>
GF_INLINE void prefetch_next_rows(const float* w, int64_t ldw, int64_t i) {
  for (int r = 0; r < NR; ++r)
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(w) + ((NR + r) * ldw + i) * sizeof(float)),
                 _MM_HINT_T0);
}

// The k steps [i0, i1) of a run after `in_block` steps of the current register block: the end
// of the next group of 16 steps, cut at the run's end and at the block's (kKBlock steps).
GF_INLINE int64_t group_end(int64_t i0, int64_t len, int64_t in_block) {
  return std::min({len, i0 + 16, i0 + kKBlock - in_block});
}

// The micro-tile, one body built for each ISA (linear_tile.inc). Registers: on ymm 3 rows x 4
// vectors = 12 accumulators of 16, x read by each FMA; on zmm up to 6 rows x 2 vectors = 12 of
// 32, the x vectors in registers.
struct LinearYmm : Ymm {
  static constexpr bool kXInRegisters = false;
};
struct LinearZmm : Zmm {
  static constexpr bool kXInRegisters = true;
};

namespace ymm {
using V = LinearYmm;
#define GF_VEC GF_AVX2
#include "linear_tile.inc"
#undef GF_VEC
}  // namespace ymm

namespace zmm {
using V = LinearZmm;
#define GF_VEC GF_AVX512
#include "linear_tile.inc"
#undef GF_VEC
}  // namespace zmm

template <int NR>
GF_AVX2 void micro_tile_cols(int mv, float* tile, const float* xt, const KRun* runs, int nruns, bool add) {
  switch (mv) {
    case 4: return ymm::micro_tile<4, NR>(tile, xt, runs, nruns, add);
    case 3: return ymm::micro_tile<3, NR>(tile, xt, runs, nruns, add);
    case 2: return ymm::micro_tile<2, NR>(tile, xt, runs, nruns, add);
    default: return ymm::micro_tile<1, NR>(tile, xt, runs, nruns, add);
  }
}

// tile [nr][32] (+ if add) for the runs' weight rows [0, nr) against the x^T tile xt [k][32]
// (mv ymm of it valid).
GF_AVX2 void weight_tile(int nr, int mv, float* tile, const float* xt, const KRun* runs, int nruns, bool add) {
  if (nr == 3) return micro_tile_cols<3>(mv, tile, xt, runs, nruns, add);
  if (nr == 2) return micro_tile_cols<2>(mv, tile, xt, runs, nruns, add);
  return micro_tile_cols<1>(mv, tile, xt, runs, nruns, add);
}

template <int NR>
GF_AVX512 void micro_tile_512_cols(int mv, float* tile, const float* xt, const KRun* runs, int nruns, bool add) {
  if (mv > 1) return zmm::micro_tile<2, NR>(tile, xt, runs, nruns, add);
  zmm::micro_tile<1, NR>(tile, xt, runs, nruns, add);
}

// weight_tile for up to 6 weight rows on zmm (mv: valid zmm of the x^T tile, 1 or 2).
GF_AVX512 void weight_tile_512(int nr, int mv, float* tile, const float* xt, const KRun* runs, int nruns,
                               bool add) {
  static_assert(kWideRows == 6, "weight_tile_512 has a case for each row count up to kWideRows");
  switch (nr) {
    case 6: return micro_tile_512_cols<6>(mv, tile, xt, runs, nruns, add);
    case 5: return micro_tile_512_cols<5>(mv, tile, xt, runs, nruns, add);
    case 4: return micro_tile_512_cols<4>(mv, tile, xt, runs, nruns, add);
    case 3: return micro_tile_512_cols<3>(mv, tile, xt, runs, nruns, add);
    case 2: return micro_tile_512_cols<2>(mv, tile, xt, runs, nruns, add);
    default: return micro_tile_512_cols<1>(mv, tile, xt, runs, nruns, add);
  }
}

// tile [nr][32] (+ if add) for weight rows [0, nr <= kWideRows) of the runs: on zmm where
// AVX-512 runs, else as 3-row ymm tiles (mv: valid ymm of the x^T tile).
GF_AVX2 void wide_tile(int nr, int mv, float* tile, const float* xt, const KRun* runs, int nruns, bool add) {
  if (use_avx512()) return weight_tile_512(nr, (mv + 1) / 2, tile, xt, runs, nruns, add);
  KRun rows[kMaxRuns];  // the runs from weight row r0 on
  for (int r0 = 0; r0 < nr; r0 += kRows) {
    for (int j = 0; j < nruns; ++j) rows[j] = {runs[j].w + r0 * runs[j].ldw, runs[j].ldw, runs[j].k0, runs[j].len};
    weight_tile(std::min(kRows, nr - r0), mv, tile + r0 * kCols, xt, rows, nruns, add);
  }
}

// tile [nr][32] (+ if add) = weight rows w[0:nr] (ldw apart) against x^T rows [0, K) of xt.
GF_AVX2 void wide_tile(int nr, int mv, float* tile, const float* xt, const float* w, int64_t ldw, int64_t K,
                       bool add) {
  const KRun run{w, ldw, 0, K};
  wide_tile(nr, mv, tile, xt, &run, 1, add);
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

void check(const Problem& p, int64_t N, int64_t ldo) {
  if (p.M < 0 || N < 0 || p.K < 1)
    throw std::invalid_argument("cpu_linear: need M >= 0, N >= 0, K >= 1");
  if (p.ldx < p.K || ldo < N)
    throw std::invalid_argument("cpu_linear: row strides must be >= the row lengths");
  if (!use_avx2()) throw std::invalid_argument("cpu_linear: this CPU has no AVX2+FMA");
}

// One weight of a (possibly multi-weight) linear call: out [M, n] (rows ldo apart) from w [n, K],
// plus its LoRA adapters.
struct Segment {
  const float* w;
  const float* bias;
  float* out;
  int64_t n, ldo;
  std::vector<LoraTerm> lora;
};

// Weight rows per block of the main pass: one micro-tile's (kWideRows on zmm, else kRows). Runs
// and chunks are whole blocks, so a chunk's boundary never leaves a micro-tile half full (with
// 3-row blocks on zmm a third of the tiles were 3-row ones: 14% of a decode step in perf).
int block_rows() { return use_avx512() ? kWideRows : kRows; }

// About 30 µs of one thread's work per chunk (see parallel.h): ~1 MFLOP.
int64_t blocks_per_chunk(const Problem& p) {
  const int64_t flops = 2 * block_rows() * p.K * p.m_tiles() * kCols;
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, flops));
}

// x packed as x^T tiles [tiles][kx][32] (rows past M zero), and below each tile's K rows, the
// LoRA rows: for adapter l of a segment, rows [K + off_l, K + off_l + r_l) hold
// (scale_l * x A_l^T)^T. So B_l is one more micro-tile pass over those rows, added to the base
// tile before any epilogue (bias, SiLU, accumulation).
struct Packed {
  const Problem& p;
  int64_t kx;
  std::vector<std::vector<int64_t>> offsets;  // [segment][adapter] -> row offset below K
  float* xt;
  const float* tile(int64_t t) const { return xt + t * kx * kCols; }
};

#ifdef GF_X86_DISPATCH
// pack_tile_rows's whole 8 x 8 blocks: columns [k0, k) for the returned k (the rest is left to
// the element-wise loop). Rows past M are zero vectors.
GF_AVX2 int64_t pack_blocks_8x8(float* dst, const Problem& p, int64_t t, int64_t k0, int64_t k1) {
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8)
    for (int c0 = 0; c0 < kCols; c0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t m = t * kCols + c0 + i;
        r[i] = m < p.M ? _mm256_loadu_ps(p.x + m * p.ldx + k) : _mm256_setzero_ps();
      }
      transpose8x8(r);  // r[j] = x[t * 32 + c0 : +8, k + j]
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k + j) * kCols + c0, r[j]);
    }
  return k;
}
#endif

// Thread-local scratch that only grows: a decode step would otherwise allocate (and, past the
// mmap threshold, page-fault in) a fresh buffer in every call.
float* scratch(size_t floats) {
  thread_local std::vector<float> buf;
  if (buf.size() < floats) buf.resize(floats);
  return buf.data();
}

#ifdef GF_X86_DISPATCH
// Everything the blocks of the main pass need from the packed input: rows [0, K) for the base
// weight, then each adapter's B over its LoRA rows, one sum in the same registers (kMaxRuns - 1
// adapters a micro-tile; more, rare, add into the tile in further passes). nr <= kWideRows.
GF_AVX2 void segment_tile(int nr, int mv, float* tile, const Packed& pk, int64_t t,
                          const Segment& sg, size_t si, int64_t n0) {
  const int64_t K = pk.p.K;
  KRun runs[kMaxRuns];
  runs[0] = {sg.w + n0 * K, K, 0, K};
  int nruns = 1;
  bool add = false;
  for (size_t l = 0; l < sg.lora.size(); ++l) {
    const LoraTerm& lt = sg.lora[l];
    runs[nruns++] = {lt.b + n0 * lt.r, lt.r, K + pk.offsets[si][l], lt.r};
    if (nruns == kMaxRuns) {
      wide_tile(nr, mv, tile, pk.tile(t), runs, nruns, add);
      nruns = 0;
      add = true;
    }
  }
  if (nruns > 0) wide_tile(nr, mv, tile, pk.tile(t), runs, nruns, add);
}
#endif

// Rows [k0, k1) of x^T tile t: dst[k][c] = x[t * 32 + c, k], zero past row M. 8 x 8 blocks
// through registers where they are whole (the element-wise loop took ~10 µs of a 32 x 576
// pack, 3-10% of a decode step's linear call: benchmarks/RESULTS.md, "LoRA's B in the base
// weight's registers").
void pack_tile_rows(float* dst, const Problem& p, int64_t t, int64_t k0, int64_t k1) {
  int64_t k = k0;
#ifdef GF_X86_DISPATCH
  if (use_avx2()) k = pack_blocks_8x8(dst, p, t, k0, k1);
#endif
  for (; k < k1; ++k)
    for (int c = 0; c < kCols; ++c) {
      const int64_t m = t * kCols + c;
      dst[k * kCols + c] = m < p.M ? p.x[m * p.ldx + k] : 0.f;
    }
}

// Packs x and computes the LoRA rows; returns the packed input (valid until the next call on
// this thread).
Packed pack(const Problem& p, const std::vector<Segment*>& segs) {
  std::vector<std::vector<int64_t>> offsets;
  int64_t rank = 0;
  struct ABlock { const LoraTerm* lt; int64_t row, j0; };  // `step` rows of A, written at `row`
  std::vector<ABlock> ablocks;
  const int64_t step = block_rows();  // A rows a tile, as the main pass's blocks
  for (const Segment* sg : segs) {
    offsets.emplace_back();
    for (const LoraTerm& lt : sg->lora) {
      offsets.back().push_back(rank);
      for (int64_t j = 0; j < lt.r; j += step) ablocks.push_back({&lt, p.K + rank + j, j});
      rank += lt.r;
    }
  }
  const int64_t tiles = p.m_tiles(), kx = p.K + rank;
  Packed pk{p, kx, std::move(offsets), scratch(tiles * kx * kCols)};
  // x^T: chunks of k (each writes its rows of every tile)
  const int threads = parallel_threads();
  // (chunks of whole 8-column groups, so only the last one has a column tail)
  const int64_t groups = (p.K + 7) / 8;
  const int64_t kchunks = p.K * tiles * kCols < (1 << 15) ? 1 : chunk_count(groups, threads, 8);
  parallel_for(kchunks, [&](int64_t c) {
    const auto [g0, g1] = chunk_range(c, kchunks, groups);
    for (int64_t t = 0; t < tiles; ++t)
      pack_tile_rows(pk.xt + t * kx * kCols, p, t, 8 * g0, std::min(p.K, 8 * g1));
  });
#ifdef GF_X86_DISPATCH
  // LoRA rows: tile rows of scale * A x^T, straight into the packed layout. An item (a block of
  // A's rows against one x tile, ~1 µs at K = 576) is a chunk: on one thread the A rows of q, k
  // and v took ~10 µs of a ~100 µs call while the other thread waited (over all threads the
  // LoRA calls ran 1.01-1.03x faster, alternating in one process).
  const int64_t items = static_cast<int64_t>(ablocks.size()) * tiles;
  const int64_t achunks = chunk_count(items, threads, 1);
  parallel_for(achunks, [&](int64_t c) {
    const auto [b0, b1] = chunk_range(c, achunks, items);
    for (int64_t it = b0; it < b1; ++it) {
      const ABlock& ab = ablocks[it / tiles];
      const int64_t t = it % tiles;
      const int nr = static_cast<int>(std::min<int64_t>(step, ab.lt->r - ab.j0));
      alignas(64) float tile[kWideRows * kCols];
      wide_tile(nr, kCols / 8, tile, pk.tile(t), ab.lt->a + ab.j0 * p.K, p.K, p.K, false);
      float* dst = pk.xt + (t * kx + ab.row) * kCols;
      for (int r = 0; r < nr * kCols; ++r) dst[r] = ab.lt->scale * tile[r];
    }
  });
#endif
  return pk;
}

// The main pass's weight blocks (block_rows() rows) over all segments, cut into chunks over the
// threads, and each chunk into runs of at most kRunRows consecutive rows of one segment;
// fn(segment index, first weight row n0, rows nn of the run, x tile t, first x row m0, x rows mr).
// Why runs: a block's tile is 3 outputs in each of 32 rows, so writing it out touches 32 cache
// lines; between two blocks the x tile (~70 KiB at K = 576) streams through L1 and evicts them.
// The run's tiles are kept together and written out once, kRunRows consecutive outputs per row.
// Measured on the LM head (N = 49,152: a 6 MiB output), skipping the writes altogether ran
// 1.2-1.45x faster than writing a block at a time (benchmarks/RESULTS.md).
constexpr int kRunRows = 24;  // a multiple of kRows and of kWideRows

template <typename RunFn>
void for_each_run(const Problem& p, const std::vector<Segment*>& segs, RunFn fn) {
  const int64_t br = block_rows();
  std::vector<int64_t> first{0};  // first global block of each segment
  for (const Segment* sg : segs) first.push_back(first.back() + (sg->n + br - 1) / br);
  const int64_t blocks = first.back(), tiles = p.m_tiles();
  const int64_t chunks = chunk_count(blocks, parallel_threads(), blocks_per_chunk(p));
  parallel_for(chunks, [&](int64_t c) {
    const auto [b0, b1] = chunk_range(c, chunks, blocks);
    size_t si = 0;
    for (int64_t gb = b0; gb < b1;) {
      while (gb >= first[si + 1]) ++si;
      const Segment& sg = *segs[si];
      const int64_t run = std::min({b1 - gb, first[si + 1] - gb, kRunRows / br});
      const int64_t n0 = (gb - first[si]) * br;
      const int64_t nn = std::min<int64_t>(run * br, sg.n - n0);
      for (int64_t t = 0; t < tiles; ++t)
        fn(si, n0, nn, t, t * kCols, static_cast<int>(std::min<int64_t>(kCols, p.M - t * kCols)));
      gb += run;
    }
  });
}

#ifdef GF_X86_DISPATCH
// The tiles of a run for weight rows [n0, n0 + nn) of segment sg and x tile t: block b's rows
// follow block b - 1's, so the buffer is [nn][32], row j holding output n0 + j of the 32 x rows.
GF_AVX2 void run_tiles(float* tiles, int64_t nn, int mr, const Packed& pk, int64_t t,
                       const Segment& sg, size_t si, int64_t n0) {
  const int64_t step = block_rows();  // one micro-tile per block (6 rows on zmm: see wide_tile)
  for (int64_t j = 0; j < nn; j += step)
    segment_tile(static_cast<int>(std::min<int64_t>(step, nn - j)), (mr + 7) / 8, tiles + j * kCols, pk, t,
                 sg, si, n0 + j);
}
#endif

// out_i (+)= alpha * (x @ w_i^T + LoRA_i(x)) + bias_i for every segment.
void run_linear(const Problem& p, std::vector<Segment>& segs, float alpha, bool accumulate) {
#ifdef GF_X86_DISPATCH
  std::vector<Segment*> ptrs;
  for (Segment& sg : segs) ptrs.push_back(&sg);
  const Packed pk = pack(p, ptrs);
  for_each_run(p, ptrs, [&](size_t si, int64_t n0, int64_t nn, int64_t t, int64_t m0, int mr) {
    const Segment& sg = segs[si];
    alignas(64) float tiles[kRunRows * kCols];
    run_tiles(tiles, nn, mr, pk, t, sg, si, n0);
    for (int m = 0; m < mr; ++m) {
      float* dst = sg.out + (m0 + m) * sg.ldo + n0;
      for (int64_t j = 0; j < nn; ++j) {
        const float v = alpha * tiles[j * kCols + m] + (sg.bias ? sg.bias[n0 + j] : 0.f);
        dst[j] = accumulate ? dst[j] + v : v;
      }
    }
  });
#endif
}

// out = silu(x Wg^T + LoRA_g(x)) * (x Wu^T + LoRA_u(x)); gate and up have the same shape.
void run_silu_mul(const Problem& p, Segment gate, Segment up) {
#ifdef GF_X86_DISPATCH
  std::vector<Segment*> ptrs{&gate, &up};
  const Packed pk = pack(p, ptrs);
  std::vector<Segment*> rows{&gate};  // the runs go over gate's rows, up's alongside
  for_each_run(p, rows, [&](size_t, int64_t n0, int64_t nn, int64_t t, int64_t m0, int mr) {
    alignas(64) float g[kRunRows * kCols], u[kRunRows * kCols];
    run_tiles(g, nn, mr, pk, t, gate, 0, n0);
    run_tiles(u, nn, mr, pk, t, up, 1, n0);
    silu_mul_tile(g, u, static_cast<int>(nn) * kCols);
    for (int m = 0; m < mr; ++m) {
      float* dst = gate.out + (m0 + m) * gate.ldo + n0;
      for (int64_t j = 0; j < nn; ++j) dst[j] = g[j * kCols + m];
    }
  });
#endif
}

}  // namespace

bool cpu_linear_available() { return use_avx2(); }

bool cpu_linear_avx512() { return use_avx512(); }

void cpu_linear(uintptr_t out, uintptr_t x, uintptr_t weight, uintptr_t bias, int64_t M,
                int64_t N, int64_t K, int64_t ldx, int64_t ldo, float alpha, bool accumulate,
                const std::vector<LoraTerm>& lora) {
  const Problem p{reinterpret_cast<const float*>(x), M, K, ldx};
  check(p, N, ldo);
  std::vector<Segment> segs{{reinterpret_cast<const float*>(weight),
                             reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out),
                             N, ldo, lora}};
  run_linear(p, segs, alpha, accumulate);
}

void cpu_linear_many(const std::vector<uintptr_t>& outs, uintptr_t x,
                     const std::vector<uintptr_t>& weights, const std::vector<uintptr_t>& biases,
                     const std::vector<int64_t>& ns, const std::vector<int64_t>& ldos, int64_t M,
                     int64_t K, int64_t ldx, const std::vector<std::vector<LoraTerm>>& lora) {
  const size_t count = weights.size();
  if (outs.size() != count || biases.size() != count || ns.size() != count || ldos.size() != count)
    throw std::invalid_argument("cpu_linear_many: outs, weights, biases, ns, ldos differ in length");
  if (!lora.empty() && lora.size() != count)
    throw std::invalid_argument("cpu_linear_many: one LoRA list per weight (or none at all)");
  const Problem p{reinterpret_cast<const float*>(x), M, K, ldx};
  std::vector<Segment> segs;
  for (size_t i = 0; i < count; ++i) {
    check(p, ns[i], ldos[i]);
    segs.push_back({reinterpret_cast<const float*>(weights[i]),
                    reinterpret_cast<const float*>(biases[i]), reinterpret_cast<float*>(outs[i]),
                    ns[i], ldos[i], lora.empty() ? std::vector<LoraTerm>{} : lora[i]});
  }
  run_linear(p, segs, 1.f, false);
}

void cpu_silu_mul_linear(uintptr_t out, uintptr_t x, uintptr_t w_gate, uintptr_t w_up, int64_t M,
                         int64_t N, int64_t K, int64_t ldx, int64_t ldo,
                         const std::vector<LoraTerm>& lora_gate,
                         const std::vector<LoraTerm>& lora_up) {
  const Problem p{reinterpret_cast<const float*>(x), M, K, ldx};
  check(p, N, ldo);
  auto* o = reinterpret_cast<float*>(out);
  run_silu_mul(p, {reinterpret_cast<const float*>(w_gate), nullptr, o, N, ldo, lora_gate},
               {reinterpret_cast<const float*>(w_up), nullptr, nullptr, N, ldo, lora_up});
}

}  // namespace grpo_fast
