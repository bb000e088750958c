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
  __device__ int64_t query_row(int64_t item) const { return item; }
};

// Group g of a cascade step owning position p of group_rows: the last g with starts[g] <= p.
__device__ __forceinline__ int64_t group_of(const int32_t* starts, int64_t groups, int64_t p) {
  int64_t lo = 0, hi = groups - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (starts[mid] <= p) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct CascadeOwnRows {  // cascade: the row at position `item` of group_rows, keys [prefix, len)
  const int32_t* tables;
  const int32_t* lens;
  int64_t max_blocks, num_blocks;
  int bs;
  const int32_t* rows;
  const int32_t* starts;
  const int32_t* prefix;
  int64_t groups;
  const int32_t* table = nullptr;
  int64_t j0 = 0;
  __device__ int64_t init(int64_t item) {
    const int64_t r = rows[item];
    table = tables + r * max_blocks;
    j0 = prefix[group_of(starts, groups, item)];
    const int64_t n = min(static_cast<int64_t>(lens[r]), max_blocks * bs) - j0;
    return n < 0 ? 0 : n;
  }
  __device__ int64_t row(int64_t j) const {
    j += j0;
    const int32_t b = table[j / bs];
    return (b < 0 || b >= num_blocks) ? -1 : token_slot(table, j, bs);
  }
  __device__ int64_t query_row(int64_t item) const { return rows[item]; }
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
  __device__ int64_t query_row(int64_t item) const { return item; }
};

// partial: nullptr, or the unnormalized state [items][hq][D + 2] = (acc[D], m, l) of each query
// head for a later exact merge (cascade attention: a row's own keys), instead of `out`.
template <typename T, int VEC, bool EXACT, typename Rows>
__global__ void __launch_bounds__(kWarps * 32)
    attend_kernel(T* out, const T* q, const T* kc, const T* vc, Rows rows, int hq, int hkv, int D,
                  float scale, float* partial) {
  __shared__ float sm_m[kWarps][kRepMax], sm_l[kWarps][kRepMax];
  __shared__ float sm_acc[kWarps][kRepMax][32 * VEC];
  const int64_t item = blockIdx.x;
  const int g = blockIdx.y;
  const int rep = hq / hkv;
  const int h0 = g * rep + blockIdx.z * kRepMax;
  const int rc = min(kRepMax, rep - static_cast<int>(blockIdx.z) * kRepMax);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = rows.init(item);

  const T* qrow = q + (rows.query_row(item) * hq + h0) * static_cast<int64_t>(D);
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
  T* orow = out + (rows.query_row(item) * hq + h0) * static_cast<int64_t>(D);
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
    if (partial != nullptr) {
      float* pr = partial + (item * hq + h0 + r) * static_cast<int64_t>(D + 2);
      pr[d] = o;
      if (d == 0) {
        pr[D] = M;
        pr[D + 1] = L;
      }
    } else {
      orow[r * D + d] = from_f32<T>(L > 0.f ? o / L : 0.f);  // no keys: zeros
    }
  }
}

template <typename T, typename Rows>
void launch_attend(T* out, const T* q, const T* kc, const T* vc, const Rows& rows, int64_t items,
                   int hq, int hkv, int D, float scale, cudaStream_t stream,
                   float* partial = nullptr) {
  if (items == 0) return;
  if (hkv <= 0 || hq % hkv != 0)
    throw std::invalid_argument("num_q_heads must be a multiple of num_kv_heads");
  const int rep = hq / hkv;
  const dim3 grid(static_cast<unsigned>(items), hkv, (rep + kRepMax - 1) / kRepMax);
  const dim3 block(kWarps * 32);
  if (D == 64)
    attend_kernel<T, 2, true><<<grid, block, 0, stream>>>(out, q, kc, vc, rows, hq, hkv, D, scale,
                                                          partial);
  else if (D == 128)
    attend_kernel<T, 4, true><<<grid, block, 0, stream>>>(out, q, kc, vc, rows, hq, hkv, D, scale,
                                                          partial);
  else if (D > 0 && D <= 256)
    attend_kernel<T, 8, false><<<grid, block, 0, stream>>>(out, q, kc, vc, rows, hq, hkv, D, scale,
                                                           partial);
  else
    throw std::invalid_argument("head_dim must lie in [1, 256]");
  cuda_check(cudaGetLastError(), "attention kernel launch");
}

template <typename Rows>
void dispatch_attend(int dtype, uintptr_t out, uintptr_t q, uintptr_t k, uintptr_t v,
                     const Rows& rows, int64_t items, int hq, int hkv, int D, float scale,
                     cudaStream_t stream, float* partial = nullptr) {
  switch (dtype) {
    case kF32:
      return launch_attend(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(q),
                           reinterpret_cast<const float*>(k), reinterpret_cast<const float*>(v),
                           rows, items, hq, hkv, D, scale, stream, partial);
    case kBF16:
      return launch_attend(reinterpret_cast<__nv_bfloat16*>(out),
                           reinterpret_cast<const __nv_bfloat16*>(q),
                           reinterpret_cast<const __nv_bfloat16*>(k),
                           reinterpret_cast<const __nv_bfloat16*>(v), rows, items, hq, hkv, D,
                           scale, stream, partial);
    case kF16:
      return launch_attend(reinterpret_cast<__half*>(out), reinterpret_cast<const __half*>(q),
                           reinterpret_cast<const __half*>(k), reinterpret_cast<const __half*>(v),
                           rows, items, hq, hkv, D, scale, stream, partial);
    default:
      throw std::invalid_argument("unknown dtype code");
  }
}


// ---- cascade decode attention ----------------------------------------------------------------
// Prefix pass: one thread block per (group g, kv head h, prefix split, chunk of kCasQ queries of
// the group's G * rep). A tile of kCasTile prefix keys (K and V, read once through the group's
// first row's table) is staged in shared memory for all the block's queries; each warp owns
// kCasQ / kWarps queries: lane t scores key t of the tile against a query (the query from
// shared memory), the warp runs the online softmax over the tile, then each lane accumulates its
// VEC dims (lane, lane + 32, ...: conflict-free shared-memory reads) of P V. The per-sequence kernel reads those keys once per sequence; here once per
// kCasQ queries. Output: the (acc, m, l) state of each query, merged after with the row's own
// keys (attend_kernel with CascadeOwnRows) by cascade_merge_kernel. head_dim <= 128.
constexpr int kCasTile = 32;
constexpr int kCasQ = 16;                  // queries per block (kCasQ / kWarps per warp)
constexpr int kCasSplit = 128;             // prefix keys per block
constexpr int kCasMaxD = 128;

struct CascadeMeta {
  const int32_t* tables;
  const int32_t* lens;
  int64_t max_blocks, num_blocks;
  int bs;
  const int32_t* rows;
  const int32_t* starts;
  const int32_t* prefix;
  int64_t groups, max_group, splits_max, qchunks_max;
  float* own_parts;     // [S][hq][D + 2]
  float* prefix_parts;  // [groups][splits_max][max_group][hq][D + 2]
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarps * 32)
    cascade_prefix_kernel(const T* q, const T* kc, const T* vc, CascadeMeta c, int hq, int hkv,
                          int D, float scale) {
  __shared__ float ks[kCasTile][kCasMaxD + 1];
  __shared__ float vs[kCasTile][kCasMaxD];
  __shared__ float qs[kCasQ][kCasMaxD];
  __shared__ bool kok[kCasTile];  // the key's block is a block of the cache
  const int64_t g = blockIdx.x;
  const int h = blockIdx.y;
  const int64_t split = blockIdx.z / c.qchunks_max, qc = blockIdx.z % c.qchunks_max;
  const int rep = hq / hkv;
  const int64_t first = c.starts[g], G = c.starts[g + 1] - first, nq = G * rep;
  const int64_t P = c.prefix[g];
  const int64_t k0 = split * kCasSplit, k1 = min(P, k0 + kCasSplit);
  const int64_t q0 = qc * kCasQ;
  if (k0 >= P || q0 >= nq) return;  // this group has fewer splits / queries than the grid
  const int nqb = static_cast<int>(min(static_cast<int64_t>(kCasQ), nq - q0));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int e = threadIdx.x; e < kCasQ * D; e += blockDim.x) {
    const int qq = e / D, d = e % D;
    float x = 0.f;
    if (qq < nqb) {
      const int64_t qi = q0 + qq, row = c.rows[first + qi / rep];
      x = to_f32(q[(row * hq + h * rep + qi % rep) * static_cast<int64_t>(D) + d]) * scale;
    }
    qs[qq][d] = x;
  }
  constexpr int QW = kCasQ / kWarps;  // queries of this warp: qs rows warp * QW + i
  float m[QW], l[QW], acc[QW][VEC];
#pragma unroll
  for (int i = 0; i < QW; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[i][v] = 0.f;
  }
  const int32_t* table = c.tables + static_cast<int64_t>(c.rows[first]) * c.max_blocks;
  for (int64_t j0 = k0; j0 < k1; j0 += kCasTile) {
    __syncthreads();  // the previous tile is consumed (and qs written, on the first one)
    for (int e = threadIdx.x; e < kCasTile * D; e += blockDim.x) {
      const int t = e / D, d = e % D;
      float kx = 0.f, vx = 0.f;
      const int32_t b = j0 + t < k1 ? table[(j0 + t) / c.bs] : -1;
      const bool ok = b >= 0 && b < c.num_blocks;  // else skipped, never read (as PagedRows)
      if (ok) {
        const int64_t off = kv_offset(token_slot(table, j0 + t, c.bs), h, hkv, D);
        kx = to_f32(kc[off + d]);
        vx = to_f32(vc[off + d]);
      }
      ks[t][d] = kx;
      vs[t][d] = vx;
      if (d == 0) kok[t] = ok;
    }
    __syncthreads();
    const bool valid = kok[lane];
#pragma unroll
    for (int i = 0; i < QW; ++i) {
      const int qq = warp * QW + i;
      if (qq >= nqb) break;  // warp-uniform
      float sc = 0.f;
      for (int d = 0; d < D; ++d) sc += qs[qq][d] * ks[lane][d];
      sc = valid ? sc : -INFINITY;
      float mx = sc;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float mn = fmaxf(m[i], mx);
      if (mn == -INFINITY) continue;  // no valid key yet (warp-uniform)
      const float corr = __expf(m[i] - mn);  // 0 on the first valid tile (m = -inf)
      const float p = valid ? __expf(sc - mn) : 0.f;
      l[i] = l[i] * corr + warp_sum(p);
      m[i] = mn;
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[i][v] *= corr;
      for (int t = 0; t < kCasTile; ++t) {
        const float pt = __shfl_sync(0xffffffffu, p, t);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const int d = v * 32 + lane;
          if (d < D) acc[i][v] += pt * vs[t][d];
        }
      }
    }
  }
  const int64_t row_stride = static_cast<int64_t>(hq) * (D + 2);
#pragma unroll
  for (int i = 0; i < QW; ++i) {
    const int qq = warp * QW + i;
    if (qq >= nqb) break;
    const int64_t qi = q0 + qq;
    float* pr = c.prefix_parts +
                ((g * c.splits_max + split) * c.max_group + qi / rep) * row_stride +
                static_cast<int64_t>(h * rep + qi % rep) * (D + 2);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int d = v * 32 + lane;
      if (d < D) pr[d] = acc[i][v];
    }
    if (lane == 0) {
      pr[D] = m[i];
      pr[D + 1] = l[i];
    }
  }
}

// out[rows[p], h] = the exact merge of position p's own-key state and its group's prefix states.
template <typename T>
__global__ void cascade_merge_kernel(T* out, CascadeMeta c, int hq, int D) {
  const int64_t p = blockIdx.x;
  const int h = blockIdx.y;
  const int64_t g = group_of(c.starts, c.groups, p), i = p - c.starts[g];
  const int64_t splits = (c.prefix[g] + kCasSplit - 1) / kCasSplit;
  const int64_t row_stride = static_cast<int64_t>(hq) * (D + 2);
  auto part = [&](int64_t k) -> const float* {  // k = 0: own keys, then the prefix splits
    return k == 0 ? c.own_parts + p * row_stride + static_cast<int64_t>(h) * (D + 2)
                  : c.prefix_parts + ((g * c.splits_max + (k - 1)) * c.max_group + i) * row_stride +
                        static_cast<int64_t>(h) * (D + 2);
  };
  float M = -INFINITY;
  for (int64_t k = 0; k <= splits; ++k)
    if (part(k)[D + 1] > 0.f) M = fmaxf(M, part(k)[D]);
  T* orow = out + (static_cast<int64_t>(c.rows[p]) * hq + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float L = 0.f, o = 0.f;
    for (int64_t k = 0; k <= splits; ++k) {
      const float* pk = part(k);
      if (!(pk[D + 1] > 0.f)) continue;  // a range with no keys
      const float w = __expf(pk[D] - M);
      L += pk[D + 1] * w;
      o += pk[d] * w;
    }
    orow[d] = from_f32<T>(L > 0.f ? o / L : 0.f);
  }
}

template <typename T>
void launch_cascade(T* out, const T* q, const T* kc, const T* vc, const CascadeMeta& c,
                    int64_t num_seqs, int hq, int hkv, int D, float scale, cudaStream_t stream) {
  if (num_seqs == 0) return;
  if (D > kCasMaxD) throw std::invalid_argument("cascade attention on CUDA: head_dim must be <= 128");
  CascadeOwnRows own{c.tables, c.lens, c.max_blocks, c.num_blocks, c.bs,
                     c.rows, c.starts, c.prefix, c.groups};
  launch_attend(out, q, kc, vc, own, num_seqs, hq, hkv, D, scale, stream, c.own_parts);
  if (c.splits_max > 0 && c.groups > 0 && c.qchunks_max > 0) {
    const dim3 grid(static_cast<unsigned>(c.groups), hkv,
                    static_cast<unsigned>(c.splits_max * c.qchunks_max));
    if (D <= 64)
      cascade_prefix_kernel<T, 2><<<grid, kWarps * 32, 0, stream>>>(q, kc, vc, c, hq, hkv, D, scale);
    else
      cascade_prefix_kernel<T, 4><<<grid, kWarps * 32, 0, stream>>>(q, kc, vc, c, hq, hkv, D, scale);
    cuda_check(cudaGetLastError(), "cascade prefix kernel launch");
  }
  cascade_merge_kernel<T><<<dim3(static_cast<unsigned>(num_seqs), hq), 128, 0, stream>>>(
      out, c, hq, D);
  cuda_check(cudaGetLastError(), "cascade merge kernel launch");
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

void cuda_cascade_decode_attention(uintptr_t out, uintptr_t query, uintptr_t key_cache,
                                   uintptr_t value_cache, uintptr_t block_tables,
                                   uintptr_t context_lens, int64_t num_seqs, int num_q_heads,
                                   int num_kv_heads, int head_dim, int block_size,
                                   int64_t max_blocks, int64_t num_blocks, float scale, int dtype,
                                   uintptr_t group_rows, uintptr_t group_starts,
                                   uintptr_t prefix_lens, int64_t num_groups,
                                   int64_t max_prefix, int64_t max_group, uintptr_t workspace,
                                   int64_t workspace_floats, uintptr_t stream) {
  if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0)
    throw std::invalid_argument("num_q_heads must be a multiple of num_kv_heads");
  const int rep = num_q_heads / num_kv_heads;
  const int64_t row_floats = static_cast<int64_t>(num_q_heads) * (head_dim + 2);
  const int64_t splits_max = (max_prefix + kCasSplit - 1) / kCasSplit;
  if (workspace_floats < cascade_workspace_floats(num_seqs, num_q_heads, head_dim, num_groups,
                                                  max_prefix, max_group))
    throw std::invalid_argument("cascade attention: workspace too small");
  auto* ws = reinterpret_cast<float*>(workspace);
  CascadeMeta c{reinterpret_cast<const int32_t*>(block_tables),
                reinterpret_cast<const int32_t*>(context_lens),
                max_blocks,
                num_blocks,
                block_size,
                reinterpret_cast<const int32_t*>(group_rows),
                reinterpret_cast<const int32_t*>(group_starts),
                reinterpret_cast<const int32_t*>(prefix_lens),
                num_groups,
                max_group,
                splits_max,
                (max_group * rep + kCasQ - 1) / kCasQ,
                ws,
                ws + num_seqs * row_floats};
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32:
      return launch_cascade(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(query),
                            reinterpret_cast<const float*>(key_cache),
                            reinterpret_cast<const float*>(value_cache), c, num_seqs,
                            num_q_heads, num_kv_heads, head_dim, scale, st);
    case kBF16:
      return launch_cascade(reinterpret_cast<__nv_bfloat16*>(out),
                            reinterpret_cast<const __nv_bfloat16*>(query),
                            reinterpret_cast<const __nv_bfloat16*>(key_cache),
                            reinterpret_cast<const __nv_bfloat16*>(value_cache), c, num_seqs,
                            num_q_heads, num_kv_heads, head_dim, scale, st);
    case kF16:
      return launch_cascade(reinterpret_cast<__half*>(out), reinterpret_cast<const __half*>(query),
                            reinterpret_cast<const __half*>(key_cache),
                            reinterpret_cast<const __half*>(value_cache), c, num_seqs,
                            num_q_heads, num_kv_heads, head_dim, scale, st);
    default:
      throw std::invalid_argument("unknown dtype code");
  }
}

int64_t cascade_workspace_floats(int64_t num_seqs, int num_q_heads, int head_dim,
                                 int64_t num_groups, int64_t max_prefix, int64_t max_group) {
  const int64_t row_floats = static_cast<int64_t>(num_q_heads) * (head_dim + 2);
  const int64_t splits_max = (max_prefix + kCasSplit - 1) / kCasSplit;
  return num_seqs * row_floats + num_groups * splits_max * max_group * row_floats;
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
