"""The policy update of one step: the scoring passes it needs (old / reference log-probs, the
step's entropies), then num_iterations optimizer updates over the rollout, each in micro-batches
whose gradients add up to the whole step's (every micro-batch loss is normalized by the whole
step's token / sequence counts and shares its entropy threshold).

A NaN / inf loss or gradient would write NaNs into the weights (and every later save): that
update is skipped, schedule included, and reported (`skipped_update`) for the trainer to count.

State that outlives a step (the adaptive entropy coefficient, whether the sampler's log-probs
still serve as old log-probs) lives in `loss_state`, a plain dict the trainer checkpoints.
"""

from __future__ import annotations

import math
import time

import torch

from grpo_fast import distributed as dist
from grpo_fast.loss.entropy_control import EntropyControl
from grpo_fast.loss.objective import step_entropy_threshold
from grpo_fast.train.data_parallel import gather_values
from grpo_fast.train.group_prompts import GroupPrompts
from grpo_fast.train.memory import release_free_memory
from grpo_fast.train.micro_batches import micro_batches
from grpo_fast.train.model import PolicyModules
from grpo_fast.train.policy_loss import policy_loss, score_logprobs
from grpo_fast.train.rollout_batch import Rollout
from grpo_fast.train.sharding import equal_passes, idle_pass, local_value
from grpo_fast.thread_governor import ThreadGovernor, paced

# Our loss metric names -> TRL's.
_TRL_NAMES = {"clip_ratio/low": "clip_ratio/low_mean", "clip_ratio/high": "clip_ratio/high_mean",
              "clip_ratio/region": "clip_ratio/region_mean"}
_SUMMED = ("policy_loss", "num_high_entropy_tokens")
_WEIGHTED_BY = {"entropy/high": "num_high_entropy_tokens"}  # else by num_tokens


def update_policy(policy: PolicyModules, optimizer, scheduler, params, rollout: Rollout, cfg, loss_state: dict, *,
                  echo=print, micro_batch_tokens: int | None = None, threads: ThreadGovernor | None = None) -> dict:
    """Score what the loss needs, then num_iterations optimizer updates; returns the last update's
    loss metrics (TRL's names) with time/old_logprobs_s, entropy_coef and skipped_update (the
    count over the iterations). `loss_state` is read and updated in place. micro_batch_tokens (a
    number: the trainer resolves `auto`) splits the step by packed tokens instead of by count.
    threads: the CPU thread governor every pass runs under (None: torch's thread count)."""
    lc, s, t = cfg.loss, cfg.sampling, cfg.train
    batch = rollout.batch  # this rank's rows; the normalizers count every rank's (one process: the same)
    n_tok, n_seq = dist.all_reduce_sum(float(batch.mask.sum())), dist.all_reduce_sum(len(batch))
    control = EntropyControl.from_config(lc)
    control.load_state_dict(loss_state.get("entropy_control", {}))
    source = loss_state.get("old_logprobs", lc.old_logprobs)  # "sampler" falls back to "rescore" for good
    iterations = lc.num_iterations
    high_entropy = lc.top_entropy_quantile < 1.0
    cuts = micro_batches(batch, t.micro_batch_size, tokens=micro_batch_tokens)  # every pass splits alike
    cuts = equal_passes(policy.model, cuts)  # FSDP: as many passes on every rank

    old = entropies = None
    t0 = time.perf_counter()
    with dist.fail_together("scoring old / reference log-probs"):  # an OOM on one rank ends every rank
        if (iterations > 1 and source == "rescore") or high_entropy:
            scored = score_logprobs(policy, batch, temperature=s.temperature, cuts=cuts, return_entropy=high_entropy,
                                    threads=threads)
            old, entropies = scored if high_entropy else (scored, None)
            if iterations == 1:
                old = None  # on-policy: the update's own log-probs are exactly these
        t_old = time.perf_counter() - t0
        ref = (score_logprobs(policy, batch, temperature=s.temperature, reference=True, cuts=cuts, threads=threads)
               if lc.beta > 0 else None)

    threshold, n_kept = None, n_tok
    if high_entropy:
        # the quantile of every rank's masked entropies (gathered exactly, not approximated)
        everyone = gather_values(entropies.detach()[batch.mask != 0].float())  # [Σ_ranks tokens]
        threshold = step_entropy_threshold(everyone, lc.top_entropy_quantile)
        n_kept = float((everyone >= threshold).sum()) if threshold is not None else 0.0
    from_sampler = iterations > 1 and old is None
    skipped = 0
    for it in range(iterations):
        coef = control.applied()
        step_old = old
        if from_sampler and it > 0:
            step_old = rollout.sampling_logprobs  # iteration 0 is on-policy and measured the agreement
        metrics = optimizer_update(policy, optimizer, scheduler, params, rollout, step_old, ref, cfg, num_items=n_tok,
                                   num_seqs=n_seq, entropy_threshold=threshold, num_entropy_items=n_kept,
                                   entropy_coef=coef, cuts=cuts, threads=threads)
        skipped += metrics.pop("skipped_update")
        control.update(metrics.get("entropy/high", metrics.get("entropy", 0.0)))
        if it == 0:  # the sampler-vs-trainer agreement: measured on-policy, before any update
            agreement = {k: v for k, v in metrics.items() if k.startswith("sampling/")}
        if from_sampler and it == 0:
            diff = metrics.get("sampling/sampling_logp_difference/mean", math.inf)
            if not diff <= lc.old_logprobs_tolerance:
                loss_state["old_logprobs"] = "rescore"
                echo(f"loss.old_logprobs=sampler: the sampler's log-probs differ from the trainer's by {diff:.3g} "
                     f"nats per token on average (> loss.old_logprobs_tolerance={lc.old_logprobs_tolerance}); "
                     f"old log-probs come from a scoring pass from the next step on")
    metrics.update(agreement)  # (later iterations of old_logprobs=sampler compare the sampler with itself)
    if control.enabled:
        metrics["entropy_coef"] = control.coef
    loss_state["entropy_control"] = control.state_dict()
    if ref is None:  # beta = 0: the KL was not measured (no reference pass); don't log a fake 0
        metrics.pop("kl", None)
    if threads is not None and threads.others is not None:  # CPU load followed (grpo_fast/thread_governor.py)
        metrics.update({"cpu/threads": float(threads.last), "cpu/others_cores": threads.others})
    metrics.update({"time/old_logprobs_s": t_old, "old_logprobs_from_sampler": float(from_sampler),
                    "skipped_update": skipped})
    return metrics


def optimizer_update(policy: PolicyModules, optimizer, scheduler, params, rollout: Rollout, old, ref, cfg, *,
                     num_items: float, num_seqs: int, entropy_threshold=None, num_entropy_items=None,
                     entropy_coef: float | None = None, cuts: list[slice] | None = None,
                     threads: ThreadGovernor | None = None) -> dict:
    """Loss, gradient, one optimizer and scheduler step; returns the loss metrics aggregated over
    the micro-batches (TRL's names: token-weighted means, max / min of the per-micro-batch max /
    min, sums of counts and losses), loss, grad_norm and skipped_update (0 / 1). One forward and
    backward per row slice of `cuts` (default: train.micro_batch_size rows each)."""
    t, lc = cfg.train, cfg.loss
    sampling = rollout.sampling_logprobs
    parts = []
    total_loss = 0.0
    cuts = cuts or micro_batches(rollout.batch, t.micro_batch_size)
    # a group split across micro-batches runs its prompt once, backpropagated after its last one
    prompts = GroupPrompts.for_pass(policy.decoder, rollout.batch, cuts)
    with dist.fail_together("computing its loss and gradient"):  # an OOM on one rank ends every rank
        for rows in cuts:
            if rows is None:  # FSDP: this rank's share of a pass it has no rows for
                idle_pass(policy, backward=True)
                continue
            part = rollout.batch.select(rows)
            with paced(threads):
                loss, metrics = policy_loss(
                    policy, part, rollout.advantages[rows], None if old is None else old[rows],
                    None if ref is None else ref[rows], loss_cfg=lc, temperature=cfg.sampling.temperature,
                    max_completion_length=cfg.sampling.max_completion_length, num_items_in_batch=num_items,
                    num_sequences_in_batch=num_seqs, entropy_threshold=entropy_threshold,
                    num_entropy_items_in_batch=num_entropy_items, entropy_coef=entropy_coef,
                    sampling_logprobs=None if sampling is None else sampling[rows],
                    prompt_prefix=prompts.prefix(rows) if prompts else None)
                loss.backward()
                if prompts:
                    prompts.finish(rows)
            if t.release_memory == "micro_batch":  # else the trainer releases once, after the update
                release_free_memory()  # this micro-batch's activations, so the next one starts from the live set
            total_loss += float(loss.detach())
            parts.append({k: float(v) for k, v in metrics.items()})
    # Σ over ranks: each rank's loss and gradient are its rows' share of the whole-batch ones (the
    # normalizers are global), so the sums are one process's; every rank then sees the same
    # gradient, norm and finiteness, and takes the same step (or skips it together).
    dist.all_reduce_grads(params)
    total_loss = dist.all_reduce_sum(total_loss)
    parts = [p for rank_parts in dist.all_gather_object(parts) for p in rank_parts]
    grad_norm = local_value(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else
                                                           float("inf")))  # sharded gradients: a DTensor
    finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    out = {_TRL_NAMES.get(k, k): v for k, v in combine_metrics(parts).items()}
    out.update(loss=total_loss, grad_norm=grad_norm, skipped_update=int(not finite))
    return out


def combine_metrics(parts: list[dict]) -> dict:
    """One step's metrics from its micro-batches' (each a dict of floats with num_tokens)."""
    out: dict[str, float] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key == "num_tokens":
            continue
        if key in _SUMMED:
            out[key] = sum(values)
        elif key.endswith(("/max", "_max")):
            out[key] = max(values)
        elif key.endswith(("/min", "_min")):
            out[key] = min(values)
        else:
            weights = [p.get(_WEIGHTED_BY.get(key, "num_tokens"), 0.0) for p in parts]
            total = sum(weights)
            out[key] = sum(v * w for v, w in zip(values, weights)) / total if total > 0 else 0.0
    return out
