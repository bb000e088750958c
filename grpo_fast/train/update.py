"""One optimizer update over a rollout, in micro-batches whose gradients add up to the whole
step's: each micro-batch loss is normalized by the whole step's token / sequence counts.

A NaN / inf loss or gradient would write NaNs into the weights (and every later save): that
update is skipped, schedule included, and reported (`skipped_update`) for the trainer to count.
"""

from __future__ import annotations

import math

import torch

from grpo_fast.train.memory import release_free_memory
from grpo_fast.train.model import PolicyModules
from grpo_fast.train.policy_loss import policy_loss
from grpo_fast.train.rollout_batch import Rollout

# Our loss metric names -> TRL's.
_TRL_NAMES = {"clip_ratio/low": "clip_ratio/low_mean", "clip_ratio/high": "clip_ratio/high_mean",
              "clip_ratio/region": "clip_ratio/region_mean"}


def optimizer_update(policy: PolicyModules, optimizer, scheduler, params, rollout: Rollout, old, ref, cfg, *,
                     num_items: float, num_seqs: int) -> dict:
    """Loss, gradient, one optimizer and scheduler step; returns the token-weighted loss metrics
    (TRL's names), loss, grad_norm and skipped_update (0 / 1)."""
    t, lc = cfg.train, cfg.loss
    n = len(rollout.batch)
    size = t.micro_batch_size or n
    sums: dict[str, float] = {}
    total_loss = 0.0
    for start in range(0, n, size):
        rows = slice(start, start + size)
        part = rollout.batch.select(rows)
        loss, metrics = policy_loss(
            policy, part, rollout.advantages[rows], None if old is None else old[rows],
            None if ref is None else ref[rows], loss_cfg=lc, temperature=cfg.sampling.temperature,
            max_completion_length=cfg.sampling.max_completion_length, num_items_in_batch=num_items,
            num_sequences_in_batch=num_seqs)
        loss.backward()
        release_free_memory()  # this micro-batch's activations, so the next one starts from the live set
        total_loss += float(loss.detach())
        tokens = float(metrics["num_tokens"])
        for k, v in metrics.items():  # token-weighted means over micro-batches
            if k != "num_tokens":
                key = _TRL_NAMES.get(k, k)
                sums[key] = sums.get(key, 0.0) + float(v) * tokens
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")))
    finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    out = {k: v / max(num_items, 1.0) for k, v in sums.items()}
    out.update(loss=total_loss, grad_norm=grad_norm, skipped_update=int(not finite))
    return out
