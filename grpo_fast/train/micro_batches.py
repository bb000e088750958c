"""How a step's completions are split into micro-batches (one forward + backward each).

By count (train.micro_batch_size completions) or by tokens (train.micro_batch_tokens): rows are
taken in order while the packed forward's tokens — each group's prompt once plus every
completion — stay within the budget; a group longer than the budget is split at completion
boundaries, and a single completion longer than the budget runs alone. Long completions then
cannot overflow a micro-batch sized for short ones, and short ones do not waste it. Either way
the loss normalizers are the whole step's, so the gradient does not depend on the split.
"""

from __future__ import annotations

from grpo_fast.train.rollout_batch import SequenceBatch


def micro_batches(batch: SequenceBatch, size: int = 0, tokens: int | None = None) -> list[slice]:
    """Row slices covering the batch in order."""
    n = len(batch)
    if not tokens:
        step = size or n
        return [slice(s, min(s + step, n)) for s in range(0, n, step)]
    P = batch.prompt_width
    prompt_len = batch.attention_mask[:, :P].sum(1).tolist()  # [N]
    comp_len = batch.attention_mask[:, P:].sum(1).tolist()  # [N]
    same_prompt = [i > 0 and bool((batch.input_ids[i, :P] == batch.input_ids[i - 1, :P]).all()) for i in range(n)]
    out, start, used = [], 0, 0
    for i in range(n):
        cost = max(comp_len[i] - 1, 0) + (0 if (i > start and same_prompt[i]) else prompt_len[i])
        if i > start and used + cost > tokens:
            out.append(slice(start, i))
            start, used = i, prompt_len[i] + max(comp_len[i] - 1, 0)
        else:
            used += cost
    out.append(slice(start, n))
    return out
