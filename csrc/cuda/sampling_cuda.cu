// CUDA sampler: one thread block per row; same contract as csrc/sampling_cpu.cpp.
//
// No sort: every filter keeps {i : p_i >= thr}, and each threshold is found by bisection on
// the bit pattern of non-negative floats (monotone as unsigned ints), one block-wide count or
// mass reduction per step (<= 31 steps):
//   top-k: the largest t with #{p >= t} >= k            = the k-th largest probability;
//   top-p: the largest t >= thr_k with mass{p >= t} >= top_p * mass{p >= thr_k}
//          = the probability at which the sorted cumulative mass first reaches top_p;
//   min-p: min_p * max p.
// The draw walks the survivors in vocabulary order (each thread owns a contiguous chunk; an
// exclusive scan of chunk masses finds the chunk holding u * kept mass), matching the CPU order.
// Probabilities are fp32 here (fp64 sums); the CPU computes them in fp64, so the two agree
// except when u falls within float rounding of a token boundary.
#include "sampling_cuda.h"

#include "../common.h"
#include "cuda_utils.cuh"

namespace grpo_fast {
namespace {

constexpr int kThreads = 512;

struct MaxF { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct SumD { __device__ double operator()(double a, double b) const { return a + b; } };
struct SumU {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a + b;
  }
};
struct MinL { __device__ long long operator()(long long a, long long b) const { return a < b ? a : b; } };
struct MaxL { __device__ long long operator()(long long a, long long b) const { return a > b ? a : b; } };

__global__ void __launch_bounds__(kThreads)
    sample_kernel(int64_t* tokens, float* logprobs, const float* logits, const float* temperature,
                  const int32_t* top_k, const float* top_p, const float* min_p,
                  const int64_t* seeds, const int64_t* steps, int64_t V, float* ws) {
  __shared__ float shf[32];
  __shared__ double shd[32];
  __shared__ unsigned long long shu[32];
  __shared__ long long shl[32];
  __shared__ double scan[kThreads];
  __shared__ long long chosen;
  const int64_t row = blockIdx.x;
  const float* x = logits + row * V;
  float* p = ws + row * V;
  const int tid = threadIdx.x;
  const float T = temperature[row];

  if (T == 0.f) {  // greedy: first maximum, logprob at temperature 1
    float mx = -INFINITY;
    for (int64_t i = tid; i < V; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = block_reduce(mx, MaxF(), shf);
    long long first = V;
    for (int64_t i = tid; i < V; i += blockDim.x)
      if (x[i] == mx) { first = i; break; }
    first = block_reduce(first, MinL(), shl);
    double sum = 0.0;
    for (int64_t i = tid; i < V; i += blockDim.x) sum += __expf(x[i] - mx);
    sum = block_reduce(sum, SumD(), shd);
    if (tid == 0) {
      tokens[row] = first;
      logprobs[row] = static_cast<float>(-log(sum));
    }
    return;
  }

  float mx = -INFINITY;
  for (int64_t i = tid; i < V; i += blockDim.x) mx = fmaxf(mx, x[i] / T);
  mx = block_reduce(mx, MaxF(), shf);
  double sum = 0.0;
  for (int64_t i = tid; i < V; i += blockDim.x) sum += expf(x[i] / T - mx);
  sum = block_reduce(sum, SumD(), shd);
  const float lse = mx + static_cast<float>(log(sum));
  for (int64_t i = tid; i < V; i += blockDim.x) p[i] = expf(x[i] / T - lse);
  __syncthreads();

  unsigned thr = 0;  // bit pattern of the threshold (p >= 0, so bits order like values)
  const int k = top_k[row];
  if (k > 0 && k < V) {
    unsigned lo = 0, hi = 0x7f800000u;
    while (lo < hi) {
      const unsigned mid = lo + (hi - lo + 1) / 2;
      unsigned long long c = 0;
      for (int64_t i = tid; i < V; i += blockDim.x) c += __float_as_uint(p[i]) >= mid;
      c = block_reduce(c, SumU(), shu);
      if (c >= static_cast<unsigned long long>(k)) lo = mid; else hi = mid - 1;
    }
    thr = lo;
  }
  const float tp = top_p[row];
  if (tp < 1.f) {
    double total = 0.0;
    for (int64_t i = tid; i < V; i += blockDim.x)
      if (__float_as_uint(p[i]) >= thr) total += p[i];
    total = block_reduce(total, SumD(), shd);
    const double target = static_cast<double>(tp) * total;
    unsigned lo = thr, hi = 0x7f800000u;
    while (lo < hi) {
      const unsigned mid = lo + (hi - lo + 1) / 2;
      double mass = 0.0;
      for (int64_t i = tid; i < V; i += blockDim.x)
        if (__float_as_uint(p[i]) >= mid) mass += p[i];
      mass = block_reduce(mass, SumD(), shd);
      if (mass >= target) lo = mid; else hi = mid - 1;
    }
    thr = lo;
  }
  float thr_f = __uint_as_float(thr);
  const float mp = min_p[row];
  if (mp > 0.f) thr_f = fmaxf(thr_f, mp * expf(mx - lse));

  // inverse CDF in vocabulary order over the survivors
  const int64_t chunk = (V + blockDim.x - 1) / blockDim.x;
  const int64_t c0 = min(V, tid * chunk), c1 = min(V, c0 + chunk);
  double mine = 0.0;
  long long last = -1;
  for (int64_t i = c0; i < c1; ++i)
    if (p[i] >= thr_f) {
      mine += p[i];
      last = i;
    }
  last = block_reduce(last, MaxL(), shl);
  scan[tid] = mine;
  if (tid == 0) chosen = -1;
  __syncthreads();
  if (tid == 0) {  // exclusive prefix over the chunk masses (blockDim entries)
    double run = 0.0;
    for (int t = 0; t < static_cast<int>(blockDim.x); ++t) {
      const double v = scan[t];
      scan[t] = run;
      run += v;
    }
    shd[0] = run;  // total kept mass
  }
  __syncthreads();
  const double kept = shd[0];
  const double target = uniform01(seeds[row], steps[row]) * kept;
  const double excl = scan[tid];
  if (mine > 0.0 && excl <= target && target < excl + mine) {
    double run = excl;
    for (int64_t i = c0; i < c1; ++i)
      if (p[i] >= thr_f) {
        run += p[i];
        if (run > target) {
          chosen = i;
          break;
        }
      }
  }
  __syncthreads();
  if (tid == 0) {
    const long long tok = chosen >= 0 ? chosen : last;  // u * kept rounded up to the total
    tokens[row] = tok;
    logprobs[row] = x[tok] / T - lse;
  }
}

}  // namespace

void cuda_sample(uintptr_t tokens, uintptr_t logprobs, uintptr_t logits, uintptr_t temperature,
                 uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seeds,
                 uintptr_t steps, int64_t num_rows, int64_t vocab, uintptr_t workspace,
                 uintptr_t stream) {
  if (num_rows == 0) return;
  sample_kernel<<<static_cast<unsigned>(num_rows), kThreads, 0,
                  reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<int64_t*>(tokens), reinterpret_cast<float*>(logprobs),
      reinterpret_cast<const float*>(logits), reinterpret_cast<const float*>(temperature),
      reinterpret_cast<const int32_t*>(top_k), reinterpret_cast<const float*>(top_p),
      reinterpret_cast<const float*>(min_p), reinterpret_cast<const int64_t*>(seeds),
      reinterpret_cast<const int64_t*>(steps), vocab, reinterpret_cast<float*>(workspace));
  cuda_check(cudaGetLastError(), "sample launch");
}

}  // namespace grpo_fast
