"""Which sequences run next: admit waiting prompts when blocks allow, decode every live sequence,
preempt (by recompute) when blocks run out.

Policy (GRPO-shaped): a fresh group is prefilled once and forked into its G completions; every
step then decodes all running sequences together. Finished sequences free their blocks at once,
and waiting work is admitted as soon as the freed blocks cover it. When a running sequence cannot
get a block for its next token, the most recently admitted running sequence is preempted: its
blocks are freed and it goes to the front of the queue, to be recomputed (prefill of prompt +
its completion so far) later. Nothing is ever dropped.
"""

from __future__ import annotations

from collections import deque

from grpo_fast.sampler.block_manager import BlockManager
from grpo_fast.sampler.sequence import Group, PrefillItem, Sequence, SeqStatus, prefill_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_prefill_tokens: int):
        self.bm = block_manager
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[PrefillItem] = deque()
        self.running: list[Sequence] = []  # in admission order: preemption takes from the end
        self.num_preemptions = 0

    def add(self, group: Group) -> None:
        self.waiting.append(group)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule_prefill(self) -> list[tuple[PrefillItem, int]]:
        """Admit waiting items in order while their prompt tokens fit the prefill batch and the
        pool keeps one free block per running / newly forked sequence (headroom for the next
        token, so an admission does not preempt someone on the very next step). With nothing
        running, the head item is admitted whenever it fits at all, so progress is guaranteed.
        Returns (item, number of prompt tokens already cached) for each admitted item."""
        admitted: list[tuple[PrefillItem, int]] = []
        batch_tokens = 0
        headroom = len(self.running)
        while self.waiting:
            item = self.waiting[0]
            tokens = prefill_tokens(item)
            new_seqs = len(item.children) if isinstance(item, Group) else 1
            if admitted and batch_tokens + len(tokens) > self.max_prefill_tokens:
                break
            need = self.bm.blocks_for(len(tokens)) + headroom + new_seqs
            nothing_live = not self.running and not admitted
            if not self.bm.can_allocate(item):
                break
            if self.bm.num_free_blocks < need and not nothing_live:
                break
            self.waiting.popleft()
            num_cached = self.bm.allocate(item)
            admitted.append((item, num_cached))
            batch_tokens += len(tokens)
            headroom += new_seqs
        return admitted

    def start_running(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)

    def schedule_decode(self) -> tuple[list[Sequence], list[tuple[int, int]]]:
        """Reserve a KV slot for every running sequence's pending token, preempting from the
        back when the pool is exhausted. Returns the sequences to decode this step and the
        copy-on-write (src, dst) block pairs to copy before the forward writes."""
        queue = deque(self.running)
        scheduled: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        while queue:
            seq = queue.popleft()
            while not self.bm.can_append(seq):
                if queue:
                    self.preempt(queue.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                copies.extend(self.bm.append(seq))
                scheduled.append(seq)
        self.running = scheduled
        return list(scheduled), copies  # a copy: finish() edits self.running

    def preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def pause(self, seq: Sequence) -> None:
        """A turn ended and the environment answers next: the sequence leaves the decode batch
        but keeps its blocks (its pending last token is written with the environment's tokens)."""
        seq.status = SeqStatus.PAUSED
        self.running = [s for s in self.running if s is not seq]

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (RUNNING, PAUSED or just forked): free its blocks now."""
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.bm.free(seq)
        self.running = [s for s in self.running if s is not seq]
