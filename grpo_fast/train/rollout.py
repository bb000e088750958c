"""One step's experience: B prompts × G completions, sampled, scored and turned into advantages,
with the step's sampling and reward metrics under TRL's names.

With dynamic sampling (DAPO), groups whose advantages are all 0 carry no signal (their scored
rewards are all equal; completions where every reward function abstained do not count): they are
dropped and more prompts drawn (up to train.max_dynamic_rounds extra rounds) until B informative
groups are kept.
"""

from __future__ import annotations

import torch

from grpo_fast.data.prompts import EncodedPrompt
from grpo_fast.errors import DataError
from grpo_fast.loss import compute_advantages, informative_groups
from grpo_fast.rollout.agent_loop import tool_metrics
from grpo_fast.rewards import as_completions, compute_rewards
from grpo_fast.train.data_parallel import sample_share
from grpo_fast.train.rollout_batch import Rollout, make_batch


def step_seed(seed: int, step: int, round_: int) -> int:
    """Sampling seed of a step: a function of (seed, step), not of RNG history, so a resumed run
    samples exactly what the uninterrupted one would have."""
    return (seed * 1_000_003 + step * 7919 + round_ * 104_729) % (2**31 - 1)


def collect_rollout(model, tokenizer, generator, stream, rewards, cfg, step: int, trainer_state=None,
                    tools=None) -> Rollout:
    """Sample, score and compute advantages for one step (see the module docstring). tools: the
    run's grpo_fast.rollout.ToolSetup (multi-turn: see sample_with_tools), or None."""
    t, s, G = cfg.train, cfg.sampling, cfg.sampling.num_generations
    kept: list[dict] = []
    dropped: list[dict] = []
    stats = {"reward_errors": 0, "dynamic_rounds": 0, "zero_std_groups": 0}
    for round_ in range(1 + (t.max_dynamic_rounds if t.dynamic_sampling else 0)):
        need = t.prompts_per_step - len(kept)
        if need <= 0:
            break
        prompts = stream.take(t.prompts_per_step if round_ == 0 else need)

        def sample(prompts, stats, first_group, round_=round_):  # this rank's share of the groups (data_parallel.py)
            # one seed for the step on every rank; each group's sequences are seeded by its index
            # in the whole batch (first_group + i): N ranks sample what one process would
            seed = step_seed(t.seed, step, round_)
            if tools is not None:
                return sample_with_tools(prompts, generator, tools, tokenizer, rewards, stats, cfg, seed,
                                         trainer_state, first_group)
            groups = generator.generate([p.ids for p in prompts], n=G, temperature=s.temperature,
                                        max_tokens=s.max_completion_length, top_p=s.top_p, top_k=s.top_k,
                                        min_p=s.min_p, stop=s.stop, seed=seed, first_group=first_group)
            return score_groups(prompts, groups, tokenizer, rewards, stats, trainer_state)

        scored = sample_share(prompts, sample, stats)  # every rank's groups, in prompt order
        stats["dynamic_rounds"] = round_
        signal = informative_groups(torch.cat([g["rewards"] for g in scored], 0), G, rewards.weight_tensor,
                                    cfg.loss.multi_objective_aggregation).tolist()  # [groups]
        for g, informative in zip(scored, signal):
            stats["zero_std_groups"] += int(not informative)  # sampled this step, dropped or kept
            (dropped if (t.dynamic_sampling and not informative) else kept).append(g)
    # Not enough informative groups after the last round: fill up with dropped ones (advantage 0).
    kept = (kept + dropped)[: t.prompts_per_step]

    prompt_ids = [g["prompt_ids"] for g in kept for _ in range(G)]
    completion_ids = [ids for g in kept for ids in g["completion_ids"]]
    reasons = [r for g in kept for r in g["finish_reasons"]]
    keep = [r != "length" for r in reasons] if cfg.loss.mask_truncated_completions else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = make_batch(prompt_ids, completion_ids, pad, keep, [m for g in kept for m in g["model_masks"]])
    reward_matrix = torch.cat([g["rewards"] for g in kept], 0)  # [N, F]
    advantages = compute_advantages(reward_matrix, G, scale_rewards=cfg.loss.scale_rewards,
                                    reward_weights=rewards.weight_tensor,
                                    multi_objective_aggregation=cfg.loss.multi_objective_aggregation)
    no_signal = ~informative_groups(reward_matrix, G, rewards.weight_tensor, cfg.loss.multi_objective_aggregation)
    stats["frac_reward_zero_std"] = float(no_signal.float().mean())  # of the kept groups
    stats["completion_tokens"] = sum(len(c) for c in completion_ids)
    stats["prompt_tokens"] = sum(len(p) for p in prompt_ids)
    if generator.last_stats:
        stats["sampler/decode_tokens_per_s"] = generator.last_stats.get("decode_tokens_per_s", 0.0)
    if tools is not None:
        stats.update(tool_metrics([g["tools"] for g in kept], [n for g in kept for n in g["num_turns"]]))
    device = next(model.parameters()).device
    sampled = sampling_logprobs([lp for g in kept for lp in g["logprobs"]], batch.targets.shape[1])
    return Rollout(batch.to(device), advantages.to(device), reward_matrix,
                   torch.cat([g["total"] for g in kept]), [g["prompt"] for g in kept for _ in range(G)],
                   [x for g in kept for x in g["texts"]], reasons, stats, sampled.to(device))


def sampling_logprobs(per_completion: list, width: int) -> torch.Tensor:
    """The sampler's log-prob of each completion token, [N, width] fp32, 0 past each completion's
    end (NaN where the sampler gave none)."""
    out = torch.zeros(len(per_completion), width, dtype=torch.float32)
    for i, lps in enumerate(per_completion):
        if lps:
            out[i, :len(lps)] = torch.tensor([float("nan") if v is None else float(v) for v in lps])
    return out


def sample_with_tools(prompts, generator, tools, tokenizer, rewards, stats, cfg, seed, trainer_state=None,
                      first_group: int = 0):
    """Multi-turn: each row's prompt rendered with the tools' schemas (and its environment's reset
    text), sampled with the rollout as turn handler (the sampler pauses at the parser's stop
    strings, the tools run, their results are appended), then scored on whole trajectories."""
    s, G = cfg.sampling, cfg.sampling.num_generations
    trajectories = tools.start_prompts(prompts, cfg.data, G)
    rendered = [EncodedPrompt(ids, p.row) for ids, p in zip(trajectories.prompt_ids, prompts)]
    too_long = [i for i, ids in enumerate(trajectories.prompt_ids) if len(ids) > s.max_prompt_length]
    if too_long:
        i = too_long[0]
        raise DataError(f"sampling.max_prompt_length: prompt {i} with the tools' descriptions has "
                        f"{len(trajectories.prompt_ids[i])} tokens > {s.max_prompt_length}; raise the limit")
    groups = generator.generate(trajectories.prompt_ids, n=G, temperature=s.temperature,
                                max_tokens=s.max_completion_length, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                                stop=tools.stops(s.stop), seed=seed, turn_handler=trajectories,
                                first_group=first_group)
    scored = score_groups(rendered, groups, tokenizer, rewards, stats, trainer_state, trajectories)
    for i, g in enumerate(scored):
        g["tools"] = trajectories.group_counts(i)
    return scored


def score_groups(prompts, groups, tokenizer, rewards, stats, trainer_state=None, trajectories=None) -> list[dict]:
    """Decode the completions of every group and run the reward functions on them (one call
    per function for the whole round), in TRL's shapes: a conversational prompt's completions
    are assistant messages. Multi-turn (trajectories: the call's grpo_fast.rollout.ToolRollout): a
    completion is the whole conversation after the prompt, and reward functions also get the
    `environments` column (ToolRollout.reward_inputs)."""
    G = len(groups[0].completions)
    texts, comp_ids, reasons, prompt_rows, logprobs = [], [], [], [], []
    columns: dict[str, list] = {k: [] for p in prompts for k in p.row if k != "prompt"}
    for p, g in zip(prompts, groups):
        for c in g.completions:
            comp_ids.append(list(c.token_ids))
            logprobs.append(list(c.logprobs or []))
            texts.append(tokenizer.decode(c.token_ids, skip_special_tokens=True))
            reasons.append(c.finish_reason)
            prompt_rows.append(p.row["prompt"])
            for k in columns:
                columns[k].append(p.row.get(k))
    columns.update(completion_ids=comp_ids, completion_lengths=[len(c) for c in comp_ids], finish_reasons=reasons)
    completions = as_completions(texts, prompt_rows)
    if trajectories is not None:
        completions, columns["environments"] = trajectories.reward_inputs()
    result = compute_rewards(rewards, prompt_rows, completions, columns, trainer_state=trainer_state)
    stats["reward_errors"] += sum(result.errors.values())
    for name, count in result.errors.items():
        stats[f"reward_errors/{name}"] = stats.get(f"reward_errors/{name}", 0) + count
    total = result.total(rewards.weight_tensor)  # [N]
    out = []
    for i, p in enumerate(prompts):
        rows = slice(i * G, (i + 1) * G)
        out.append({"prompt": p.row["prompt"], "prompt_ids": p.ids, "completion_ids": comp_ids[rows],
                    "texts": texts[rows], "finish_reasons": reasons[rows], "rewards": result.rewards[rows],
                    "total": total[rows], "logprobs": logprobs[rows],
                    "model_masks": [c.model_mask for c in groups[i].completions],
                    "num_turns": [c.num_turns for c in groups[i].completions]})
    return out


def rollout_metrics(rollout: Rollout, reward_names: list[str], num_generations: int) -> dict[str, float]:
    """The step's reward and completion metrics, named and defined as TRL defines them: `reward` /
    `reward_std` are the mean / std over the batch of the weighted totals of the completions some
    function scored (abstentions are not zeros), `frac_reward_zero_std` the share of groups
    without signal (their advantages are all 0)."""
    unscorable = torch.isnan(rollout.rewards).all(dim=1)  # [N]: every function abstained
    scored_totals = rollout.total_reward.float()[~unscorable]
    # completion tokens per row (attention, not the loss mask, which may zero truncated rows)
    full = rollout.batch.attention_mask[:, rollout.batch.prompt_width:].sum(1).float().cpu()  # [N]
    terminated = torch.tensor([r != "length" for r in rollout.finish_reasons])  # [N]
    out = {
        "reward": float(scored_totals.mean()) if scored_totals.numel() else float("nan"),
        "reward_std": float(scored_totals.std()) if scored_totals.numel() > 1 else 0.0,
        "frac_reward_zero_std": rollout.stats["frac_reward_zero_std"],
        "completions/mean_length": float(full.mean()),
        "completions/min_length": float(full.min()),
        "completions/max_length": float(full.max()),
        "completions/clipped_ratio": float((~terminated).float().mean()),
    }
    if bool(terminated.any()):
        done = full[terminated]
        out.update({"completions/mean_terminated_length": float(done.mean()),
                    "completions/min_terminated_length": float(done.min()),
                    "completions/max_terminated_length": float(done.max())})
    for j, name in enumerate(reward_names):
        column = rollout.rewards[:, j].float()
        scored = column[~torch.isnan(column)]
        out[f"rewards/{name}/mean"] = float(scored.mean()) if scored.numel() else float("nan")
        out[f"rewards/{name}/std"] = float(scored.std()) if scored.numel() > 1 else 0.0
    return out
