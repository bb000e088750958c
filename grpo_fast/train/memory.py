"""Giving freed host memory back to the OS between the phases of a step.

CPU tensors live on the C heap (glibc malloc). Activations freed after a backward pass, or the
temporaries of a sampling phase, leave free pages inside the heap that stay resident: the
process's resident set then keeps the high-water mark of the largest phase plus the holes
fragmentation leaves, and grows over the micro-batches of a step. `malloc_trim(0)` hands every
wholly free page back (madvise), so each micro-batch starts from the live set. The walk of the
heap's free lists is cheap; handing back and faulting in again the pages of a micro-batch's
activations is not: 100-130 ms for the trim alone at ~1.5 GiB (SmolLM2-135M, 8 x 168 tokens),
and the training phase took 1.06-1.25x the time it takes with one trim a step. `train.release_memory` chooses (the trainer
and grpo_fast/train/update.py call this; benchmarks/RESULTS.md, "When freed memory goes back").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to trim, nothing to do
        return None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS; False where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
