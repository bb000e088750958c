"""`BlockManager`: the C++ manager (grpo_fast._C.BlockManager) behind the Python contract.

Contract (shared with the pure-Python twin `PyBlockManager`, used when the extension is absent):
- a pool of `num_blocks` blocks of `block_size` token slots; slot = block * block_size + offset;
- `allocate(seq_id, token_ids) -> cached`: reserves slots for the prompt; the first `cached`
  tokens (a multiple of block_size, always < len(token_ids)) already have KV through the prefix
  cache, so prefill computes K/V for tokens [cached, n) only and reads the rest from the blocks.
  Full prompt blocks enter the prefix cache at allocate: write their KV (prefill) before any
  later sequence is allocated against them, and call `reset_prefix_cache()` after every weight
  update (cached KV of old weights is stale);
- `fork(parent, children)`: each child shares every parent block, the partial last one included;
- `append_token(seq_id) -> [(src, dst)]`: reserves the slot of one new token (its KV is
  written by the next forward at `decode_metadata`'s slot). A shared partial last block is
  first copied (copy-on-write): run `copy_blocks` on the pairs BEFORE writing. The last holder
  of a shared block writes in place, so a group of G children copies it G - 1 times at most;
- `free(seq_id)`: releases blocks in reverse order (the prompt head stays cached longest);
- running out of blocks raises `OutOfBlocksError` and leaves the state unchanged.
"""
from __future__ import annotations

import torch

from grpo_fast.intmath import ceil_div

from .errors import OutOfBlocksError  # noqa: F401  (raised by the native code)
from .py_block_manager import PyBlockManager

try:
    from grpo_fast._C import BlockManager as _Native  # type: ignore[attr-defined]
except ImportError:
    _Native = None


class NativeBlockManager:
    """Thin wrapper over the C++ manager: same methods, torch int32 tensors out."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_cache: bool = True):
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self._m = _Native(num_blocks, block_size, bool(enable_prefix_cache))

    block_size = property(lambda self: self._m.block_size)
    num_blocks = property(lambda self: self._m.num_blocks)
    num_free_blocks = property(lambda self: self._m.num_free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self._m.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self._m.can_allocate(num_tokens)

    def can_append(self, seq_id: int) -> bool:
        return self._m.can_append(seq_id)

    def allocate(self, seq_id: int, token_ids) -> int:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self._m.allocate(seq_id, list(token_ids))

    def fork(self, parent_id: int, child_ids) -> None:
        self._m.fork(parent_id, list(child_ids))

    def append_token(self, seq_id: int) -> list[tuple[int, int]]:
        return self._m.append_token(seq_id)

    def free(self, seq_id: int) -> None:
        self._m.free(seq_id)

    def reset_prefix_cache(self) -> None:
        self._m.reset_prefix_cache()

    def has_seq(self, seq_id: int) -> bool:
        return self._m.has_seq(seq_id)

    def block_table(self, seq_id: int) -> list[int]:
        return self._m.block_table(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        return self._m.num_tokens(seq_id)

    def ref_count(self, block: int) -> int:
        return self._m.ref_count(block)

    def slot_mapping(self, seq_id: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """int32 [end - start] slots of tokens [start, end) of the sequence."""
        return torch.from_numpy(self._m.slot_mapping(seq_id, start, -1 if end is None else end))

    def decode_metadata(self, seq_ids, max_blocks: int | None = None):
        """(slot_mapping int32 [S] of each sequence's last token, block_tables int32
        [S, max_blocks] padded with -1, context_lens int32 [S] = num_tokens)."""
        s, t, n = self._m.decode_metadata(list(seq_ids), -1 if max_blocks is None else max_blocks)
        return torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(n)

    def stats(self) -> dict[str, int]:
        used = self._m.num_blocks - self._m.num_free_blocks
        logical = self._m.blocks_logical()
        return {
            "num_blocks": self._m.num_blocks,
            "blocks_used": used,
            "blocks_logical": logical,
            "blocks_saved_by_sharing": logical - used,
            "cached_free_blocks": self._m.cached_free_blocks(),
            "prefix_cache_queries": self._m.cache_queries(),
            "prefix_cache_hits": self._m.cache_hits(),
        }


BlockManager = NativeBlockManager if _Native is not None else PyBlockManager
