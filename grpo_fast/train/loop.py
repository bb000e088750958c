"""The GRPO training loop, top to bottom.

    setup        model + LoRA, data, rewards, generator, optimizer, (resume)
    eval before  greedy accuracy on the held-out split
    each step    B prompts × G completions -> rewards -> advantages
                 (old log-probs if μ > 1, reference log-probs if β > 0)
                 μ optimizer updates, each over micro-batches whose gradients add up to the
                 whole step's gradient (the loss normalizers are the step's)
    end          adapter (peft save_pretrained), optional merged model, eval after, plot

Every random draw is either seeded per step (sampling) or restored from the checkpoint (LoRA
dropout, torch / python / numpy RNGs), so `--resume` continues bit-exactly on CPU.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grpo_fast.config import Config
from grpo_fast.data import PromptStream, encode_prompts, load_splits
from grpo_fast.errors import ResumeError, TrainingStopped
from grpo_fast.loss import compute_advantages
from grpo_fast.rewards import build_rewards, compute_rewards
from grpo_fast.train import checkpoint as ckpt
from grpo_fast.train import resume, run_folder
from grpo_fast.train.evaluate import evaluate
from grpo_fast.train.generation import Generator
from grpo_fast.train.interrupts import StopRequests
from grpo_fast.train.memory import release_free_memory
from grpo_fast.train.metrics import MetricsLogger, plot_run
from grpo_fast.train.model import (PolicyModules, build_optimizer, build_scheduler, load_policy,
                                   policy_modules, save_merged, trainable_parameters)
from grpo_fast.train.policy_loss import policy_loss, score_logprobs
from grpo_fast.train.rollout_batch import Rollout, make_batch


@dataclass
class RunResult:
    eval_before: float | None
    eval_after: float | None
    steps: int
    output_dir: Path
    history: list[dict]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, round_: int) -> int:
    """Sampling seed of a step: a function of (seed, step), not of RNG history, so a resumed run
    samples exactly what the uninterrupted one would have."""
    return (seed * 1_000_003 + step * 7919 + round_ * 104_729) % (2**31 - 1)


def train(cfg: Config, *, echo=print) -> RunResult:
    """Run the GRPO job `cfg` describes; returns what it measured. Stops early (TrainingStopped,
    after saving) on SIGINT / SIGTERM or repeated non-finite updates; refuses (a UserError, before
    touching anything) a run folder it would clobber or a resume it cannot do exactly."""
    t, s, lc = cfg.train, cfg.sampling, cfg.loss
    if t.num_threads:
        torch.set_num_threads(t.num_threads)

    # ---- the run folder and the checkpoint to resume: checked before anything is loaded
    out_dir = run_folder.prepare(t.output_dir, resume=t.resume, overwrite=t.overwrite)
    ckpt_root = out_dir / "checkpoints"
    for stray in ckpt.remove_stray_temps(ckpt_root):
        echo(f"removed {stray.name}: the leftover of a save that was killed")
    resumable = _find_resumable(out_dir, ckpt_root, t.resume, echo)
    changes = []
    if resumable is not None:
        changes = resume.check_compatible(ckpt.read_config(resumable.path), cfg.to_dict(), resumable.step)
    seed_everything(t.seed)

    # ---- setup
    model, tokenizer, device = load_policy(cfg.model, cfg.lora, seed=t.seed)
    train_rows, eval_rows = load_splits(cfg.data, echo=echo)
    train_enc, skipped = encode_prompts(train_rows, tokenizer, cfg.data, s.max_prompt_length, "train")
    eval_enc, eval_skipped = (encode_prompts(eval_rows, tokenizer, cfg.data, s.max_prompt_length, "eval")
                              if eval_rows else ([], 0))
    if skipped or eval_skipped:
        echo(f"skipped prompts longer than {s.max_prompt_length} tokens: {skipped} train, {eval_skipped} eval")
    if len(train_enc) < t.prompts_per_step:
        echo(f"warning: {len(train_enc)} training prompts < train.prompts_per_step={t.prompts_per_step}: "
             f"every step repeats prompts")
    stream = PromptStream(train_enc, t.seed)
    rewards = build_rewards(cfg.rewards, s.max_completion_length)
    generator = Generator(model, tokenizer, backend=s.backend, kv_budget=s.kv_budget or _kv_tokens(train_enc, eval_enc, cfg))
    _echo_all(echo, generator.take_notices())
    params = trainable_parameters(model)
    optimizer = build_optimizer(params, t, device)
    scheduler = build_scheduler(optimizer, t, max(1, t.max_steps * lc.num_iterations))
    model.train()

    state = {"eval_before": None, "history": [], "skipped_prompts": skipped}
    start = 0
    if resumable is not None:
        state = ckpt.load_checkpoint(resumable.path, model=model, optimizer=optimizer, scheduler=scheduler,
                                     stream=stream)
        start = state.pop("step")
        resume.apply_optimizer_settings(optimizer, scheduler, t)
        dropped = resume.truncate_logs(out_dir, start)
        echo(f"resumed from {resumable.path} at step {start}"
             + (f" (dropped {dropped} log rows of later steps that the checkpoint does not hold)" if dropped else ""))
        _echo_all(echo, [f"applied on resume: {c}" for c in changes])
    run_folder.write_config(out_dir, _yaml(cfg.to_dict()))  # only now: the setup is valid
    logger = MetricsLogger(out_dir, append=resumable is not None, purge_step=start + 1 if resumable else None)

    def run_eval() -> float | None:
        if not eval_enc:
            return None
        return evaluate(generator, tokenizer, eval_enc, max_tokens=s.max_completion_length, stop=s.stop).accuracy

    def save(step: int) -> Path:
        _require_finite(params)
        return ckpt.save_checkpoint(ckpt_root, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                    stream=stream, trainer_state=state, config=cfg.to_dict())

    with StopRequests(echo) as stops:
        t_start = time.perf_counter()
        eval_seconds = 0.0
        if t.eval_before and state["eval_before"] is None and start == 0:
            state["eval_before"] = run_eval()
            eval_seconds = time.perf_counter() - t_start
            if state["eval_before"] is not None:
                echo(f"eval accuracy before training: {100 * state['eval_before']:.1f}% ({len(eval_enc)} prompts)")
                logger.log(0, {"eval/accuracy": state["eval_before"]})

        # ---- steps
        bar = _progress(t, start)
        last_step = start  # the last finished step
        step_seconds: list[float] = []
        nonfinite_run: list[int] = []  # consecutive steps whose update was skipped
        stop_reason = None
        for step in range(start, t.max_steps):
            if stops.requested:
                break
            if t.time_budget_s and step_seconds:
                # Stop early rather than overrun: the next step (the slowest so far) plus the final eval.
                projected = time.perf_counter() - t_start + max(step_seconds) + eval_seconds
                if projected > t.time_budget_s:
                    echo(f"time budget of {t.time_budget_s:.0f}s reached: stopping after {step} of {t.max_steps} steps")
                    break
            t0 = time.perf_counter()
            rollout = collect_rollout(model, tokenizer, generator, stream, rewards, cfg, step)
            _echo_all(echo, generator.take_notices())
            release_free_memory()  # the sampling phase's freed pages, before training needs memory
            t_sample = time.perf_counter() - t0

            n_seq = len(rollout.batch)
            n_tok = float(rollout.batch.mask.sum())
            policy = policy_modules(model)
            old = score_logprobs(policy, rollout.batch, temperature=s.temperature,
                                 micro_batch_size=t.micro_batch_size) if lc.num_iterations > 1 else None
            ref = score_logprobs(policy, rollout.batch, temperature=s.temperature, reference=True,
                                 micro_batch_size=t.micro_batch_size) if lc.beta > 0 else None
            skipped_updates = 0
            for _ in range(lc.num_iterations):
                loss_metrics = optimizer_update(policy, optimizer, scheduler, params, rollout, old, ref, cfg,
                                                num_items=n_tok, num_seqs=n_seq)
                skipped_updates += loss_metrics.pop("skipped_update")
            t_step = time.perf_counter() - t0
            step_seconds.append(t_step)
            last_step = step + 1
            if ref is None:  # beta = 0: the KL was not measured (no reference pass); don't log a fake 0
                loss_metrics.pop("kl", None)

            gen_tokens = rollout.stats["completion_tokens"]
            metrics = {
                "reward": float(rollout.total_reward.mean()),
                "reward_std": float(rollout.total_reward.std()) if n_seq > 1 else 0.0,
                **{f"rewards/{name}": float(torch.nanmean(rollout.rewards[:, j].float()))
                   for j, name in enumerate(rewards.names)},
                **loss_metrics,
                **rollout.stats,
                "nonfinite_updates": skipped_updates,
                "lr": scheduler.get_last_lr()[0],
                "time/sample_s": t_sample,
                "time/step_s": t_step,
                "tokens_per_s": gen_tokens / t_step if t_step > 0 else 0.0,
            }
            if rollout.stats["reward_errors"]:
                failed = ", ".join(f"{k.split('/', 1)[1]!r} on {v}" for k, v in rollout.stats.items()
                                   if k.startswith("reward_errors/"))
                echo(f"step {step + 1}: reward functions failed ({failed} of {n_seq} completions; "
                     f"rewards.on_reward_error={cfg.rewards.on_reward_error})")
            if t.eval_steps and (step + 1) % t.eval_steps == 0 and step + 1 < t.max_steps:
                metrics["eval/accuracy"] = run_eval()
            state["history"].append({k: metrics[k] for k in ("reward", "kl") if k in metrics})
            if (step + 1) % t.logging_steps == 0 or step + 1 == t.max_steps:
                logger.log(step + 1, metrics)
                logger.log_completions(step + 1, [
                    {"prompt": rollout.prompts[i], "completion": rollout.texts[i],
                     "reward": float(rollout.total_reward[i])} for i in range(min(t.log_completions, n_seq))])
            if bar is not None:
                kl = f"{metrics['kl']:.4f}" if "kl" in metrics else "-"
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=kl,
                                tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
            nonfinite_run = nonfinite_run + [step + 1] if skipped_updates else []
            if nonfinite_run:
                echo(f"step {step + 1}: non-finite loss or gradient: update skipped "
                     f"({len(nonfinite_run)} in a row; the run stops at train.max_nonfinite_steps={t.max_nonfinite_steps})")
            if len(nonfinite_run) >= t.max_nonfinite_steps:
                stop_reason = (f"stopped: steps {nonfinite_run[0]}-{nonfinite_run[-1]} all had a non-finite loss or "
                               f"gradient, so their updates were skipped; the saved adapter holds the weights of the "
                               f"last good update. Lower train.learning_rate, check the rewards, or raise "
                               f"train.max_nonfinite_steps")
                break
            if t.save_steps and (step + 1) % t.save_steps == 0 and step + 1 < t.max_steps:
                save(step + 1)
        if bar is not None:
            bar.close()

        # ---- end: the adapter first, so that nothing after it can cost the user the run
        _save_adapter(model, tokenizer, params, out_dir)
        if last_step > start or resumable is None:  # (a resumed run that took no step has its checkpoint)
            save(last_step)
        if stops.requested:
            logger.close()
            raise TrainingStopped(
                f"{stops.requested}: stopped after step {last_step} of {t.max_steps}; checkpoint-{last_step} and "
                f"the adapter are saved in {out_dir}. Continue with the same command plus --resume",
                exit_code=stops.exit_code)
        if stop_reason is not None:
            logger.close()
            raise TrainingStopped(stop_reason)

    if t.merge:
        save_merged(cfg.model, out_dir / "adapter", out_dir / "merged")
        echo(f"merged model saved to {out_dir / 'merged'}")
    eval_after = run_eval()
    if eval_after is not None:
        logger.log(last_step, {"eval/accuracy": eval_after})
    logger.close()
    plot_run(out_dir)
    echo(f"adapter saved to {out_dir / 'adapter'}")
    before = state["eval_before"]
    if eval_after is not None:
        b = f"{100 * before:.1f}%" if before is not None else "n/a"
        echo(f"eval accuracy: before {b} -> after {100 * eval_after:.1f}%")
    return RunResult(before, eval_after, last_step, out_dir, state["history"])


def _find_resumable(out_dir: Path, ckpt_root: Path, wanted: bool, echo) -> ckpt.Resumable | None:
    """The checkpoint --resume continues from (None: start fresh). Never starts fresh over a run
    that has files but no usable checkpoint."""
    if not wanted:
        return None
    found = ckpt.find_resumable(ckpt_root)
    if found is None:
        present = run_folder.run_files(out_dir)
        if present:
            raise ResumeError(f"--resume: {out_dir} holds a run ({', '.join(present)}) but no checkpoint to continue "
                              f"from; start afresh with --overwrite")
        echo(f"--resume: no checkpoint in {ckpt_root}; starting fresh")
        return None
    for line in found.skipped:
        echo(f"--resume: skipped {line}")
    return found


def _save_adapter(model, tokenizer, params, out_dir: Path) -> None:
    _require_finite(params)
    model.save_pretrained(out_dir / "adapter")
    tokenizer.save_pretrained(out_dir / "adapter")


def _require_finite(params) -> None:
    """Never save NaN / inf weights (they would silently replace a good adapter)."""
    for p in params:
        if not bool(torch.isfinite(p).all()):
            raise TrainingStopped("stopped: the trainable weights hold NaN / inf values, so nothing was saved; the "
                                  "last checkpoint in the run folder is intact (resume from it with a lower "
                                  "train.learning_rate)")


def _echo_all(echo, lines: list[str]) -> None:
    for line in lines:
        echo(line)


def collect_rollout(model, tokenizer, generator, stream, rewards, cfg: Config, step: int) -> Rollout:
    """Sample B prompts × G completions, score them, and compute advantages. With dynamic
    sampling, groups whose rewards are all equal carry no signal: they are dropped and more
    prompts drawn (up to max_dynamic_rounds extra rounds) until B informative groups are kept."""
    t, s, G = cfg.train, cfg.sampling, cfg.sampling.num_generations
    kept: list[dict] = []
    dropped: list[dict] = []
    stats = {"reward_errors": 0, "dynamic_rounds": 0, "zero_std_groups": 0}
    for round_ in range(1 + (t.max_dynamic_rounds if t.dynamic_sampling else 0)):
        need = t.prompts_per_step - len(kept)
        if need <= 0:
            break
        prompts = stream.take(t.prompts_per_step if round_ == 0 else need)
        groups = generator.generate([p.ids for p in prompts], n=G, temperature=s.temperature,
                                    max_tokens=s.max_completion_length, top_p=s.top_p, top_k=s.top_k,
                                    min_p=s.min_p, stop=s.stop, seed=step_seed(t.seed, step, round_))
        scored = _score_groups(prompts, groups, tokenizer, rewards, stats)
        stats["dynamic_rounds"] = round_
        for g in scored:
            flat = g["total"]
            zero_std = bool((flat.max() - flat.min()).abs() < 1e-12)
            stats["zero_std_groups"] += int(zero_std)
            (dropped if (t.dynamic_sampling and zero_std) else kept).append(g)
    # Not enough informative groups after the last round: fill up with dropped ones (advantage 0).
    kept = (kept + dropped)[: t.prompts_per_step]

    prompt_ids = [g["prompt_ids"] for g in kept for _ in range(G)]
    completion_ids = [ids for g in kept for ids in g["completion_ids"]]
    reasons = [r for g in kept for r in g["finish_reasons"]]
    keep = [r != "length" for r in reasons] if cfg.loss.mask_truncated_completions else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = make_batch(prompt_ids, completion_ids, pad, keep)
    reward_matrix = torch.cat([g["rewards"] for g in kept], 0)  # [N, F]
    advantages = compute_advantages(reward_matrix, G, scale_rewards=cfg.loss.scale_rewards,
                                    reward_weights=rewards.weight_tensor)
    lengths = [len(c) for c in completion_ids]
    stats.update(completion_tokens=sum(lengths), completion_length=sum(lengths) / len(lengths),
                 truncated_fraction=sum(r == "length" for r in reasons) / len(reasons))
    stats.update(generator.last_stats and {"sampler/decode_tokens_per_s":
                                           generator.last_stats.get("decode_tokens_per_s", 0.0)} or {})
    device = next(model.parameters()).device
    return Rollout(batch.to(device), advantages.to(device), reward_matrix,
                   torch.cat([g["total"] for g in kept]), [g["prompt"] for g in kept for _ in range(G)],
                   [x for g in kept for x in g["texts"]], reasons, stats)


def _score_groups(prompts, groups, tokenizer, rewards, stats) -> list[dict]:
    """Decode the completions of every group and run the reward functions on them (one call
    per function for the whole round)."""
    G = len(groups[0].completions)
    texts, comp_ids, reasons, prompt_texts = [], [], [], []
    columns: dict[str, list] = {k: [] for p in prompts for k in p.row if k != "prompt"}
    for p, g in zip(prompts, groups):
        for c in g.completions:
            comp_ids.append(list(c.token_ids))
            texts.append(tokenizer.decode(c.token_ids, skip_special_tokens=True))
            reasons.append(c.finish_reason)
            prompt_texts.append(p.row["prompt"])
            for k in columns:
                columns[k].append(p.row.get(k))
    columns.update(completion_ids=comp_ids, completion_lengths=[len(c) for c in comp_ids], finish_reasons=reasons)
    result = compute_rewards(rewards, prompt_texts, texts, columns)
    stats["reward_errors"] += sum(result.errors.values())
    for name, count in result.errors.items():
        stats[f"reward_errors/{name}"] = stats.get(f"reward_errors/{name}", 0) + count
    total = result.total(rewards.weight_tensor)  # [N]
    out = []
    for i, p in enumerate(prompts):
        rows = slice(i * G, (i + 1) * G)
        out.append({"prompt": p.row["prompt"], "prompt_ids": p.ids, "completion_ids": comp_ids[rows],
                    "texts": texts[rows], "finish_reasons": reasons[rows], "rewards": result.rewards[rows],
                    "total": total[rows]})
    return out


def optimizer_update(policy: PolicyModules, optimizer, scheduler, params, rollout: Rollout, old, ref, cfg: Config, *,
                     num_items: float, num_seqs: int) -> dict:
    """One optimizer step over the rollout, in micro-batches. Each micro-batch loss is normalized
    by the whole step's token / sequence counts, so the summed gradient is the whole-batch one."""
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
            num_sequences_in_batch=n)
        loss.backward()
        release_free_memory()  # this micro-batch's activations, so the next one starts from the live set
        total_loss += float(loss.detach())
        tokens = float(metrics["num_tokens"])
        for k, v in metrics.items():  # token-weighted means over micro-batches
            if k != "num_tokens":
                sums[k] = sums.get(k, 0.0) + float(v) * tokens
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")))
    # A NaN / inf loss or gradient would write NaNs into the weights (and every later save):
    # skip this update, schedule included, and let the loop count it.
    finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    out = {k: v / max(num_items, 1.0) for k, v in sums.items()}
    out.update(loss=total_loss, grad_norm=grad_norm, skipped_update=int(not finite))
    return out


def _kv_tokens(train_enc, eval_enc, cfg: Config) -> str:
    """A KV budget that holds the largest generate call of this run at once (a step's B × G
    sequences, or an eval batch), instead of the sampler's fixed default."""
    longest = max(len(e.ids) for e in train_enc + eval_enc) + cfg.sampling.max_completion_length
    rows = max(cfg.train.prompts_per_step * cfg.sampling.num_generations, min(64, len(eval_enc)))
    return f"{rows * longest + 64} tokens"


def _progress(t, start: int):
    if not t.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.max_steps, initial=start, desc="grpo", unit="step", dynamic_ncols=True)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
