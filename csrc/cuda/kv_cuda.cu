// CUDA KV-cache kernels: append_kv, copy_blocks, paged decode attention, prefill attention.
// Same contracts and math as csrc/kv_cpu.cpp (the oracle); index arithmetic from common.h.
//
// Attention: one thread block per (query item, kv head, chunk of <= kRepMax query heads of that
// GQA group). Its kWarps warps split the keys (warp w takes keys [wU, wU + U), then the same
// range kWarps * U further, ...); each lane holds VEC consecutive elements of the head dim, so a
// key row is one coalesced warp load and a score is a warp-shuffle sum. Every warp runs an
// online softmax (running max m, sum l, output acc in fp32) and the warps merge through shared
// memory at the end:
//   out = sum_w acc_w * exp(m_w - M) / sum_w l_w * exp(m_w - M),  M = max_w m_w.
// head_dim 64 and 128 are exact fast paths (VEC = 2, 4); other sizes up to 256 use VEC = 8 with
// bounds checks. K/V rows are read once per GQA group, not once per query head.
#include <algorithm>

#include "../common.h"
#include "cuda_utils.cuh"
#include "kv_cuda.h"

namespace grpo_fast {
namespace {

constexpr int kWarps = 4;
constexpr int kRepMax = 8;

// ---- append / copy (bitwise: any 2- or 4-byte element type) ----------------------------------
template <typename W>
__global__ void append_kv_kernel(W* kc, W* vc, const W* k, const W* v, const int32_t* slots,
                                 int64_t num_slots, int row) {
  const int64_t t = blockIdx.x;
  const int64_t s = slots[t];
  if (s < 0 || s >= num_slots) return;  // padding (or an invalid slot: never written)
  for (int i = threadIdx.x; i < row; i += blockDim.x) {
    kc[s * row + i] = k[t * row + i];
    vc[s * row + i] = v[t * row + i];
  }
}

template <typename W>
__global__ void copy_blocks_kernel(W* kc, W* vc, const int64_t* map, int64_t num_blocks,
                                   int64_t elems) {
  const int64_t src = map[2 * blockIdx.x], dst = map[2 * blockIdx.x + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
  W* c = blockIdx.y == 0 ? kc : vc;
  for (int64_t i = threadIdx.x; i < elems; i += blockDim.x) c[dst * elems + i] = c[src * elems + i];
}

// ---- key indexers: which cache rows a work item attends to ----------------------------------
struct PagedRows {  // decode: sequence `item` through its block table
  const int32_t* tables;
  const int32_t* lens;
  int64_t max_blocks, num_blocks;
  int bs;
  const int32_t* table = nullptr;
  __device__ int64_t init(int64_t item) {
    table = tables + item * max_blocks;
    const int64_t n = lens[item];
    return n < 0 ? 0 : min(n, max_blocks * bs);
  }
  __device__ int64_t row(int64_t j) const {  // -1: not a block of the cache (skipped)
    const int32_t b = table[j / bs];
    return (b < 0 || b >= num_blocks) ? -1 : token_slot(table, j, bs);
  }
};

struct PackedCausalRows {  // prefill: query token `item` over its sequence's packed keys
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t batch;
  int64_t k0 = 0;
  __device__ int64_t init(int64_t t) {
    int64_t lo = 0, hi = batch;  // last b with cu_q[b] <= t
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (cu_q[mid] <= t) lo = mid; else hi = mid - 1;
    }
    const int64_t b = lo;
    const int64_t nq = cu_q[b + 1] - cu_q[b], nk = cu_k[b + 1] - cu_k[b];
    k0 = cu_k[b];
    const int64_t n = nk - nq + (t - cu_q[b]) + 1;  // bottom-right causal
    return n < 0 ? 0 : n;
  }
  __device__ int64_t row(int64_t j) const { return k0 + j; }
};

template <typename T, int VEC, bool EXACT, typename Rows>
__global__ void __launch_bounds__(kWarps * 32)
    attend_kernel(T* out, const T* q, const T* kc, const T* vc, Rows rows, int hq, int hkv, int D,
                  float scale) {
  __shared__ float sm_m[kWarps][kRepMax], sm_l[kWarps][kRepMax];
  __shared__ float sm_acc[kWarps][kRepMax][32 * VEC];
  const int64_t item = blockIdx.x;
  const int g = blockIdx.y;
  const int rep = hq / hkv;
  const int h0 = g * rep + blockIdx.z * kRepMax;
  const int rc = min(kRepMax, rep - static_cast<int>(blockIdx.z) * kRepMax);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = rows.init(item);

  const T* qrow = q + (item * hq + h0) * static_cast<int64_t>(D);
  float qr[kRepMax][VEC], acc[kRepMax][VEC], m[kRepMax], l[kRepMax];
#pragma unroll
  for (int r = 0; r < kRepMax; ++r) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int d = lane * VEC + i;
      qr[r][i] = (r < rc && (EXACT || d < D)) ? to_f32(qrow[r * D + d]) * scale : 0.f;
      acc[r][i] = 0.f;
    }
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  // Each warp takes U consecutive keys per step and issues all their loads before the math,
  // so U row loads are in flight at once (decode is bound by load latency, not FLOPs).
  constexpr int U = VEC <= 4 ? 4 : 1;  // VEC = 8 (general path) would spill registers
  for (int64_t j0 = static_cast<int64_t>(warp) * U; j0 < n; j0 += kWarps * U) {
    float kf[U][VEC], vf[U][VEC];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = j0 + u < n ? rows.row(j0 + u) : -1;  // warp-uniform
      ok[u] = row >= 0;
      const T* kp = kc + kv_offset(ok[u] ? row : 0, g, hkv, D);
      const T* vp = vc + kv_offset(ok[u] ? row : 0, g, hkv, D);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int d = lane * VEC + i;
        const bool in = ok[u] && (EXACT || d < D);
        kf[u][i] = in ? to_f32(kp[d]) : 0.f;
        vf[u][i] = in ? to_f32(vp[d]) : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!ok[u]) continue;  // past the end, or not a block of the cache
#pragma unroll
      for (int r = 0; r < kRepMax; ++r) {
        if (r < rc) {
          float sc = 0.f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) sc += qr[r][i] * kf[u][i];
          sc = warp_sum(sc);
          const float mn = fmaxf(m[r], sc);
          const float corr = __expf(m[r] - mn);  // 0 on the first key (m = -inf)
          const float p = __expf(sc - mn);
          l[r] = l[r] * corr + p;
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[r][i] = acc[r][i] * corr + p * vf[u][i];
          m[r] = mn;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRepMax; ++r) {
    if (lane == 0) {
      sm_m[warp][r] = m[r];
      sm_l[warp][r] = l[r];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sm_acc[warp][r][lane * VEC + i] = acc[r][i];
  }
  __syncthreads();
  T* orow = out + (item * hq + h0) * static_cast<int64_t>(D);
  for (int e = threadIdx.x; e < rc * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm_m[w][r]);
    float L = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float sc = sm_m[w][r] == -INFINITY ? 0.f : __expf(sm_m[w][r] - M);
      L += sm_l[w][r] * sc;
      o += sm_acc[w][r][d] * sc;
    }
    orow[r * D + d] = from_f32<T>(L > 0.f ? o / L : 0.f);  // no keys: zeros
  }
}

template <typename T, typename Rows>
void launch_attend(T* out, const T* q, const T* kc, const T* vc, const Rows& rows, int64_t items,
                   int hq, int hkv, int D, float scale, cudaStream_t stream) {
  if (items == 0) return;
  if (hkv <= 0 || hq % hkv != 0)
    throw std::invalid_argument("num_q_heads must be a multiple of num_kv_heads");
  const int rep = hq / hkv;
  const dim3 grid(static_cast<unsigned>(items), hkv, (rep + kRepMax - 1) / kRepMax);
  const dim3 block(kWarps * 32);
  if (D == 64)
    attend_kernel<T, 2, true><<<grid, block, 0, stream>>>(out, q, kc, vc, rows, hq, hkv, D, scale);
  else if (D == 128)
    attend_kernel<T, 4, true><<<grid, block, 0, stream>>>(out, q, kc, vc, rows, hq, hkv, D, scale);
  else if (D > 0 && D <= 256)
    attend_kernel<T, 8, false><<<grid, block, 0, stream>>>(out, q, kc, vc, rows, hq, hkv, D, scale);
  else
    throw std::invalid_argument("head_dim must lie in [1, 256]");
  cuda_check(cudaGetLastError(), "attention kernel launch");
}

template <typename Rows>
void dispatch_attend(int dtype, uintptr_t out, uintptr_t q, uintptr_t k, uintptr_t v,
                     const Rows& rows, int64_t items, int hq, int hkv, int D, float scale,
                     cudaStream_t stream) {
  switch (dtype) {
    case kF32:
      return launch_attend(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(q),
                           reinterpret_cast<const float*>(k), reinterpret_cast<const float*>(v),
                           rows, items, hq, hkv, D, scale, stream);
    case kBF16:
      return launch_attend(reinterpret_cast<__nv_bfloat16*>(out),
                           reinterpret_cast<const __nv_bfloat16*>(q),
                           reinterpret_cast<const __nv_bfloat16*>(k),
                           reinterpret_cast<const __nv_bfloat16*>(v), rows, items, hq, hkv, D,
                           scale, stream);
    case kF16:
      return launch_attend(reinterpret_cast<__half*>(out), reinterpret_cast<const __half*>(q),
                           reinterpret_cast<const __half*>(k), reinterpret_cast<const __half*>(v),
                           rows, items, hq, hkv, D, scale, stream);
    default:
      throw std::invalid_argument("unknown dtype code");
  }
}

}  // namespace

void cuda_append_kv(uintptr_t key_cache, uintptr_t value_cache, uintptr_t key, uintptr_t value,
                    uintptr_t slot_mapping, int64_t num_tokens, int64_t num_slots,
                    int num_kv_heads, int head_dim, int dtype, uintptr_t stream) {
  if (num_tokens == 0) return;
  const int row = num_kv_heads * head_dim;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  auto slots = reinterpret_cast<const int32_t*>(slot_mapping);
  const int threads = std::min(256, std::max(32, row));
  if (dtype == kF32)
    append_kv_kernel<uint32_t><<<static_cast<unsigned>(num_tokens), threads, 0, st>>>(
        reinterpret_cast<uint32_t*>(key_cache), reinterpret_cast<uint32_t*>(value_cache),
        reinterpret_cast<const uint32_t*>(key), reinterpret_cast<const uint32_t*>(value), slots,
        num_slots, row);
  else
    append_kv_kernel<uint16_t><<<static_cast<unsigned>(num_tokens), threads, 0, st>>>(
        reinterpret_cast<uint16_t*>(key_cache), reinterpret_cast<uint16_t*>(value_cache),
        reinterpret_cast<const uint16_t*>(key), reinterpret_cast<const uint16_t*>(value), slots,
        num_slots, row);
  cuda_check(cudaGetLastError(), "append_kv launch");
}

void cuda_copy_blocks(uintptr_t key_cache, uintptr_t value_cache, uintptr_t block_mapping,
                      int64_t num_pairs, int64_t num_blocks, int64_t block_elems, int dtype,
                      uintptr_t stream) {
  if (num_pairs == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  auto map = reinterpret_cast<const int64_t*>(block_mapping);
  const dim3 grid(static_cast<unsigned>(num_pairs), 2);
  if (dtype == kF32)
    copy_blocks_kernel<uint32_t><<<grid, 256, 0, st>>>(reinterpret_cast<uint32_t*>(key_cache),
                                                       reinterpret_cast<uint32_t*>(value_cache),
                                                       map, num_blocks, block_elems);
  else
    copy_blocks_kernel<uint16_t><<<grid, 256, 0, st>>>(reinterpret_cast<uint16_t*>(key_cache),
                                                       reinterpret_cast<uint16_t*>(value_cache),
                                                       map, num_blocks, block_elems);
  cuda_check(cudaGetLastError(), "copy_blocks launch");
}

void cuda_paged_decode_attention(uintptr_t out, uintptr_t query, uintptr_t key_cache,
                                 uintptr_t value_cache, uintptr_t block_tables,
                                 uintptr_t context_lens, int64_t num_seqs, int num_q_heads,
                                 int num_kv_heads, int head_dim, int block_size,
                                 int64_t max_blocks, int64_t num_blocks, float scale, int dtype,
                                 uintptr_t stream) {
  PagedRows rows{reinterpret_cast<const int32_t*>(block_tables),
                 reinterpret_cast<const int32_t*>(context_lens), max_blocks, num_blocks,
                 block_size};
  dispatch_attend(dtype, out, query, key_cache, value_cache, rows, num_seqs, num_q_heads,
                  num_kv_heads, head_dim, scale, reinterpret_cast<cudaStream_t>(stream));
}

void cuda_prefill_attention(uintptr_t out, uintptr_t query, uintptr_t key, uintptr_t value,
                            uintptr_t cu_seqlens, uintptr_t cu_seqlens_k, int64_t batch,
                            int64_t num_tokens, int num_q_heads, int num_kv_heads, int head_dim,
                            float scale, int dtype, uintptr_t stream) {
  PackedCausalRows rows{reinterpret_cast<const int32_t*>(cu_seqlens),
                        reinterpret_cast<const int32_t*>(cu_seqlens_k), batch};
  dispatch_attend(dtype, out, query, key, value, rows, num_tokens, num_q_heads, num_kv_heads,
                  head_dim, scale, reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace grpo_fast
