"""Pure-Python block manager: the readable twin of the C++ one (csrc/block_manager.cpp).

Both follow one contract (see `grpo_fast.kv.BlockManager`); the property tests run the same
operation sequences against both and demand identical block tables and slot mappings.

Pool bookkeeping
- `ref[b]`: how many sequences hold block b in their table. A block with ref 0 is free.
- free blocks live in one of two places: `_free` (a LIFO stack of blocks with no cached content)
  or `_cached_free` (an LRU ordered dict of unreferenced blocks that still hold a prompt prefix
  registered in the prefix cache). Allocation takes `_free` first, then evicts the LRU cached one.
- `_hash_to_block`: content hash of a full prompt block -> block id; `_block_tokens[b]` keeps its
  tokens to confirm a hash hit (collisions cost a miss, never a wrong KV).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from grpo_fast.intmath import ceil_div

from ._hash import ROOT_HASH, block_hash
from .errors import OutOfBlocksError


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class PyBlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_cache: bool = True):
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if num_blocks * block_size > 2**31 - 1:  # slots are int32 in the kernels
            raise ValueError("num_blocks * block_size must fit in int32")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._prefix = bool(enable_prefix_cache)
        self._ref = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._block_hash: dict[int, int] = {}
        self._block_tokens: dict[int, tuple[int, ...]] = {}
        self._seqs: dict[int, _Seq] = {}
        self._cache_hits = 0  # blocks found in the prefix cache
        self._cache_queries = 0  # full prompt blocks looked up

    # ---- properties -------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._cached_free)

    # ---- internals --------------------------------------------------------------------------
    def _seq(self, seq_id: int) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"seq_id {seq_id!r} is not allocated") from None

    def _take_free(self) -> int:
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._cached_free.popitem(last=False)  # evict least recently used
            self._uncache(b)
        self._ref[b] = 1
        return b

    def _uncache(self, b: int) -> None:
        h = self._block_hash.pop(b, None)
        if h is not None and self._hash_to_block.get(h) == b:
            del self._hash_to_block[h]
        self._block_tokens.pop(b, None)

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        assert self._ref[b] >= 0
        if self._ref[b] == 0:
            if b in self._block_hash:
                self._cached_free[b] = None  # most recently used end
            else:
                self._free.append(b)

    def _lookup(self, h: int, tokens: tuple[int, ...]) -> int | None:
        b = self._hash_to_block.get(h)
        if b is not None and self._block_tokens.get(b) == tokens:
            return b
        return None

    # ---- queries ----------------------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self._block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Conservative: true when the prompt fits even with no prefix-cache hit."""
        return self.blocks_needed(num_tokens) <= self.num_free_blocks

    def can_append(self, seq_id: int) -> bool:
        return self._append_needs_block(self._seq(seq_id)) <= self.num_free_blocks

    def _append_needs_block(self, s: _Seq) -> int:
        if s.num_tokens % self._block_size == 0:
            return 1  # last block full (or none): a fresh block
        return 1 if self._ref[s.blocks[-1]] > 1 else 0  # shared partial block: copy-on-write

    # ---- mutations --------------------------------------------------------------------------
    def allocate(self, seq_id: int, token_ids) -> int:
        tokens = [int(t) for t in token_ids]
        if seq_id in self._seqs:
            raise ValueError(f"seq_id {seq_id!r} is already allocated")
        if not tokens:
            raise ValueError("token_ids must not be empty")
        bs = self._block_size
        n_blocks = self.blocks_needed(len(tokens))
        # Prefix-cache lookup over full blocks that end before the last token: the last token is
        # always recomputed (its logits start decoding), and its block is then written.
        hits: list[int] = []
        hashes: list[int] = []
        h = ROOT_HASH
        for i in range(len(tokens) // bs):
            blk = tuple(tokens[i * bs:(i + 1) * bs])
            h = block_hash(h, blk)
            hashes.append(h)
            if self._prefix and (i + 1) * bs < len(tokens) and len(hits) == i:
                b = self._lookup(h, blk)
                if b is not None:
                    hits.append(b)
        cost = (n_blocks - len(hits)) + sum(1 for b in hits if self._ref[b] == 0)
        if cost > self.num_free_blocks:
            raise OutOfBlocksError(
                f"allocate({seq_id}): needs {cost} free blocks, {self.num_free_blocks} free")
        if self._prefix:
            self._cache_queries += min(len(hashes), (len(tokens) - 1) // bs)
            self._cache_hits += len(hits)
        s = _Seq()
        for b in hits:
            if self._ref[b] == 0:
                del self._cached_free[b]
            self._ref[b] += 1
            s.blocks.append(b)
        for i in range(len(hits), n_blocks):
            b = self._take_free()
            s.blocks.append(b)
            if self._prefix and i < len(hashes) and hashes[i] not in self._hash_to_block:
                # Registered now; its KV is written by this sequence's prefill (see BlockManager).
                self._hash_to_block[hashes[i]] = b
                self._block_hash[b] = hashes[i]
                self._block_tokens[b] = tuple(tokens[i * bs:(i + 1) * bs])
        s.num_tokens = len(tokens)
        self._seqs[seq_id] = s
        return len(hits) * bs

    def fork(self, parent_id: int, child_ids) -> None:
        p = self._seq(parent_id)
        child_ids = list(child_ids)
        if len(set(child_ids)) != len(child_ids):
            raise ValueError(f"child_ids has duplicates: {child_ids}")
        for c in child_ids:
            if c in self._seqs:
                raise ValueError(f"child id {c!r} is already allocated")
        for c in child_ids:
            for b in p.blocks:
                self._ref[b] += 1
            self._seqs[c] = _Seq(list(p.blocks), p.num_tokens)

    def append_token(self, seq_id: int) -> list[tuple[int, int]]:
        s = self._seq(seq_id)
        need = self._append_needs_block(s)
        if need > self.num_free_blocks:
            raise OutOfBlocksError(f"append_token({seq_id}): no free block")
        copies: list[tuple[int, int]] = []
        if s.num_tokens % self._block_size == 0:
            s.blocks.append(self._take_free())
        elif self._ref[s.blocks[-1]] > 1:
            src = s.blocks[-1]
            dst = self._take_free()
            self._ref[src] -= 1  # still held by others, never reaches 0 here
            s.blocks[-1] = dst
            copies.append((src, dst))
        s.num_tokens += 1
        return copies

    def free(self, seq_id: int) -> None:
        s = self._seq(seq_id)
        for b in reversed(s.blocks):  # tail first: the prompt head stays cached longest
            self._release(b)
        del self._seqs[seq_id]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (call after a weight update: cached KV is stale)."""
        for b in list(self._cached_free):
            self._uncache(b)
            self._free.append(b)
        self._cached_free.clear()
        for b in list(self._block_hash):
            self._uncache(b)

    # ---- views ------------------------------------------------------------------------------
    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def num_tokens(self, seq_id: int) -> int:
        return self._seq(seq_id).num_tokens

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def slot_mapping(self, seq_id: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        s = self._seq(seq_id)
        end = s.num_tokens if end is None else end
        if not 0 <= start <= end <= s.num_tokens:
            raise ValueError(f"slot range [{start}, {end}) outside [0, {s.num_tokens}]")
        bs = self._block_size
        return torch.tensor([s.blocks[i // bs] * bs + i % bs for i in range(start, end)],
                            dtype=torch.int32)

    def decode_metadata(self, seq_ids, max_blocks: int | None = None):
        seqs = [self._seq(i) for i in seq_ids]
        width = max((len(s.blocks) for s in seqs), default=0)
        if max_blocks is not None:
            if max_blocks < width:
                raise ValueError(f"max_blocks={max_blocks} < longest block table {width}")
            width = max_blocks
        bs = self._block_size
        slots = torch.empty(len(seqs), dtype=torch.int32)
        tables = torch.full((len(seqs), width), -1, dtype=torch.int32)
        lens = torch.empty(len(seqs), dtype=torch.int32)
        for r, s in enumerate(seqs):
            last = s.num_tokens - 1
            slots[r] = s.blocks[last // bs] * bs + last % bs
            tables[r, :len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
            lens[r] = s.num_tokens
        return slots, tables, lens

    def stats(self) -> dict[str, int]:
        used = self._num_blocks - self.num_free_blocks
        logical = sum(len(s.blocks) for s in self._seqs.values())
        return {
            "num_blocks": self._num_blocks,
            "blocks_used": used,
            "blocks_logical": logical,
            "blocks_saved_by_sharing": logical - used,
            "cached_free_blocks": len(self._cached_free),
            "prefix_cache_queries": self._cache_queries,
            "prefix_cache_hits": self._cache_hits,
        }
