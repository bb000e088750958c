// CPU sampler: temperature, top-k, top-p, min-p, greedy; counter-based RNG per (seed, step).
//
// Every filter keeps the tokens whose probability reaches a threshold, so the survivors are
// {i : p_i >= thr} with thr = max(thr_topk, thr_topp, thr_minp):
//   thr_topk = k-th largest p;   thr_minp = min_p * max p;
//   thr_topp = p_(m) over the top-k survivors sorted descending, m the first rank whose
//              cumulative mass reaches top_p * (their total mass).
// The draw walks the survivors in vocabulary order until the running mass exceeds u * total, so
// it does not depend on how a sort breaks ties. Probabilities are float64 here (as in the
// reference, grpo_fast/sampler/sampling_reference.py; their exps fp32, see exp_fill), the
// logprob is fp32 of log softmax(logits / T)[token] over the full vocabulary.
#include "sampling_cpu.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "common.h"
#include "cpu_common.h"
#include "parallel.h"

namespace grpo_fast {
namespace {

// Baseline and AVX2 bodies of exp_fill and max_scaled (below).
double exp_fill_base(double* p, const float* x, int64_t V, float inv_t, float mx) {
  double sum = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    const float z = x[i] * inv_t - mx;
    p[i] = z < -87.f ? 0.0 : static_cast<double>(exp_nonpos(z));
    sum += p[i];
  }
  return sum;
}
float max_scaled_base(const float* x, int64_t V, float inv_t) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < V; ++i) mx = std::max(mx, x[i] * inv_t);
  return mx;
}

#ifdef GF_X86_DISPATCH
GF_AVX2 double exp_fill_avx2(double* p, const float* x, int64_t V, float inv_t, float mx) {
  const __m256 vt = _mm256_set1_ps(inv_t), vm = _mm256_set1_ps(mx), lo = _mm256_set1_ps(-87.f);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 z = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vt), vm);
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(z, lo, _CMP_LT_OQ), exp_nonpos8(z));  // 0 below e^-87
    const __m256d e0 = _mm256_cvtps_pd(_mm256_castps256_ps128(e));
    const __m256d e1 = _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1));
    _mm256_storeu_pd(p + i, e0);
    _mm256_storeu_pd(p + i + 4, e1);
    s0 = _mm256_add_pd(s0, e0);
    s1 = _mm256_add_pd(s1, e1);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(s0, s1));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + exp_fill_base(p + i, x + i, V - i, inv_t, mx);
}
GF_AVX2 float max_scaled_avx2(const float* x, int64_t V, float inv_t) {
  const __m256 vt = _mm256_set1_ps(inv_t);
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) m = _mm256_max_ps(m, _mm256_mul_ps(_mm256_loadu_ps(x + i), vt));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float mx = max_scaled_base(x + i, V - i, inv_t);
  for (float l : lanes) mx = std::max(mx, l);
  return mx;
}
#endif

// p[i] = exp(x[i] * inv_t - mx) (mx >= every x * inv_t), returns their sum (float64). The exps
// are fp32 (exp_nonpos, relative error < 2e-7), 8 lanes at a time on AVX2: one scalar float64 exp
// per token was most of this kernel's time at a 49k vocabulary. Below e^-87 (-inf logits:
// masked tokens) a weight is exactly 0, so such a token is never drawn.
double exp_fill(double* p, const float* x, int64_t V, float inv_t, float mx) {
#ifdef GF_X86_DISPATCH
  if (use_avx2()) return exp_fill_avx2(p, x, V, inv_t, mx);
#endif
  return exp_fill_base(p, x, V, inv_t, mx);
}
// max_i x[i] * inv_t
float max_scaled(const float* x, int64_t V, float inv_t) {
#ifdef GF_X86_DISPATCH
  if (use_avx2()) return max_scaled_avx2(x, V, inv_t);
#endif
  return max_scaled_base(x, V, inv_t);
}

// Smallest threshold keeping the top-p mass among candidates {p >= floor_thr}.
double top_p_threshold(const std::vector<double>& p, double floor_thr, double total, double top_p,
                       std::vector<double>& buf) {
  const double target = top_p * total;
  // The top-p threshold is >= t0 as soon as the mass at or above t0 reaches the target, so only
  // those tokens need sorting; lower t0 until it does (usually one pass keeps a few dozen).
  double pmax = 0.0;
  for (double x : p) pmax = std::max(pmax, x);
  for (double t0 = pmax * 1e-3;; t0 *= 1e-3) {
    if (t0 < 1e-300) t0 = 0.0;
    const double lo = std::max(t0, floor_thr);
    buf.clear();
    double mass = 0.0;
    for (double x : p)
      if (x >= lo) {
        buf.push_back(x);
        mass += x;
      }
    if (mass >= target || lo == floor_thr) {
      std::sort(buf.begin(), buf.end(), std::greater<double>());
      double csum = 0.0;
      for (size_t m = 0; m < buf.size(); ++m) {
        csum += buf[m];
        if (csum >= target) return buf[m];
      }
      return buf.empty() ? 0.0 : buf.back();
    }
  }
}

// Weights stay unnormalized (p = exp(z - max z), the top token's weight 1): every filter and
// the draw are invariant to the scale, so the normalizing pass is skipped.
void sample_row(int64_t* tok_out, float* lp_out, const float* x, int64_t V, float temp, int top_k,
                float top_p, float min_p, int64_t seed, int64_t step, std::vector<double>& p,
                std::vector<double>& buf) {
  p.resize(V);
  if (temp == 0.f) {  // greedy: first maximum; logprob at temperature 1
    int64_t best = 0;
    for (int64_t i = 1; i < V; ++i)
      if (x[i] > x[best]) best = i;
    *tok_out = best;
    *lp_out = static_cast<float>(-std::log(exp_fill(p.data(), x, V, 1.f, x[best])));
    return;
  }
  const float inv_t = 1.f / temp;
  const float mx = max_scaled(x, V, inv_t);
  const double sum = exp_fill(p.data(), x, V, inv_t, mx);  // p = exp(z - max), z = x / T
  const double lse = mx + std::log(sum);
  double thr = 0.0;
  if (top_k > 0 && top_k < V) {
    buf.assign(p.begin(), p.end());
    std::nth_element(buf.begin(), buf.begin() + (top_k - 1), buf.end(), std::greater<double>());
    thr = buf[top_k - 1];
  }
  if (top_p < 1.f) {
    double total = 0.0;
    for (int64_t i = 0; i < V; ++i)
      if (p[i] >= thr) total += p[i];
    thr = std::max(thr, top_p_threshold(p, thr, total, static_cast<double>(top_p), buf));
  }
  if (min_p > 0.f) thr = std::max(thr, static_cast<double>(min_p));  // min_p * (max weight = 1)
  double kept = sum;
  if (thr > 0.0) {
    kept = 0.0;
    for (int64_t i = 0; i < V; ++i)
      if (p[i] >= thr) kept += p[i];
  }
  const double target = uniform01(seed, step) * kept;
  double run = 0.0;
  int64_t chosen = -1, last = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (p[i] < thr) continue;
    last = i;
    run += p[i];
    if (run > target) {
      chosen = i;
      break;
    }
  }
  if (chosen < 0) chosen = last;  // u * kept rounded up to the total
  *tok_out = chosen;
  *lp_out = static_cast<float>(static_cast<double>(x[chosen] * inv_t) - lse);
}

}  // namespace

void cpu_sample(uintptr_t tokens, uintptr_t logprobs, uintptr_t logits, uintptr_t temperature,
                uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seeds,
                uintptr_t steps, int64_t num_rows, int64_t vocab) {
  auto* tok = reinterpret_cast<int64_t*>(tokens);
  auto* lp = reinterpret_cast<float*>(logprobs);
  const auto* x = reinterpret_cast<const float*>(logits);
  const auto* temp = reinterpret_cast<const float*>(temperature);
  const auto* tk = reinterpret_cast<const int32_t*>(top_k);
  const auto* tp = reinterpret_cast<const float*>(top_p);
  const auto* mp = reinterpret_cast<const float*>(min_p);
  const auto* sd = reinterpret_cast<const int64_t*>(seeds);
  const auto* st = reinterpret_cast<const int64_t*>(steps);
  parallel_for(num_rows, [&](int64_t s) {
    thread_local std::vector<double> p, buf;  // per-thread scratch, kept between calls
    sample_row(tok + s, lp + s, x + s * vocab, vocab, temp[s], tk[s], tp[s], mp[s], sd[s], st[s],
               p, buf);
  });
}

}  // namespace grpo_fast
