"""The sampler's view of the paged KV block manager: the pool of grpo_fast.kv.BlockManager
(C++, or its Python twin without a native build) addressed by Group and Sequence instead of raw
sequence ids, and the usage figures the stats report.

One per generate call: its prefix cache holds K/V of the weights as they were during the call,
and the policy changes between GRPO steps.
"""

from __future__ import annotations

from grpo_fast import kv
from grpo_fast.intmath import ceil_div
from grpo_fast.sampler.sequence import Group, PrefillItem, Sequence, prefill_seq_id, prefill_tokens


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pool = kv.BlockManager(num_blocks, block_size=block_size, enable_prefix_cache=True)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.pool.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self.block_size)

    def can_allocate(self, item: PrefillItem) -> bool:
        return self.pool.can_allocate(len(prefill_tokens(item)))

    def allocate(self, item: PrefillItem) -> int:
        """Blocks for the item's prefill tokens; returns how many of them the prefix cache holds."""
        return self.pool.allocate(prefill_seq_id(item), prefill_tokens(item))

    def fork(self, group: Group) -> None:
        """The prefilled prompt's blocks become every child's (the partial last one included)."""
        self.pool.fork(group.prefill_id, [c.seq_id for c in group.children])
        self.pool.free(group.prefill_id)

    def can_append(self, seq: Sequence) -> bool:
        return self.pool.can_append(seq.seq_id)

    def append(self, seq: Sequence) -> list[tuple[int, int]]:
        """Reserve the slot of the sequence's pending token; (src, dst) copy-on-write pairs."""
        return self.pool.append_token(seq.seq_id)

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.seq_id)

    def blocks_saved_by_sharing(self, seqs: list[Sequence]) -> int:
        """(blocks these sequences would hold unshared) - (blocks the pool actually uses)."""
        unshared = sum(self.blocks_for(self.pool.num_tokens(s.seq_id)) for s in seqs)
        return unshared - self.num_used_blocks
