"""The prefix-cache block hash, shared by the Python and C++ block managers.

h(block) = splitmix64-style mix of (h(parent block), token ids), as an unsigned 64-bit integer.
The C++ manager computes the same function (csrc/block_manager.cpp: block_hash) so both agree bit
for bit; a hash hit is always confirmed by comparing token ids, so collisions cost only a miss.
"""
from __future__ import annotations

from typing import Sequence

from grpo_fast.intmath import MASK64, mix64

ROOT_HASH = 0x243F6A8885A308D3  # hash of "no parent" (digits of pi, any odd constant works)


def block_hash(parent_hash: int, tokens: Sequence[int]) -> int:
    """Chained content hash of one full block."""
    h = mix64(parent_hash ^ 0x5BD1E995)
    for t in tokens:
        h = mix64(h ^ (int(t) & MASK64))
    return h
