"""Each group's prompt run once per pass, when the pass's micro-batches split groups.

A micro-batch smaller than a group (train.micro_batch_size < G, or token-budget cuts) would run
the group's prompt once per micro-batch it touches: k passes over P tokens, forward and backward,
where one does. With long prompts that is most of the training time (P = 1,024, G = 8, micro-batch
2: the prompt four times per group). Instead:

    forward, once per group:   prompt -> K/V at every layer + last hidden state   (graph kept)
    every micro-batch:         completions over leaf copies of them, loss, backward
                               (the leaves' .grad add up over the group's micro-batches)
    after the group's last:    backward through the prompt's graph with those sums

The chain rule makes the sum of the leaves' gradients, pushed through the prompt once, equal to
the prompt's gradient in any split (one pass per micro-batch, or the whole group in one), so the
step's gradient is unchanged; tests/test_group_prompts.py holds it to the whole-group pass.
Memory: one group's prompt activations live across its micro-batches (a split pass builds them
in each). Scoring passes (no_grad) reuse the K/V the same way and keep no graph.
"""

from __future__ import annotations

import torch

from grpo_fast.train.layout_cost import group_prompts_pay, run_starts
from grpo_fast.train.packed_forward import (PromptPrefix, exceeds_window, is_checkpointed, prompt_runs,
                                            run_lengths, run_prompts)
from grpo_fast.train.rollout_batch import SequenceBatch


class GroupPrompts:
    """The prompts of one pass over `batch` (row slices `cuts`), each group's run once, on first
    use, for all the micro-batches that hold its rows. Use:

        prompts = GroupPrompts.for_pass(decoder, batch, cuts)    # None: nothing to share
        for rows in cuts:
            prefix = prompts.prefix(rows)          # completion_hidden(..., prefix=prefix)
            ... loss.backward()
            prompts.finish(rows)                   # backward through the prompts done with
    """

    def __init__(self, decoder, batch: SequenceBatch, runs: list[int]):
        self.decoder, self.batch = decoder, batch
        self.starts = run_starts(runs)
        self.ends = [s + n for s, n in zip(self.starts, runs)]
        # run -> (the leaves of the decoder call that ran its prompt, its index there, that call)
        self._leaves: dict[int, tuple[PromptPrefix, int, int]] = {}
        # per call: (its outputs with their graph, their leaves, the runs still to finish); None
        # once backpropagated, or when it kept no graph (no_grad)
        self._calls: list[tuple[PromptPrefix, PromptPrefix, set[int]] | None] = []

    @classmethod
    def for_pass(cls, decoder, batch: SequenceBatch, cuts: list[slice | None] | None) -> "GroupPrompts | None":
        """A GroupPrompts when `cuts` split a group and running its prompt once pays; else None
        (each micro-batch then runs its own rows whole: completion_hidden's layouts)."""
        if not cuts or any(rows is None for rows in cuts) or getattr(decoder, "collective", False):
            return None  # FSDP: every rank runs the same (packed) decoder calls
        if is_checkpointed(decoder):
            return None  # HF drops caches under gradient checkpointing
        if exceeds_window(getattr(decoder, "config", None), batch):
            return None  # HF's own masks (the plain pass) apply the window
        runs = prompt_runs(batch.input_ids[:, :batch.prompt_width])
        if runs is None or not saves_enough(batch, runs, cuts):
            return None
        return cls(decoder, batch, runs)

    def _runs_in(self, rows: slice) -> list[tuple[int, int]]:
        """(run, rows of it in `rows`) for each run that `rows` overlaps, in order."""
        start, stop = rows.indices(len(self.batch))[:2]
        return [(r, min(e, stop) - max(s, start)) for r, (s, e) in enumerate(zip(self.starts, self.ends))
                if s < stop and e > start]

    def prefix(self, rows: slice) -> PromptPrefix:
        """The prompt prefix of every row of `rows`, running the prompts of groups seen first here
        (in one decoder call); each row reads its group's leaves (gradients add up on them)."""
        overlap = self._runs_in(rows)
        new = [r for r, _ in overlap if r not in self._leaves]
        if new:
            first_rows = torch.tensor([self.starts[r] for r in new], device=self.batch.input_ids.device)
            graph = run_prompts(self.decoder, self.batch, first_rows)  # [len(new)] prompts
            grad = torch.is_grad_enabled()
            leaves = graph.map(lambda t: t.detach().requires_grad_(grad))
            self._calls.append((graph, leaves, set(new)) if grad else None)
            for i, r in enumerate(new):
                self._leaves[r] = (leaves, i, len(self._calls) - 1)
        parts = []
        for r, n in overlap:
            leaves, i, _ = self._leaves[r]
            parts.append(leaves.map(lambda t, i=i, n=n: t[i:i + 1].expand(n, *t.shape[1:])))  # [n, ...]
        return _concat(parts)

    def finish(self, rows: slice) -> None:
        """After `rows`' backward: the groups whose last rows these were are done; backpropagate
        through each decoder call's prompts once all of its groups are (no_grad: just forget them)."""
        stop = rows.indices(len(self.batch))[1]
        for r, _ in self._runs_in(rows):
            if self.ends[r] > stop or r not in self._leaves:
                continue
            _, _, call = self._leaves.pop(r)
            entry = self._calls[call]
            if entry is None:
                continue
            graph, leaves, left = entry
            left.discard(r)
            if not left:
                self._calls[call] = None
                pairs = [(g, l.grad) for g, l in zip(graph.tensors(), leaves.tensors()) if l.grad is not None]
                if pairs:
                    torch.autograd.backward([g for g, _ in pairs], [d for _, d in pairs])


def _concat(parts: list[PromptPrefix]) -> PromptPrefix:
    if len(parts) == 1:
        return parts[0]
    layers = len(parts[0].keys)
    return PromptPrefix([torch.cat([p.keys[l] for p in parts]) for l in range(layers)],
                        [torch.cat([p.values[l] for p in parts]) for l in range(layers)],
                        torch.cat([p.last_hidden for p in parts]))


def saves_enough(batch: SequenceBatch, runs: list[int], cuts: list[slice]) -> bool:
    """Whether running each split group's prompt once saves enough (layout_cost.group_prompts_pay,
    on the batch's real prompt and completion lengths)."""
    bounds = [rows.indices(len(batch))[:2] for rows in cuts]
    groups = [(prompt, completions, sum(1 for a, b in bounds if a < first + n and b > first))  # micro-batches touching it
              for first, n, prompt, completions in run_lengths(batch, runs)]
    return group_prompts_pay(groups)
