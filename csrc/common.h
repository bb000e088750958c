// The header shared by all CPU (csrc/*.cpp) and CUDA (csrc/cuda/*.cu) kernels of csrc/: dtype
// codes, the KV-cache index arithmetic, the counter-based RNG (sampling, the prefix-cache block
// hash) and host bf16 conversions. The arithmetic and the RNG are __host__ __device__ inline
// functions, so the CPU and CUDA implementations compute the same slots and random numbers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GF_HD __host__ __device__ __forceinline__
#else
#define GF_HD inline
#endif

namespace grpo_fast {

// dtype codes passed from Python (grpo_fast/native.py: dtype_code)
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// ---- cache layout: [num_blocks, block_size, num_kv_heads, head_dim] -------------------------
// Element offset of (row, head, 0) in a [rows, num_kv_heads, head_dim] array; a cache row is a
// slot = block * block_size + offset.
GF_HD int64_t kv_offset(int64_t slot, int head, int num_kv_heads, int head_dim) {
  return (slot * num_kv_heads + head) * head_dim;
}
// Slot of token j of a sequence whose block table row is `table`.
GF_HD int64_t token_slot(const int32_t* table, int64_t j, int block_size) {
  return static_cast<int64_t>(table[j / block_size]) * block_size + j % block_size;
}

// ---- counter-based RNG: u = top 53 bits of mix64(mix64(seed) ^ step) / 2^53 ------------------
GF_HD uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
GF_HD double uniform01(int64_t seed, int64_t step) {
  uint64_t h = mix64(mix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(step));
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
}

// ---- bf16 / fp16 <-> fp32 on the host (CUDA code uses the cuda_bf16.h intrinsics) ------------
inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace grpo_fast
