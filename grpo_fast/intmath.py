"""Integer helpers shared by the Python side of the native core, the twins of csrc/common.h.

mix64 is splitmix64's finalizer on unsigned 64-bit integers: the prefix-cache block hash
(grpo_fast.kv._hash) and the sampler's counter-based uniforms (grpo_fast.sampler.sampling_reference)
both chain it, bit for bit as the C++ and CUDA code do.
"""
from __future__ import annotations

MASK64 = (1 << 64) - 1


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0: blocks for a tokens, tiles for a rows."""
    return -(-a // b)


def mix64(x: int) -> int:
    """splitmix64 finalizer: a bijection on 64-bit integers with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform01(seed: int, step: int) -> float:
    """The sampler's counter-based uniform in [0, 1): top 53 bits of mix64(mix64(seed) ^ step) / 2^53.
    seed and step are int64 read as uint64, so a sequence's draws depend on (seed, step) only."""
    h = mix64(mix64(seed & MASK64) ^ (step & MASK64))
    return (h >> 11) * (1.0 / 9007199254740992.0)
