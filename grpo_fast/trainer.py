"""`GRPOTrainer`: the recipe, with TRL's API.

    trainer = GRPOTrainer(model="Qwen/...local folder", reward_funcs=[accuracy_reward, my_async_judge],
                          args=GRPOConfig(output_dir="runs/x", learning_rate=1e-5, num_generations=8),
                          train_dataset=dataset, peft_config=LoraConfig(r=16, ...))
    trainer.train()          # or .train(resume_from_checkpoint=True)
    trainer.evaluate()       # eval metrics now
    trainer.save_model(dir)  # adapter + tokenizer + model card

The recipe, top to bottom (components in grpo_fast/train/):
    setup     policy (model + LoRA), data, rewards, generator, optimizer, schedule
    prepare   run folder, checkpoint to resume (exact or refused), trackers, config.yaml
    each step B prompts × G completions -> rewards -> advantages (old / ref log-probs when needed)
              -> num_iterations optimizer updates in micro-batches -> metrics, callbacks, checkpoint
    finish    adapter (first), checkpoint, model card, hub, merged model, eval, plot

Every random draw is either seeded per step (sampling) or restored from the checkpoint (LoRA
dropout, torch / python / numpy RNGs), so resuming continues bit-exactly on CPU. Ctrl-C /
SIGTERM finish the step and save; non-finite updates are skipped and stop the run if repeated.
"""

from __future__ import annotations

import dataclasses

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grpo_fast import distributed as dist
from grpo_fast import memory
from grpo_fast.config import Config, load_config
from grpo_fast.data import PromptStream, StreamingPrompts, encode_prompts, load_splits
from grpo_fast.data.sources import is_streaming, normalize_row
from grpo_fast.errors import ConfigError, ResumeError, TrainingStopped
from grpo_fast.rewards import add_rewards, build_rewards
from grpo_fast.rollout.agent_loop import ToolSetup
from grpo_fast.torch_threads import set_torch_threads
from grpo_fast.train import checkpoint as ckpt
from grpo_fast.train import resume, rollout, run_folder, sharding
from grpo_fast.train.data_parallel import check_divisible, rank_config, shard_rollout
from grpo_fast.train.evaluate import EVAL_BATCH_COMPLETIONS, EvalResult, evaluate
from grpo_fast.train.generation import Generator
from grpo_fast.train.interrupts import StopRequests
from grpo_fast.train.memory import release_free_memory
from grpo_fast.train.metrics import plot_run
from grpo_fast.train.model import (build_optimizer, build_scheduler, dtype_hint, load_policy, policy_modules, save_merged,
                                   trainable_parameters)
from grpo_fast.train.state import TrainerState
from grpo_fast.thread_governor import ThreadGovernor
from grpo_fast.train.trackers import make_trackers, resolve_report_to
from grpo_fast.train.update import update_policy


# The built-in model's Hub name, for the model card (the adapter was trained on its GGUF Q4_1
# weights, dequantized: close to, not bitwise, the Hub's fp weights).
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class RunResult:
    eval_before: float | None  # eval accuracy (or the first eval reward's mean) before training
    eval_after: float | None
    steps: int
    output_dir: Path
    history: list[dict]
    eval_metrics: dict | None = None  # every eval metric after training


def _as_config(args) -> Config:
    if args is None:
        return load_config(None)
    if isinstance(args, Config):
        return args
    if isinstance(args, dict):
        from grpo_fast.grpo_config import GRPOConfig

        return GRPOConfig(**args)
    if isinstance(args, (str, Path)):
        return load_config(args)
    raise ConfigError(f"args: expected a GRPOConfig, a dict or a YAML path, got {type(args).__name__}")


def _as_list(funcs) -> list | None:
    if funcs is None:
        return None
    return list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]


class GRPOTrainer:
    """GRPO fine-tuning of `model` against `reward_funcs` (see the module docstring).

    model: a local folder / GGUF path, a loaded transformers causal LM (peft-wrapped or not), or
    None for args.model's. reward_funcs: a callable with TRL's signature, a built-in name
    ("accuracy", "format", "overlong", "judge", "tool_use"), "module:function", or a list of them (None: the
    config's). args: a GRPOConfig, a dict of its fields, a YAML path, or None. train_dataset /
    eval_dataset: datasets.Dataset, IterableDataset, DatasetDict or a list of dicts (None: the
    config's data section). processing_class: the tokenizer. peft_config: a peft LoraConfig.
    callbacks: objects with on_step_end(state, metrics) or callables (state, metrics); either may
    end the run by returning True or setting state.should_stop.
    tools (TRL 1.16): Python functions the model may call (sync or async; described to it by their
    signatures and docstrings). environment_factory: a class / callable (or a dict of them,
    chosen per row by its `environment` column) giving one environment per rollout, whose public
    methods are tools (see grpo_fast/rollout). Both make rollouts multi-turn.
    """

    def __init__(self, model=None, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None, *, tools=None, environment_factory=None,
                 echo=print):
        self.args = cfg = _as_config(args)
        # torchrun: join the other ranks (grpo_fast/distributed.py); one process: nothing to join
        dist.init(cfg.train.collective_timeout_s)
        check_divisible(cfg.train.prompts_per_step)
        self.echo = echo = echo if dist.is_main() else _quiet  # rank 0 speaks for the run
        _echo_all(echo, [f"warning: {w}" for w in cfg.loss.warnings()])  # TRL's, for these loss options
        self.callbacks = list(callbacks or [])
        t, s = cfg.train, cfg.sampling
        out = Path(t.output_dir)
        if out.exists() and not out.is_dir():  # before a model load, not after
            raise run_folder.RunFolderError(f"train.output_dir: {str(out)!r} is a file, not a folder")
        if isinstance(model, (str, Path)):
            cfg.model.name_or_path = str(model)
            model = None
        t.report_to = resolve_report_to(t.report_to)  # a missing tracker package fails now, not after setup
        if t.num_threads:
            set_torch_threads(t.num_threads)  # keeps MKL's dynamic mode (grpo_fast.torch_threads)
        # The memory plan, before the weights load: a run the device cannot hold stops now, with
        # settings that fit (grpo_fast.memory). Capacity unknown (a CPU without limits): no check.
        shape = memory.ModelShape.from_config(model.config) if model is not None else memory.read_shape(cfg.model)
        self.capacity = memory.device_capacity(memory.plan_device(cfg))
        self.plan = memory.check_fits(rank_config(cfg), shape, self.capacity)  # torchrun: this rank's B / N prompts
        self._shape = shape
        seed_everything(t.seed)
        sharding.check_config(cfg, peft_config)
        self.model, self.tokenizer, self.device = load_policy(
            cfg.model, cfg.lora, seed=t.seed, model=model, peft_config=peft_config, tokenizer=processing_class,
            echo=echo, keep_reference=cfg.loss.beta > 0)
        hint = dtype_hint(cfg.model, self.device) if model is None else None  # a model passed in: its dtype
        if hint:
            echo(hint)
        if not cfg.lora.enabled and peft_config is None:
            if t.merge:
                raise ConfigError("train.merge: a full fine-tuning run (lora.enabled: false) saves the whole model "
                                  "already; there is no adapter to merge")
            echo(f"model: full fine-tuning, {sum(p.numel() for p in self.model.parameters()):,} weights train"
                 + (" (the reference policy is a frozen copy of them)" if cfg.loss.beta > 0 else ""))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        train_rows, eval_rows = load_splits(cfg.data, echo=echo, train_dataset=train_dataset,
                                            eval_dataset=eval_dataset)
        self.stream, skipped = self._prompt_stream(train_rows)
        self.eval_prompts, eval_skipped = (encode_prompts(eval_rows, self.tokenizer, cfg.data, s.max_prompt_length,
                                                          "eval") if eval_rows else ([], 0))
        if skipped or eval_skipped:
            echo(f"skipped prompts longer than {s.max_prompt_length} tokens: {skipped} train, {eval_skipped} eval")
        self.rewards = build_rewards(cfg.rewards, s.max_completion_length, funcs=_as_list(reward_funcs))
        if reward_funcs is not None and all(isinstance(f, str) for f in _as_list(reward_funcs)):
            cfg.rewards.funcs = list(_as_list(reward_funcs))  # config.yaml then reruns this very job
        # multi-turn tools (grpo_fast/rollout); an environment's get_reward() is one more reward
        self.tools = ToolSetup.from_config(self.tokenizer, cfg.tools, tools=tools, environment_factory=environment_factory,
                                           chat_template_kwargs=cfg.data.chat_template_kwargs)
        if self.tools is not None:
            add_rewards(self.rewards, self.tools.environment_rewards())
        self.eval_rewards = self._eval_reward_set(eval_rows)
        self.max_steps = self._max_steps()
        self.micro_batch_tokens = self._micro_batch_tokens()
        dist.broadcast_tensors(trainable_parameters(self.model))  # every rank starts from rank 0's weights
        # then each keeps its 1/W of them (train/sharding.py); one process: nothing to shard
        self.sharded = bool(t.fsdp) and sharding.shard_policy(self.model)
        if self.sharded:  # at exit, a trainer still alive (a script's global) lets go of the group
            dist.release_at_shutdown(self, GRPOTrainer._drop_sharded_state)
        if t.fsdp:
            echo(f"model: sharded across {dist.world_size()} ranks (FSDP2)" if self.sharded else
                 "train.fsdp: one process, nothing to shard (launch with torchrun --nproc-per-node N)")
        # CPU: the torch thread count of each sampling phase (re-measured every quarter second of
        # its steps) and of each scoring / training micro-batch follows the machine's load
        self.thread_governor = (ThreadGovernor() if t.adaptive_threads and self.device.type == "cpu" else None)
        self.generator = Generator(self.model, self.tokenizer, backend=s.backend, kv_budget=self._kv_budget(),
                                   threads=self.thread_governor or False)
        _echo_all(echo, self.generator.take_notices())
        self.params = trainable_parameters(self.model)  # (a sharded model's are its shards)
        dist.seed_rank(t.seed)  # and draws its own dropout masks
        self.optimizer = build_optimizer(self.params, t, self.device)
        self.scheduler = build_scheduler(self.optimizer, t, max(1, self.max_steps * cfg.loss.num_iterations))
        self.state = TrainerState(max_steps=self.max_steps, skipped_prompts=skipped)
        self.out_dir = out
        self._phase, self._last_saved = "setup", 0

    _SHARDED_STATE = ("model", "params", "optimizer", "scheduler", "generator")

    def _drop_sharded_state(self) -> None:
        """At shutdown (grpo_fast.distributed): the sharded model, its parameters, their optimizer
        state and the sampler that reads them all hold the process group (through the FSDP mesh);
        the trainer is done with them once the group is gone. A model object the caller passed in
        and still holds keeps the group alive all the same: that reference is theirs."""
        for name in self._SHARDED_STATE:
            self.__dict__.pop(name, None)

    # ---------------------------------------------------------------- setup pieces

    def _prompt_stream(self, train_rows):
        cfg, s = self.args, self.args.sampling
        if is_streaming(train_rows):
            pc, ac = cfg.data.prompt_column, cfg.data.answer_column
            return StreamingPrompts(train_rows, cfg.train.seed, tokenizer=self.tokenizer, cfg=cfg.data,
                                    max_prompt_length=s.max_prompt_length,
                                    normalize=lambda row, i: normalize_row(row, i, pc, ac, "train_dataset")), 0
        encoded, skipped = encode_prompts(train_rows, self.tokenizer, cfg.data, s.max_prompt_length, "train")
        if len(encoded) < cfg.train.prompts_per_step:
            self.echo(f"warning: {len(encoded)} training prompts < train.prompts_per_step={cfg.train.prompts_per_step}: "
                      f"every step repeats prompts")
        return PromptStream(encoded, cfg.train.seed), skipped

    def _eval_reward_set(self, eval_rows):
        """eval.reward_funcs by name (a training reward's name reuses that function); by default
        accuracy when the eval rows have answers, else the training rewards."""
        names = self.args.eval.reward_funcs
        if names is None:
            if not any(r.get("answer") not in (None, "") for r in eval_rows):
                return self.rewards
            names = ["accuracy"]
        by_name = dict(zip(self.rewards.names, self.rewards.funcs))
        funcs = [by_name.get(n, n) for n in names]
        # eval rewards are reported one by one (weights 1): the training weights do not apply
        unweighted = dataclasses.replace(self.args.rewards, weights=None)
        rs = build_rewards(unweighted, self.args.sampling.max_completion_length, funcs=funcs)
        rs.names = list(names)
        return rs

    def _max_steps(self) -> int:
        t = self.args.train
        if t.num_train_epochs <= 0:
            return t.max_steps
        if isinstance(self.stream, StreamingPrompts):
            raise ConfigError("train.num_train_epochs: a streamed dataset has no length; set train.max_steps")
        return max(1, math.ceil(t.num_train_epochs * len(self.stream) / t.prompts_per_step))

    def _micro_batch_tokens(self) -> int | None:
        """train.micro_batch_tokens as a number (auto: from the plan and the device)."""
        value = self.args.train.micro_batch_tokens
        if value is None:
            return None
        if value == "auto":
            longest = self._longest_prompt()
            return memory.token_budget(rank_config(self.args), self.capacity, shape=self._shape, prompt_tokens=longest)
        return int(value)

    def _longest_prompt(self) -> int | None:
        if self.tools is not None:
            return None  # rendered with the tools' schemas (and an environment's reset text) at sampling time
        known = (list(self.stream.items) if isinstance(self.stream, PromptStream) else []) + self.eval_prompts
        return max((len(e.ids) for e in known), default=None)

    def _kv_budget(self):
        """sampling.kv_budget as given; auto: the device's memory minus the plan's training peak
        (the sampler and the trainer share one device), at most what a step needs."""
        budget = self.args.sampling.kv_budget
        if budget is None:
            return self._kv_tokens()
        if budget != "auto":
            return budget
        if self.capacity is None:
            return self._kv_tokens()
        spare = self.capacity - self.plan.phases["training"] - self.plan.overhead_bytes
        needed = int(self._kv_tokens().split()[0]) * memory.kv_bytes_per_token(self._shape, self.args)
        if spare < needed:
            self.echo(f"sampling.kv_budget auto: {memory._fmt(max(spare, 0))} left for KV of the "
                      f"{memory._fmt(needed)} a step could use: the sampler will preempt and recompute")
        return max(int(min(spare, needed)), 1)

    def _kv_tokens(self) -> str:
        """A KV budget that holds the largest generate call of this run at once (this rank's
        share of a step's B groups of G, or an eval batch), each group's prompt shared
        (memory.shared_pool_tokens), instead of the sampler's fixed default."""
        cfg = self.args
        longest = self._longest_prompt() or cfg.sampling.max_prompt_length
        tokens = memory.step_pool_tokens(cfg, longest, prompts=max(1, cfg.train.prompts_per_step // dist.world_size()))
        if self.eval_prompts:
            n = cfg.eval.num_generations
            groups = min(len(self.eval_prompts), max(1, EVAL_BATCH_COMPLETIONS // n))
            completion = cfg.eval.max_completion_length or cfg.sampling.max_completion_length
            tokens = max(tokens, memory.shared_pool_tokens(groups, n, longest, completion))
        return f"{tokens} tokens"

    # ---------------------------------------------------------------- public API

    def evaluate(self) -> dict[str, float]:
        """Eval metrics of the current policy on the eval prompts (empty without any)."""
        result = self._evaluate()
        return {} if result is None else result.metrics

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """The adapter (peft save_pretrained), the tokenizer and a model card into output_dir
        (default: train.output_dir/adapter)."""
        folder = Path(output_dir) if output_dir is not None else self.out_dir / "adapter"
        _require_finite(self.params)
        whole = sharding.full_state(self.model) if self.sharded else None  # gathered on rank 0 (all ranks take part)
        dist.on_main("saving the adapter", self._write_model, folder, whole)  # the weights are the same on every rank
        return folder

    def _write_model(self, folder: Path, state_dict: dict | None = None) -> None:
        self.model.save_pretrained(folder, **({} if state_dict is None else {"state_dict": state_dict}))
        self.tokenizer.save_pretrained(folder)
        from grpo_fast.train.model_card import write_model_card

        cfg = self.args
        t = cfg.train
        write_model_card(folder, base_model=cfg.model.name_or_path or DEFAULT_BASE_MODEL, dataset=_dataset_name(cfg),
                         reward_funcs=list(self.rewards.names), config=cfg.to_dict(), metrics=self._card_metrics(),
                         repo_id=(t.hub_model_id or self.out_dir.name) if t.push_to_hub else None)

    def train(self, resume_from_checkpoint: bool | str | None = None) -> RunResult:
        """Train to max_steps (or the epochs asked); resume_from_checkpoint: True (the newest
        checkpoint in output_dir), a checkpoint folder, or None / False (train.resume decides)."""
        t = self.args.train
        resume_from_checkpoint = resume_from_checkpoint or getattr(self.args, "resume_from_checkpoint", None)
        if resume_from_checkpoint:
            t.resume, t.overwrite = True, False
        out_dir = dist.on_main("preparing the run folder", run_folder.prepare, self.out_dir, resume=t.resume,
                              overwrite=t.overwrite)
        ckpt_root = out_dir / "checkpoints"
        for stray in dist.on_main("cleaning the checkpoints folder", ckpt.remove_stray_temps, ckpt_root):
            self.echo(f"removed {stray.name}: the leftover of a save that was killed")
        resumable = _find_resumable(out_dir, ckpt_root, t.resume, resume_from_checkpoint, self.echo)
        start = 0
        if resumable is not None:
            changes = resume.check_compatible(ckpt.read_config(resumable.path), self.args.to_dict(), resumable.step)
            saved = ckpt.load_checkpoint(resumable.path, model=self.model, optimizer=self.optimizer,
                                         scheduler=self.scheduler, stream=self.stream, rank=dist.rank(),
                                         world_size=dist.world_size(), echo=self.echo)
            self.state = TrainerState.from_dict(saved)
            self.state.max_steps = self.max_steps
            start = self._last_saved = self.state.global_step
            resume.apply_optimizer_settings(self.optimizer, self.scheduler, t)
            finishing = start == self.max_steps
            dropped = dist.on_main("truncating the logs", resume.truncate_logs, out_dir, start, finishing)
            self.echo(f"resumed from {resumable.path} at step {start}"
                      + (f" (dropped {dropped} log rows that the checkpoint does not hold or that the run's end "
                         f"writes again)" if dropped else ""))
            if finishing:
                self.echo(f"the checkpoint is at train.max_steps={start}: no step is left, so only the run's end "
                          f"runs (the adapter, final eval, merge, plots); raise train.max_steps to train further")
            _echo_all(self.echo, [f"applied on resume: {c}" for c in changes])
        dist.on_main("writing config.yaml", run_folder.write_config, out_dir,
                     _yaml(self.args.to_dict()))  # only now: the setup is valid
        t_name = t.run_name or out_dir.resolve().name
        reporter = dist.on_main("opening the trackers", make_trackers, t.report_to, out_dir, run_name=t_name,
                                config=self.args.to_dict(), append=resumable is not None, project=t.project,
                                purge_step=start + 1 if resumable is not None else None)
        self.reporter = reporter if dist.is_main() else _NoTrackers()  # rank 0 writes the run's metrics
        with StopRequests(self.echo) as stops:
            last_step, stop_reason = self._steps(start, stops)
            self._stop_agreed(stops)  # a signal that reached one rank during the last step stops every rank
            self._save_adapter_and_checkpoint(last_step, took_steps=last_step > start or resumable is None)
            if stops.requested:
                self.reporter.close(exit_code=stops.exit_code)
                raise TrainingStopped(
                    f"{stops.requested}: stopped after step {last_step} of {self.max_steps}; checkpoint-{last_step} "
                    f"and the adapter are saved in {out_dir}. Continue with the same command plus --resume",
                    exit_code=stops.exit_code)
            if stop_reason is not None:
                self.reporter.close(exit_code=1)
                raise TrainingStopped(stop_reason)
        return self._finish(last_step)

    # ---------------------------------------------------------------- the recipe

    def _steps(self, start: int, stops: StopRequests) -> tuple[int, str | None]:
        """Steps from `start` until max_steps, the time budget, a stop request, a callback or a
        run of non-finite updates; returns (last finished step, why the run must stop or None)."""
        t = self.args.train
        t_start = time.perf_counter()
        eval_seconds = 0.0
        if t.eval_before and self.state.eval_before is None and start == 0:
            before = self._evaluate()
            eval_seconds = time.perf_counter() - t_start
            if before is not None:
                self.state.eval_before = before.metrics
                self.echo(f"eval before training: {_headline(before.metrics)} ({len(self.eval_prompts)} prompts)")
                self.reporter.log(0, before.metrics)
        bar = _progress(t, start, self.max_steps)
        last_step, step_seconds, nonfinite_run = start, [], []
        for step in range(start, self.max_steps):
            if self._stop_agreed(stops):
                break
            if t.time_budget_s and step_seconds:
                # Stop early rather than overrun: the next step (the slowest so far) plus the final eval.
                over = time.perf_counter() - t_start + max(step_seconds) + eval_seconds > t.time_budget_s
                if dist.all_reduce_sum(int(over)):  # any rank over budget: every rank stops here
                    self.echo(f"time budget of {t.time_budget_s:.0f}s reached: stopping after {step} of "
                              f"{self.max_steps} steps")
                    break
            t0 = time.perf_counter()
            try:
                metrics = self._step(step)
            except (MemoryError, RuntimeError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
                if not memory.is_out_of_memory(exc):
                    raise
                raise memory.out_of_memory(exc, self._phase, self.args, self.plan, step + 1, self._last_saved) from exc
            step_seconds.append(time.perf_counter() - t0)
            last_step = step + 1
            if bar is not None:
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}" if "kl" in metrics else "-",
                                tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
            nonfinite_run = nonfinite_run + [step + 1] if metrics["nonfinite_updates"] else []
            if nonfinite_run:
                self.echo(f"step {step + 1}: non-finite loss or gradient: update skipped ({len(nonfinite_run)} in a "
                          f"row; the run stops at train.max_nonfinite_steps={t.max_nonfinite_steps})")
            if len(nonfinite_run) >= t.max_nonfinite_steps:
                if bar is not None:
                    bar.close()
                return last_step, (f"stopped: steps {nonfinite_run[0]}-{nonfinite_run[-1]} all had a non-finite loss "
                                   f"or gradient, so their updates were skipped; the saved adapter holds the weights "
                                   f"of the last good update. Lower train.learning_rate, check the rewards, or raise "
                                   f"train.max_nonfinite_steps")
            self._run_callbacks(metrics)
            if t.save_steps and (step + 1) % t.save_steps == 0 and step + 1 < self.max_steps:
                self._save_checkpoint(step + 1)
        if bar is not None:
            bar.close()
        return last_step, None

    def _step(self, step: int) -> dict:
        """One GRPO step: rollout, scoring passes, num_iterations updates; returns its metrics."""
        cfg, t, s, lc = self.args, self.args.train, self.args.sampling, self.args.loss
        t0 = time.perf_counter()
        self._phase = "sampling"
        batch = rollout.collect_rollout(self.model, self.tokenizer, self.generator, self.stream, self.rewards, cfg,
                                        step, self.state, tools=self.tools)
        _echo_all(self.echo, self.generator.take_notices())
        release_free_memory()  # the sampling phase's freed pages, before training needs memory
        t_sample = time.perf_counter() - t0
        n_seq = len(batch.batch)
        # scoring passes (old / ref log-probs, the step's entropies) and num_iterations updates;
        # also the sampler-vs-trainer log-prob metrics (sampling/*)
        self._phase = "training"  # its scoring passes included
        # this rank's groups (one process: all), normalizers and gradients summed over ranks
        loss_metrics = update_policy(policy_modules(self.model), self.optimizer, self.scheduler, self.params,
                                     shard_rollout(batch, s.num_generations),
                                     cfg, self.state.loss_state, echo=self.echo,
                                     micro_batch_tokens=self.micro_batch_tokens, threads=self.thread_governor)
        skipped = loss_metrics.pop("skipped_update")
        if t.release_memory == "step":  # the update's freed pages (micro_batch: released after each one)
            release_free_memory()
        t_step = time.perf_counter() - t0
        state = self.state
        state.global_step = step + 1
        state.num_tokens += batch.stats["prompt_tokens"] + batch.stats["completion_tokens"]
        state.epoch = self.stream.epoch + self.stream.index / max(1, len(self.stream)) \
            if isinstance(self.stream, PromptStream) else float(self.stream.epoch)
        metrics = {
            **rollout.rollout_metrics(batch, self.rewards.names, s.num_generations),
            **loss_metrics,
            "num_tokens": state.num_tokens,
            "completion_tokens": batch.stats["completion_tokens"],  # generated this step
            "nonfinite_updates": skipped,
            "reward_errors": batch.stats["reward_errors"],
            **{k: v for k, v in batch.stats.items() if k.startswith(("reward_errors/", "sampler/", "tools/"))},
            "dynamic_rounds": batch.stats["dynamic_rounds"],
            "zero_std_groups": batch.stats["zero_std_groups"],
            "learning_rate": self.scheduler.get_last_lr()[0],
            "epoch": state.epoch,
            "time/sample_s": t_sample,
            "time/step_s": t_step,
            "tokens_per_s": batch.stats["completion_tokens"] / t_step if t_step > 0 else 0.0,
        }
        if batch.stats["reward_errors"]:
            failed = ", ".join(f"{k.split('/', 1)[1]!r} on {v}" for k, v in batch.stats.items()
                               if k.startswith("reward_errors/"))
            self.echo(f"step {step + 1}: reward functions failed ({failed} of {n_seq} completions; "
                      f"rewards.on_reward_error={cfg.rewards.on_reward_error})")
        if t.eval_steps and (step + 1) % t.eval_steps == 0 and step + 1 < self.max_steps:
            evaluated = self._evaluate()
            if evaluated is not None:
                metrics.update(evaluated.metrics)
        state.history.append({k: metrics[k] for k in ("reward", "kl") if k in metrics})
        if (step + 1) % t.logging_steps == 0 or step + 1 == self.max_steps:
            self.reporter.log(step + 1, metrics)
            _echo_all(self.echo, self.reporter.take_notices())
            self.reporter.log_completions(step + 1, [
                {"prompt": batch.prompts[i], "completion": batch.texts[i], "reward": float(batch.total_reward[i]),
                 **{f"rewards/{n}": _none_if_nan(batch.rewards[i, j]) for j, n in enumerate(self.rewards.names)},
                 "advantage": float(batch.advantages[i])}
                for i in range(min(t.log_completions, n_seq))])
        return metrics

    def _stop_agreed(self, stops: StopRequests) -> bool:
        """A stop asked on any rank (a signal, a callback) stops every rank before the same step."""
        asked = dist.all_gather_object((stops.requested, stops.signum, bool(self.state.should_stop)))
        for name, signum, should_stop in asked:
            if name and not stops.requested:
                stops.requested, stops.signum = name, signum
            self.state.should_stop = self.state.should_stop or should_stop
        return bool(stops.requested or self.state.should_stop)

    def _run_callbacks(self, metrics: dict) -> None:
        for cb in self.callbacks:
            hook = getattr(cb, "on_step_end", None) or cb
            if hook(self.state, metrics) is True:
                self.state.should_stop = True
        if self.state.should_stop:
            self.echo(f"a callback stopped the run after step {self.state.global_step}")

    def _evaluate(self) -> EvalResult | None:
        if not self.eval_prompts:
            return None
        cfg = self.args
        return evaluate(self.generator, self.tokenizer, self.eval_prompts, self.eval_rewards,
                        max_tokens=cfg.eval.max_completion_length or cfg.sampling.max_completion_length,
                        num_generations=cfg.eval.num_generations, temperature=cfg.eval.temperature,
                        stop=cfg.sampling.stop, success_threshold=cfg.eval.success_threshold, seed=cfg.train.seed,
                        trainer_state=self.state, tools=self.tools, data_cfg=cfg.data)

    # ---------------------------------------------------------------- saving and the end

    def _save_checkpoint(self, step: int) -> Path:
        _require_finite(self.params)
        self._last_saved = step
        rngs = dist.all_gather_object(ckpt.rng_state())  # each rank's, for an exact resume
        whole = {}
        if self.sharded:  # the whole weights and optimizer state, gathered on rank 0 (all ranks take part)
            whole = dict(model_state=sharding.full_state(self.model),
                         optimizer_state=sharding.full_optimizer_state(self.model, self.optimizer))
        return dist.on_main("saving a checkpoint", ckpt.save_checkpoint, self.out_dir / "checkpoints", step,
                            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, stream=self.stream,
                            trainer_state=self.state.to_dict(), config=self.args.to_dict(),
                            keep=self.args.train.save_total_limit, rank_rngs=rngs, **whole)

    def _save_adapter_and_checkpoint(self, last_step: int, took_steps: bool) -> None:
        """The adapter first, so that nothing after it can cost the user the run; then the
        checkpoint (a resumed run that took no step already has its own)."""
        self.save_model()
        if took_steps:
            self._save_checkpoint(last_step)

    def _finish(self, last_step: int) -> RunResult:
        cfg, out_dir = self.args, self.out_dir
        if cfg.train.merge:
            dist.on_main("saving the merged model", save_merged, cfg.model, out_dir / "adapter", out_dir / "merged")
            self.echo(f"merged model saved to {out_dir / 'merged'}")
        after = self._evaluate()
        if self.tools is not None:
            self.tools.close()  # its threads and event loop: the final eval was their last use
        if after is not None:
            self.reporter.log(last_step, after.metrics)
            self._after = after.metrics
            self.save_model()  # the card with the final metrics
        self.reporter.close()
        if cfg.train.push_to_hub:
            from grpo_fast.train.hub import push_to_hub

            repo = cfg.train.hub_model_id or out_dir.name
            url = dist.on_main("pushing to the hub", push_to_hub, out_dir / "adapter", repo,
                               private=cfg.train.hub_private_repo)
            self.echo(f"adapter pushed to {url}")
        dist.on_main("plotting the run", plot_run, out_dir)
        self.echo(f"adapter saved to {out_dir / 'adapter'}")
        before = self.state.eval_before
        if after is not None:
            self.echo(f"eval {_headline_change(before, after.metrics)}")
        return RunResult(_headline_value(before), _headline_value(after.metrics if after else None), last_step,
                         out_dir, self.state.history, after.metrics if after else None)

    def _card_metrics(self) -> dict:
        out = {f"before/{k}": v for k, v in (self.state.eval_before or {}).items()}
        out.update({f"after/{k}": v for k, v in getattr(self, "_after", {}).items()})
        return out


# ---------------------------------------------------------------- helpers


def _quiet(*_args, **_kwargs) -> None:
    """The echo of ranks other than 0."""


class _NoTrackers:
    """The trackers of ranks other than 0 (rank 0 writes the run's metrics)."""

    def log(self, step, metrics) -> None:
        pass

    def log_completions(self, step, rows) -> None:
        pass

    def take_notices(self) -> list[str]:
        return []

    def close(self, exit_code: int = 0) -> None:
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _find_resumable(out_dir: Path, ckpt_root: Path, wanted: bool, explicit, echo) -> ckpt.Resumable | None:
    """The checkpoint to continue from (None: start fresh). An explicit folder is used as given
    (after verification); otherwise the newest that verifies. Never starts fresh over a run that
    has files but no usable checkpoint."""
    if not wanted:
        return None
    if isinstance(explicit, (str, Path)) and not isinstance(explicit, bool):
        path = Path(explicit)
        problem = ckpt.verify(path) if path.is_dir() else "not a folder"
        step = ckpt.checkpoint_step(path)
        if problem is not None or step is None:
            raise ResumeError(f"resume_from_checkpoint: {path} cannot be resumed from ({problem or 'not a checkpoint-N folder'})")
        return ckpt.Resumable(path, step, [])
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


def _require_finite(params) -> None:
    """Never save NaN / inf weights (they would silently replace a good adapter)."""
    bad = sum(not bool(torch.isfinite(sharding.local_shard(p)).all()) for p in params)
    if dist.all_reduce_sum(int(bad)):  # every rank decides alike (a sharded run: each checks its shard)
        raise TrainingStopped("stopped: the trainable weights hold NaN / inf values, so nothing was saved; the "
                              "last checkpoint in the run folder is intact (resume from it with a lower "
                              "train.learning_rate)")


def _headline_key(metrics: dict | None) -> str | None:
    if not metrics:
        return None
    if "eval/accuracy/mean" in metrics:
        return "eval/accuracy/mean"
    return next((k for k in metrics if k.endswith("/mean") and not k.startswith("eval/completions")), None)


def _headline_value(metrics: dict | None) -> float | None:
    key = _headline_key(metrics)
    return None if key is None else metrics[key]


def _headline(metrics: dict) -> str:
    key = _headline_key(metrics)
    if key is None:
        return "no scored prompts"
    name = key[len("eval/"):-len("/mean")]
    return f"{name} {100 * metrics[key]:.1f}%" if name == "accuracy" else f"{name} {metrics[key]:.4f}"


def _headline_change(before: dict | None, after: dict) -> str:
    """'accuracy: before 24.0% -> after 69.0%' (the line the default job's test reads)."""
    key = _headline_key(after)
    if key is None:
        return "after: no scored prompts"
    name = key[len("eval/"):-len("/mean")]
    fmt = (lambda v: f"{100 * v:.1f}%") if name == "accuracy" else (lambda v: f"{v:.4f}")
    b = fmt(before[key]) if before and key in before else "n/a"
    return f"{name}: before {b} -> after {fmt(after[key])}"


def _none_if_nan(x) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def _dataset_name(cfg) -> str:
    if cfg.data.path:
        return cfg.data.path
    return f"built-in task {cfg.data.task!r}" if cfg.data.task else "a datasets.Dataset passed to GRPOTrainer"


def _echo_all(echo, lines: list[str]) -> None:
    for line in lines:
        echo(line)


def _progress(t, start: int, total: int):
    if not t.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="grpo", unit="step", dynamic_ncols=True)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
