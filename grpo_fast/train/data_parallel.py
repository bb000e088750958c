"""A step split across ranks by whole groups (grpo_fast.distributed is the only thing that knows
how many there are; with one process every function here is the plain one-process step).

The prompt stream is global: every rank draws the same prompts each round (the stream's position
is the one-process run's, so a checkpoint resumes under any world size), and each rank samples
and scores only its contiguous share of the groups (`shard_range`). The scored groups are then
gathered, so every rank holds the round's groups in the order one process would have built
them: dynamic sampling decides on the whole batch (every rank takes the same rounds), and the
advantages (scale_rewards batch, GDPO's batch z-score) are computed over the whole batch, exactly.
The update then trains each rank on its own rows (`shard_rollout`), with global normalizers and
all-reduced gradients (train/update.py).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from grpo_fast import distributed as dist
from grpo_fast.train.rollout_batch import SequenceBatch


def sample_share(prompts: list, sample, stats: dict) -> list:
    """`sample(share, counts, first_group) -> groups` on this rank's share of `prompts` (it adds
    its reward error counts into `counts`; first_group = the share's offset in `prompts`); returns every rank's groups in prompt order and adds every rank's
    counts into `stats`. A failure on any rank (a reward function raising, an OOM) is raised on
    every rank (distributed.fail_together)."""
    mine_range = dist.shard_range(len(prompts))
    share = prompts[mine_range]
    counts = {"reward_errors": 0}
    with dist.fail_together("sampling and scoring its groups"):
        mine = sample(share, counts, mine_range.start) if share else []
    groups, everyone = [], dist.all_gather_object((mine, counts))
    for rank_groups, rank_counts in everyone:
        groups.extend(rank_groups)
        for key, value in rank_counts.items():
            stats[key] = stats.get(key, 0) + value
    return groups


def shard_rollout(rollout, num_generations: int):
    """This rank's whole groups of a rollout of N = B·G rows: rows [r·B/W·G, (r+1)·B/W·G). Every
    row-indexed field is cut (tensors and lists of N, the SequenceBatch); the rest is shared."""
    n = len(rollout.batch)
    groups = dist.shard_range(n // num_generations)
    rows = slice(groups.start * num_generations, groups.stop * num_generations)
    cut = {}
    for f in dataclasses.fields(rollout):
        value = getattr(rollout, f.name)
        if isinstance(value, SequenceBatch):
            cut[f.name] = value.select(rows)
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            cut[f.name] = value[rows]
        elif isinstance(value, list) and len(value) == n:
            cut[f.name] = value[rows]
        else:
            cut[f.name] = value
    return dataclasses.replace(rollout, **cut)


def check_divisible(prompts_per_step: int) -> None:
    """A group never spans ranks: B prompts split into W equal shares of whole groups."""
    W = dist.world_size()
    if prompts_per_step % W:
        from grpo_fast.errors import ConfigError

        raise ConfigError(f"train.prompts_per_step: {prompts_per_step} prompts cannot be split evenly across "
                          f"{W} ranks (each rank trains on whole groups); use a multiple of {W}")


def gather_values(values: torch.Tensor) -> torch.Tensor:
    """The 1-D tensors of every rank, concatenated in rank order (e.g. the entropies of the
    masked tokens, for the top_entropy_quantile threshold of the whole batch)."""
    if dist.world_size() == 1:
        return values
    parts = dist.all_gather_object(values.detach().cpu())
    return torch.cat(parts).to(values.device)


def rank_config(cfg, world_size: int | None = None):
    """The config as one rank's memory sees it: its B / W prompts of the step (the memory plan,
    the token budget of its micro-batches). One process: cfg itself. world_size: W (default:
    this run's; `grpo-fast plan --nproc` plans another)."""
    W = dist.world_size() if world_size is None else world_size
    if W == 1:
        return cfg
    share = copy.deepcopy(cfg)
    share.train.prompts_per_step = max(1, cfg.train.prompts_per_step // W)
    return share
