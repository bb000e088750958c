"""Errors of the KV-cache core."""


class OutOfBlocksError(RuntimeError):
    """The block pool has no free block for a request.

    Raised by `BlockManager.allocate` / `append_token` (and `fork` never, it allocates nothing).
    The manager's state is unchanged when it is raised, so the scheduler can preempt a sequence
    (`free` it, re-queue its tokens for recompute) and retry.
    """
