"""Evaluation on held-out prompts: n completions per prompt (one greedy completion when n = 1,
else n sampled at the eval temperature), scored by any reward functions.

Per reward function f, over the prompts where f scored at least one completion:
    eval/f/mean      mean reward (mean@n: each prompt's mean over its n completions, averaged)
    eval/f/pass@k    for k = 1, 2, 4, ... and n (k <= n): the unbiased estimator
                     pass@k = 1 - C(n - c, k) / C(n, k), c = completions with reward >= threshold,
                     averaged over prompts (Chen et al., 2021)
and eval/completions/mean_length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from grpo_fast import distributed as dist
from grpo_fast.rewards import RewardSet, as_completions, compute_rewards

# Completions per generate call of an evaluation (whole prompts: batch_size // num_generations of them).
EVAL_BATCH_COMPLETIONS = 64


@dataclass
class EvalResult:
    metrics: dict[str, float]
    num_prompts: int
    samples: list[dict] = field(default_factory=list)  # a few (prompt, completion, rewards) for the logs

    @property
    def accuracy(self) -> float | None:
        """eval/accuracy/mean, when accuracy was evaluated."""
        return self.metrics.get("eval/accuracy/mean")


def ks_for(n: int) -> list[int]:
    """k = 1, 2, 4, ... below n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k completions drawn without replacement from n, c of
    them correct, is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(generator, tokenizer, encoded: list, rewards: RewardSet, *, max_tokens: int, num_generations: int = 1,
             temperature: float = 1.0, stop=None, success_threshold: float = 1.0, seed: int = 0, batch_size: int = EVAL_BATCH_COMPLETIONS,
             num_samples: int = 3, trainer_state=None, tools=None, data_cfg=None) -> EvalResult:
    """Evaluate `encoded` prompts (EncodedPrompt list) with `rewards` (see the module docstring).
    tools (a grpo_fast.rollout.ToolSetup, with data_cfg to render the rows): multi-turn, as in
    training; reward functions then see whole conversations. Under torchrun each rank runs its
    share of the prompts (whole chunks of batch_size completions) and every rank returns the
    whole set's metrics, the same as one process's."""
    n = num_generations
    per_batch = max(1, batch_size // n)
    # Data parallel: each rank runs its contiguous share of the prompts, in chunks, and the
    # results are gathered in prompt order: the metrics are one process's.
    share = dist.shard_range(len(encoded))

    def run_chunk(start: int):
        """One chunk's [F][prompt][scored completion] rewards, completion lengths and samples.
        Each prompt's completions are seeded by its index in the whole eval set (first_group), so
        how the set is chunked or split across ranks does not change them (paged sampler)."""
        chunk = encoded[start:min(start + per_batch, share.stop)]
        trajectories = None if tools is None else tools.start_prompts(chunk, data_cfg, n)
        groups = generator.generate([e.ids for e in chunk] if trajectories is None else trajectories.prompt_ids, n=n,
                                    temperature=0.0 if n == 1 else temperature, max_tokens=max_tokens,
                                    stop=stop if tools is None else tools.stops(stop),
                                    seed=seed, first_group=start, turn_handler=trajectories)
        prompts, texts, columns = [], [], {k: [] for e in chunk for k in e.row if k != "prompt"}
        comp_ids, reasons, lengths = [], [], []
        for e, g in zip(chunk, groups):
            for c in g.completions:
                prompts.append(e.row["prompt"])
                texts.append(tokenizer.decode(c.token_ids, skip_special_tokens=True))
                comp_ids.append(list(c.token_ids))
                reasons.append(c.finish_reason)
                lengths.append(len(c.token_ids))
                for k in columns:
                    columns[k].append(e.row.get(k))
        columns.update(completion_ids=comp_ids, completion_lengths=[len(c) for c in comp_ids], finish_reasons=reasons)
        completions = as_completions(texts, prompts)
        if trajectories is not None:
            completions, columns["environments"] = trajectories.reward_inputs()
        result = compute_rewards(rewards, prompts, completions, columns, trainer_state=trainer_state)
        values = result.rewards.view(len(chunk), n, len(rewards.names))  # [P, n, F]
        scored = [[values[p, :, j][~torch.isnan(values[p, :, j])].tolist() for p in range(len(chunk))]
                  for j in range(len(rewards.names))]
        samples = [{"prompt": chunk[p].row["prompt"], "completion": texts[p * n], "answer": chunk[p].row.get("answer"),
                    **{f"rewards/{name}": _value(values[p, 0, j]) for j, name in enumerate(rewards.names)}}
                   for p in range(min(len(chunk), num_samples))]
        return [[v for v in per_prompt if v] for per_prompt in scored], lengths, samples

    with dist.fail_together("evaluating its share of the eval prompts"):
        mine = [run_chunk(start) for start in range(share.start, share.stop, per_batch)]
    chunks = [c for rank_chunks in dist.all_gather_object(mine) for c in rank_chunks]
    per_func: list[list[list[float]]] = [[v for c in chunks for v in c[0][j]] for j in range(len(rewards.names))]
    lengths = [x for c in chunks for x in c[1]]
    samples = [x for c in chunks for x in c[2]][:num_samples]
    metrics: dict[str, float] = {}
    for j, name in enumerate(rewards.names):
        prompts_scored = per_func[j]
        if not prompts_scored:
            continue
        metrics[f"eval/{name}/mean"] = sum(sum(v) / len(v) for v in prompts_scored) / len(prompts_scored)
        for k in ks_for(n):
            rows = [v for v in prompts_scored if len(v) >= k]
            if rows:
                metrics[f"eval/{name}/pass@{k}"] = sum(
                    pass_at_k(len(v), sum(x >= success_threshold for x in v), k) for v in rows) / len(rows)
    if lengths:
        metrics["eval/completions/mean_length"] = sum(lengths) / len(lengths)
    return EvalResult(metrics, len(encoded), samples)


def _value(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v
