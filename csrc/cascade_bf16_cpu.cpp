// The cascade's shared-prefix item for a bf16 KV cache with AVX512-BF16 (see the header for the
// math). Why a kernel of its own: kv_cpu.cpp's AVX2 item converts every bf16 key and value to
// fp32 (a transposed K copy and a V copy per 32 keys) and then multiplies in fp32, 8 lanes per
// FMA. vdpbf16ps multiplies bf16 pairs straight from the cache, 16 products per instruction.
//
// Layout: the group's nq = G * rep queries are the vector lanes (8 per ymm, padded with zero
// queries to ld = 8 * ceil(nq / 8)), so
// - Q is packed once per item as pairs of dims: qt[dp][q] = (q[2dp], q[2dp + 1]);
// - a score tile is 8 keys x 24 queries: each key's dim pair is broadcast from the cache row
//   itself (no K copy) against 3 query vectors;
// - the online softmax is elementwise across keys (one running max per lane: no horizontal op);
// - P.V keeps the output transposed, acc[d][q], and pairs keys: pp[tp][q] = the weights of keys
//   (2tp, 2tp + 1) in bf16, vp[tp][d] = (v_2tp[d], v_2tp+1[d]) (the one copy: two rows
//   interleaved per pair of keys, shared by all nq queries).
#include "cascade_bf16_cpu.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "cpu_common.h"

namespace grpo_fast {

#ifdef GF_X86_DISPATCH
bool use_avx512_bf16() {
  static const bool yes = use_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16") && !env_is_one("GRPO_FAST_NO_AVX512_BF16");
  return yes;
}

namespace {

constexpr int kKeys = 64;  // prefix keys per online-softmax step (even: P.V takes keys in pairs)

// Per-thread buffers (grown on demand, never shrunk).
struct Scratch {
  std::vector<uint32_t> qt, pp, vp;
  std::vector<float> s, acc, m, l, corr;
  void reserve(int ld, int D) {
    auto grow = [](auto& b, size_t n) { if (b.size() < n) b.resize(n); };
    grow(qt, static_cast<size_t>(D / 2) * ld);
    grow(pp, static_cast<size_t>(kKeys / 2) * ld);
    grow(vp, static_cast<size_t>(kKeys / 2) * D);
    grow(s, static_cast<size_t>(kKeys) * ld);
    grow(acc, static_cast<size_t>(D) * ld);
    grow(m, ld);
    grow(l, ld);
    grow(corr, ld);
  }
};

GF_BF16DP GF_INLINE __m256bh as_bh(__m256i v) { return (__m256bh)v; }
GF_BF16DP GF_INLINE __m256bh broadcast_pair(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return as_bh(_mm256_set1_epi32(static_cast<int>(w)));
}
GF_BF16DP GF_INLINE __m256bh load_pairs(const uint32_t* p) {
  return as_bh(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// s[t][8v:8v+8] = scale * sum_dp qt[dp][8v:8v+8] . k_t[2dp:2dp+2] for t < 8, v < QV (rows of s
// and qt ld apart). 8 * QV accumulators + QV query vectors + 1 broadcast: 28 of 32 ymm at QV = 3.
template <int QV>
GF_BF16DP inline void score_tile(float* s, int ld, const uint32_t* qt, const uint16_t* const* k,
                                 int D2, __m256 scale) {
  __m256 acc[8][QV];
  for (int t = 0; t < 8; ++t)
    for (int v = 0; v < QV; ++v) acc[t][v] = _mm256_setzero_ps();
  for (int dp = 0; dp < D2; ++dp) {
    __m256bh qv[QV];
    for (int v = 0; v < QV; ++v) qv[v] = load_pairs(qt + dp * ld + 8 * v);
    for (int t = 0; t < 8; ++t) {
      const __m256bh kb = broadcast_pair(k[t] + 2 * dp);
      for (int v = 0; v < QV; ++v) acc[t][v] = _mm256_dpbf16_ps(acc[t][v], qv[v], kb);
    }
  }
  for (int t = 0; t < 8; ++t)
    for (int v = 0; v < QV; ++v) _mm256_storeu_ps(s + t * ld + 8 * v, _mm256_mul_ps(acc[t][v], scale));
}

// acc[d][8v:8v+8] = acc[d][8v:8v+8] * corr[8v:8v+8] + sum_tp pp[tp][8v:8v+8] . vp[tp][d] for
// d < 8, v < QV (rows of acc and pp ld apart, of vp D apart).
template <int QV>
GF_BF16DP inline void pv_tile(float* acc, int ld, const float* corr, const uint32_t* pp,
                              const uint32_t* vp, int D, int npairs) {
  __m256 a[8][QV];
  for (int v = 0; v < QV; ++v) {
    const __m256 c = _mm256_loadu_ps(corr + 8 * v);
    for (int d = 0; d < 8; ++d) a[d][v] = _mm256_mul_ps(_mm256_loadu_ps(acc + d * ld + 8 * v), c);
  }
  for (int tp = 0; tp < npairs; ++tp) {
    __m256bh pv[QV];
    for (int v = 0; v < QV; ++v) pv[v] = load_pairs(pp + tp * ld + 8 * v);
    for (int d = 0; d < 8; ++d) {
      const __m256bh vb = as_bh(_mm256_set1_epi32(static_cast<int>(vp[tp * D + d])));
      for (int v = 0; v < QV; ++v) a[d][v] = _mm256_dpbf16_ps(a[d][v], pv[v], vb);
    }
  }
  for (int d = 0; d < 8; ++d)
    for (int v = 0; v < QV; ++v) _mm256_storeu_ps(acc + d * ld + 8 * v, a[d][v]);
}

// A row of tiles over all query vectors: 3 at a time, then the 1 or 2 left.
GF_BF16DP inline void score_row(float* s, int ld, int nqv, const uint32_t* qt, const uint16_t* const* k,
                                int D2, __m256 scale) {
  int v0 = 0;
  for (; v0 + 3 <= nqv; v0 += 3) score_tile<3>(s + 8 * v0, ld, qt + 8 * v0, k, D2, scale);
  if (nqv - v0 == 2) score_tile<2>(s + 8 * v0, ld, qt + 8 * v0, k, D2, scale);
  if (nqv - v0 == 1) score_tile<1>(s + 8 * v0, ld, qt + 8 * v0, k, D2, scale);
}

GF_BF16DP inline void pv_row(float* acc, int ld, int nqv, const float* corr, const uint32_t* pp,
                             const uint32_t* vp, int D, int npairs) {
  int v0 = 0;
  for (; v0 + 3 <= nqv; v0 += 3) pv_tile<3>(acc + 8 * v0, ld, corr + 8 * v0, pp + 8 * v0, vp, D, npairs);
  if (nqv - v0 == 2) pv_tile<2>(acc + 8 * v0, ld, corr + 8 * v0, pp + 8 * v0, vp, D, npairs);
  if (nqv - v0 == 1) pv_tile<1>(acc + 8 * v0, ld, corr + 8 * v0, pp + 8 * v0, vp, D, npairs);
}

// vp[tp][d] = (v_2tp[d], v_2tp+1[d]) for 2tp < cn; a last odd key pairs with zeros.
GF_BF16DP inline void pack_value_pairs(uint32_t* vp, const uint16_t* const* v, int cn, int D) {
  for (int tp = 0; 2 * tp < cn; ++tp) {
    const uint16_t* r0 = v[2 * tp];
    const uint16_t* r1 = 2 * tp + 1 < cn ? v[2 * tp + 1] : nullptr;
    for (int d = 0; d < D; d += 16) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + d));
      const __m256i b = r1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + d))
                           : _mm256_setzero_si256();
      const __m256i lo = _mm256_unpacklo_epi16(a, b);  // dims 0-3 | 8-11, interleaved
      const __m256i hi = _mm256_unpackhi_epi16(a, b);  // dims 4-7 | 12-15
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(vp + tp * D + d), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(vp + tp * D + d + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
}

// e^x for x <= 0 (-inf gives 0): x log2(e) = i + f with |f| <= 1/2, 2^f by its degree-5 Taylor
// polynomial (relative error < 3e-6: the weights are rounded to bf16 next, 2^-9), 2^i applied by
// vscalefps. 10 operations where cpu_common.h's exp_nonpos8 (bit-equal to the scalar exp of the
// fp32 kernels) takes 22: the softmax was a quarter of this item with it.
GF_BF16DP GF_INLINE __m256 exp_weights(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-150.f)), _mm256_set1_ps(1.44269504088896341f));
  const __m256 i = _mm256_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, i);
  __m256 p = _mm256_set1_ps(1.3333558146e-3f);  // ln(2)^k / k!, k = 5 .. 0
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108665e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650696e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718056e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  return _mm256_scalef_ps(p, i);
}

// 8 lanes of (bf16(even[q]), bf16(odd[q])) pairs, the even key's weight in the low half.
GF_BF16DP GF_INLINE __m256i pair_weights(__m256 even, __m256 odd) {
  const __m256i both = (__m256i)_mm256_cvtne2ps_pbh(odd, even);  // [even 0..7 | odd 0..7]
  const __m256i order = _mm256_setr_epi16(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  return _mm256_permutexvar_epi16(order, both);
}

// The online-softmax step over scores s[0:cn] (rows ld apart, every lane a query): m, l and
// corr updated per lane, the weights of key pairs straight into pp.
GF_BF16DP inline void softmax_step(Scratch& sc, int ld, int cn) {
  const float* s = sc.s.data();
  for (int v = 0; v < ld / 8; ++v) {
    const float* sv = s + 8 * v;
    __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int t = 0; t < cn; ++t) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sv + t * ld));
    const __m256 mo = _mm256_loadu_ps(sc.m.data() + 8 * v);
    const __m256 mn = _mm256_max_ps(mo, mx);
    const __m256 corr = exp_weights(_mm256_sub_ps(mo, mn));  // 0 on the first step (m = -inf)
    __m256 sum = _mm256_setzero_ps();
    for (int tp = 0; 2 * tp < cn; ++tp) {
      const __m256 even = exp_weights(_mm256_sub_ps(_mm256_loadu_ps(sv + 2 * tp * ld), mn));
      const __m256 odd = 2 * tp + 1 < cn ? exp_weights(_mm256_sub_ps(_mm256_loadu_ps(sv + (2 * tp + 1) * ld), mn))
                                         : _mm256_setzero_ps();
      sum = _mm256_add_ps(sum, _mm256_add_ps(even, odd));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc.pp.data() + tp * ld + 8 * v), pair_weights(even, odd));
    }
    _mm256_storeu_ps(sc.l.data() + 8 * v, _mm256_fmadd_ps(_mm256_loadu_ps(sc.l.data() + 8 * v), corr, sum));
    _mm256_storeu_ps(sc.m.data() + 8 * v, mn);
    _mm256_storeu_ps(sc.corr.data() + 8 * v, corr);
  }
}

GF_BF16DP void prefix_item(const GroupPrefix& p, int h, int64_t k0, int64_t k1, float* part,
                           int64_t part_stride) {
  const int D = p.D, D2 = D / 2, rep = p.hq / p.hkv;
  const int64_t nq = p.G * rep;
  const int nqv = static_cast<int>((nq + 7) / 8), ld = 8 * nqv;
  thread_local Scratch sc;
  sc.reserve(ld, D);
  uint32_t* qt = sc.qt.data();
  for (int q = 0; q < ld; ++q) {
    const uint16_t* qr = q < nq ? static_cast<const uint16_t*>(p.q) + (static_cast<int64_t>(p.rows[q / rep]) * p.hq + h * rep + q % rep) * D
                                : nullptr;
    for (int dp = 0; dp < D2; ++dp) {
      uint32_t w = 0;
      if (qr != nullptr) std::memcpy(&w, qr + 2 * dp, 4);
      qt[dp * ld + q] = w;
    }
  }
  float* acc = sc.acc.data();
  std::fill(acc, acc + static_cast<int64_t>(D) * ld, 0.f);
  std::fill(sc.m.data(), sc.m.data() + ld, -std::numeric_limits<float>::infinity());
  std::fill(sc.l.data(), sc.l.data() + ld, 0.f);
  const __m256 scale = _mm256_set1_ps(p.scale);
  // rows of this step's keys (krow[cn..cn8) repeat the last: scored, never weighed) and of the
  // next step's, which start coming from memory while this one computes
  const uint16_t* rows[2][2][kKeys];  // [this / next][K / V][key]
  int cur = 0;
  const auto* kc = static_cast<const uint16_t*>(p.kc);
  const auto* vc = static_cast<const uint16_t*>(p.vc);
  cache_rows(p, kc, vc, h, k0, static_cast<int>(std::min<int64_t>(kKeys, k1 - k0)), rows[0][0], rows[0][1]);
  for (int64_t j0 = k0; j0 < k1; j0 += kKeys, cur ^= 1) {
    const int cn = static_cast<int>(std::min<int64_t>(kKeys, k1 - j0));
    const int cn8 = (cn + 7) / 8 * 8;
    const uint16_t** krow = rows[cur][0];
    const uint16_t** vrow = rows[cur][1];
    for (int t = cn; t < cn8; ++t) krow[t] = krow[cn - 1];
    const int next = static_cast<int>(std::min<int64_t>(kKeys, k1 - j0 - cn));
    if (next > 0) {
      cache_rows(p, kc, vc, h, j0 + cn, next, rows[cur ^ 1][0], rows[cur ^ 1][1]);
      for (int t = 0; t < next; ++t)
        for (int byte = 0; byte < D * 2; byte += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(rows[cur ^ 1][0][t]) + byte, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(rows[cur ^ 1][1][t]) + byte, _MM_HINT_T0);
        }
    }
    float* s = sc.s.data();
    for (int t0 = 0; t0 < cn8; t0 += 8) score_row(s + t0 * ld, ld, nqv, qt, krow + t0, D2, scale);
    softmax_step(sc, ld, cn);
    pack_value_pairs(sc.vp.data(), vrow, cn, D);
    const int npairs = (cn + 1) / 2;
    for (int d0 = 0; d0 < D; d0 += 8)
      pv_row(acc + d0 * ld, ld, nqv, sc.corr.data(), sc.pp.data(), sc.vp.data() + d0, D, npairs);
  }
  // the states out: a query's acc is a column of acc [D][ld], so 8 x 8 blocks go through registers
  for (int64_t q0 = 0; q0 < nq; q0 += 8) {
    const int nb = static_cast<int>(std::min<int64_t>(8, nq - q0));
    float* dst[8];
    for (int j = 0; j < nb; ++j) {
      const int64_t q = q0 + j;
      dst[j] = part + (q / rep) * part_stride + static_cast<int64_t>(h * rep + q % rep) * (D + 2);
      dst[j][D] = sc.m[q];
      dst[j][D + 1] = sc.l[q];
    }
    for (int d0 = 0; d0 < D; d0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(acc + (d0 + i) * ld + q0);
      transpose8x8(r);
      for (int j = 0; j < nb; ++j) _mm256_storeu_ps(dst[j] + d0, r[j]);
    }
  }
}

}  // namespace

void cascade_prefix_bf16(const GroupPrefix& p, int h, int64_t k0, int64_t k1, float* part,
                         int64_t part_stride) {
  if (p.D % 16 != 0) throw std::invalid_argument("cascade_prefix_bf16: head_dim must be a multiple of 16");
  prefix_item(p, h, k0, k1, part, part_stride);
}

#else  // not x86-64 GCC / Clang: the AVX2 / baseline items run

bool use_avx512_bf16() { return false; }

void cascade_prefix_bf16(const GroupPrefix&, int, int64_t, int64_t, float*, int64_t) {
  throw std::invalid_argument("cascade_prefix_bf16: built without x86 dispatch");
}

#endif

}  // namespace grpo_fast
