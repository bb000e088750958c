"""The prefix-cache block hash, shared by the Python and C++ block managers.

h(block) = splitmix64-style mix of (h(parent block), token ids), as an unsigned 64-bit integer.
The C++ manager computes the same function (csrc/block_hash.h) so both agree bit for bit; a
hash hit is always confirmed by comparing token ids, so collisions cost only a miss.
"""
from __future__ import annotations

from typing import Sequence

MASK64 = (1 << 64) - 1
ROOT_HASH = 0x243F6A8885A308D3  # hash of "no parent" (digits of pi, any odd constant works)


def mix64(x: int) -> int:
    """splitmix64 finalizer: a bijection on 64-bit integers with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def block_hash(parent_hash: int, tokens: Sequence[int]) -> int:
    """Chained content hash of one full block."""
    h = mix64(parent_hash ^ 0x5BD1E995)
    for t in tokens:
        h = mix64(h ^ (int(t) & MASK64))
    return h
