"""Run configuration: one dataclass per concern, validated on construction.

Names follow TRL's GRPOConfig where the meaning is the same (`num_generations`, `beta`,
`epsilon`, `epsilon_high`, `loss_type`, `max_completion_length`, `temperature`, `top_p`, ...).
Batch sizes are counted in prompts: a step samples `prompts_per_step` prompts × `num_generations`
completions.

A config is built from a YAML file (sections `model`, `lora`, `sampling`, `loss`, `train`,
`data`, `rewards`, `eval`, `tools`) plus `--key value` overrides, where key is `section.field` or a bare field
name that is unique across sections. Every error is a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from grpo_fast.errors import ConfigError
from grpo_fast.loss.options import (IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPE_NAMES, MULTI_OBJECTIVE_AGGREGATIONS,
                                    OLD_LOGPROBS_SOURCES, SAMPLING_CORRECTIONS, SCALE_REWARDS, option_warnings)


# train.release_memory: when the CPU heap's freed pages go back to the OS
RELEASE_MEMORY = ("micro_batch", "step")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _choice(value: Any, name: str, choices: tuple) -> None:
    _check(value in choices, name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass
class ModelConfig:
    """Which model to train and how to hold it in memory."""

    name_or_path: str | None = None  # None = the built-in SmolLM2-135M-Instruct
    gguf_file: str | None = None  # a GGUF file inside name_or_path (or a path to one)
    dtype: str = "auto"  # auto = fp32 on CPU, bf16 on CUDA
    load_in_4bit: bool = False  # NF4 + double quant through bitsandbytes
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # None = flash_attention_2 when installed on CUDA, else sdpa
    device: str = "auto"  # auto = cuda when available, else cpu

    def __post_init__(self) -> None:
        _choice(self.dtype, "model.dtype", ("auto", "float32", "bfloat16", "float16"))
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "model.device",
               f"must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class LoraConfig:
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # None = every linear layer of the transformer blocks (attention + MLP), not the LM head.
    target_modules: list[str] | None = None
    # false: full fine-tuning, no adapters: every weight trains (an unquantized base); with
    # loss.beta > 0 the reference policy is a frozen copy of the starting weights (one more copy)
    enabled: bool = True

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", f"must be > 0, got {self.r}")
        _check(self.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        _check(0.0 <= self.lora_dropout < 1.0, "lora.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")


@dataclass
class SamplingConfig:
    num_generations: int = 8  # G completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    max_prompt_length: int = 512
    max_completion_length: int = 256
    stop: list[str] | None = None
    backend: str = "auto"  # auto = our paged Sampler when it supports the model, else HF generate
    kv_budget: str | None = None  # "2GiB", "65536 tokens", auto (device memory minus the plan's training peak); None = a step's worth

    def __post_init__(self) -> None:
        _check(self.num_generations >= 2, "sampling.num_generations",
               f"GRPO compares completions within a group, so it needs >= 2, got {self.num_generations}")
        _check(self.temperature > 0, "sampling.temperature", f"must be > 0 for training, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "sampling.top_k", f"must be >= 0, got {self.top_k}")
        _check(0.0 <= self.min_p < 1.0, "sampling.min_p", f"must be in [0, 1), got {self.min_p}")
        _check(self.max_prompt_length > 0, "sampling.max_prompt_length", f"must be > 0, got {self.max_prompt_length}")
        _check(self.max_completion_length > 0, "sampling.max_completion_length",
               f"must be > 0, got {self.max_completion_length}")
        _choice(self.backend, "sampling.backend", ("auto", "sampler", "hf"))
        if self.kv_budget is not None and self.kv_budget != "auto":
            from grpo_fast.sampler.kv_budget import check_kv_budget

            check_kv_budget(self.kv_budget)


@dataclass
class LossConfig:
    """The loss (grpo_fast/loss/objective.py has the math of every option). Names and meanings are
    TRL 1.16's; defaults too, except where noted."""

    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo
    beta: float = 0.0  # KL coefficient; > 0 needs reference log-probs (adapters disabled)
    use_bias_correction_kl: bool = True  # KL × the ratio: the unbiased reverse-KL gradient (DeepSeek-V3.2)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None = epsilon (cispo: its weight clip; TRL recommends ~5)
    delta: float | None = None  # two-sided clipping bound (INTELLECT-2); None = off
    importance_sampling_level: str = "token"  # "sequence" = GSPO
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    scale_rewards: str = "group"  # group | batch | none
    multi_objective_aggregation: str = "sum_then_normalize"  # or normalize_then_sum (GDPO)
    num_iterations: int = 1  # μ: policy updates per generation batch
    mask_truncated_completions: bool = False
    top_entropy_quantile: float = 1.0  # ρ: loss on the top-ρ tokens by entropy (the step's quantile); 1 = all
    entropy_coef: float = 0.0  # entropy bonus (mean entropy of the loss's tokens); the initial one when adaptive
    use_adaptive_entropy: bool = False  # Skywork-OR1's controller of entropy_coef
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    off_policy_mask_threshold: float | None = None  # drop A < 0 sequences whose sampler-vs-current log-ratio > δ
    # The sampler's log-probs vs the trainer's: always measured and logged (sampling/*); corrected by
    # an importance ratio (TRL's vllm_importance_sampling_*; ours: off by default, the sampler runs the
    # training modules themselves) with token_truncate | token_mask | sequence_truncate | sequence_mask.
    sampling_correction: str = "none"
    sampling_correction_clip_min: float | None = None
    sampling_correction_clip_max: float | None = 3.0
    # num_iterations > 1: old log-probs from a scoring pass (rescore) or from the sampler (saves the
    # pass) while each step's measured mean |sampler - trainer| stays within old_logprobs_tolerance.
    old_logprobs: str = "rescore"
    old_logprobs_tolerance: float = 1e-3  # nats

    def __post_init__(self) -> None:
        _choice(self.loss_type, "loss.loss_type", LOSS_TYPE_NAMES)
        _check(self.beta >= 0, "loss.beta", f"must be >= 0, got {self.beta}")
        _check(self.epsilon >= 0, "loss.epsilon", f"must be >= 0, got {self.epsilon}")
        _check(self.epsilon_high is None or self.epsilon_high >= 0, "loss.epsilon_high",
               f"must be >= 0, got {self.epsilon_high}")
        _check(self.delta is None or self.delta > 1.0, "loss.delta", f"must be > 1 when set, got {self.delta}")
        _choice(self.importance_sampling_level, "loss.importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            _check(getattr(self, name) > 0, f"loss.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _check(getattr(self, name) >= 0, f"loss.{name}", f"must be >= 0, got {getattr(self, name)}")
        _choice(self.scale_rewards, "loss.scale_rewards", SCALE_REWARDS)
        _choice(self.multi_objective_aggregation, "loss.multi_objective_aggregation", MULTI_OBJECTIVE_AGGREGATIONS)
        _check(self.num_iterations >= 1, "loss.num_iterations", f"must be >= 1, got {self.num_iterations}")
        _check(0.0 <= self.top_entropy_quantile <= 1.0, "loss.top_entropy_quantile",
               f"must be in [0, 1], got {self.top_entropy_quantile}")
        _check(self.entropy_coef_min <= self.entropy_coef_max, "loss.entropy_coef_min",
               f"({self.entropy_coef_min}) must be <= loss.entropy_coef_max ({self.entropy_coef_max})")
        _check(self.entropy_coef_delta >= 0, "loss.entropy_coef_delta", f"must be >= 0, got {self.entropy_coef_delta}")
        _choice(self.sampling_correction, "loss.sampling_correction", SAMPLING_CORRECTIONS)
        lo, hi = self.sampling_correction_clip_min, self.sampling_correction_clip_max
        _check(lo is None or lo >= 0, "loss.sampling_correction_clip_min", f"must be >= 0, got {lo}")
        _check(hi is None or hi > 0, "loss.sampling_correction_clip_max", f"must be > 0, got {hi}")
        _check(lo is None or hi is None or lo < hi, "loss.sampling_correction_clip_min",
               f"({lo}) must be < loss.sampling_correction_clip_max ({hi})")
        _check(not (self.sampling_correction.endswith("truncate") and lo is None and hi is None),
               "loss.sampling_correction_clip_max", "a *_truncate correction needs a clip bound")
        _check(self.loss_type != "vespo" or self.sampling_correction in ("none", "token_truncate", "token_mask"),
               "loss.sampling_correction", f"loss_type vespo takes none, token_truncate or token_mask, got "
                                           f"{self.sampling_correction!r}")
        _choice(self.old_logprobs, "loss.old_logprobs", OLD_LOGPROBS_SOURCES)
        _check(self.old_logprobs_tolerance >= 0, "loss.old_logprobs_tolerance",
               f"must be >= 0, got {self.old_logprobs_tolerance}")

    def warnings(self) -> list[str]:
        """What TRL warns about in this combination (the trainer prints it once)."""
        return option_warnings(self.loss_type, self.importance_sampling_level, self.epsilon_high)


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 100
    num_train_epochs: float = 0.0  # > 0: the run's length, max_steps = ceil(epochs * train prompts / prompts_per_step)
    prompts_per_step: int = 8  # B: prompts per step; the step trains on B × G completions
    micro_batch_size: int = 0  # completions per forward/backward; 0 = the whole step at once
    # packed tokens per forward/backward instead (overrides micro_batch_size): an int, or auto = the
    # largest budget the memory plan fits on the device (grpo_fast.memory)
    micro_batch_tokens: str | None = None
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant (after the warmup)
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    optim: str = "auto"  # auto = adamw_8bit on CUDA, adamw on CPU; or adamw | adamw_8bit | paged_adamw_8bit
    seed: int = 0
    save_steps: int = 0  # 0 = only at the end
    eval_steps: int = 0  # 0 = only before and after
    eval_before: bool = True
    logging_steps: int = 1
    log_completions: int = 2  # completions written to the metrics per step
    time_budget_s: float = 0  # > 0: stop taking steps when the next step + final eval would exceed it
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, draw more prompts
    max_dynamic_rounds: int = 4  # extra sampling rounds per step at most
    num_threads: int = 0  # torch CPU threads; 0 = leave torch's default
    # CPU: each training / scoring micro-batch runs on as many torch threads as the cores other
    # processes left free during the previous one (measured from /proc/stat), so a busy neighbour
    # process costs its fair share, not a collapse (grpo_fast/thread_governor.py). false: torch's count
    adaptive_threads: bool = True
    # CPU: when freed heap pages go back to the OS (malloc_trim; grpo_fast/train/memory.py).
    # micro_batch: after sampling and after every micro-batch's backward, the leanest resident set;
    # step: after sampling and after the update only, so the micro-batches of a step reuse each
    # other's pages instead of faulting them in afresh: the training phase in 0.80-0.94x the time
    # (SmolLM2-135M, bf16 / fp32) for a 15-22% higher training peak (benchmarks/RESULTS.md, "When
    # freed memory goes back"). The memory plan counts either
    release_memory: str = "micro_batch"
    # under torchrun: how long a collective waits for the other ranks before failing (seconds;
    # the environment variable GRPO_FAST_COLLECTIVE_TIMEOUT_S overrides it). See grpo_fast/distributed.py
    collective_timeout_s: float = 600.0
    # under torchrun with lora.enabled false: shard every weight, gradient and optimizer state
    # across the ranks (FSDP2; grpo_fast/train/sharding.py). One process: nothing to shard
    fsdp: bool = False
    progress: bool = True
    resume: bool = False  # continue from the newest complete checkpoint in output_dir/checkpoints
    overwrite: bool = False  # start afresh in an output_dir that holds a run (its run files are removed)
    merge: bool = False  # also save a merged (adapter folded in) model at the end
    max_nonfinite_steps: int = 3  # stop after this many consecutive updates with a NaN / inf loss or gradient
    save_total_limit: int = 2  # checkpoints kept (the newest)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # + jsonl always; wandb | trackio | none
    run_name: str | None = None  # trackers' run name (default: the output_dir's name)
    project: str | None = None  # trackers' project (W&B / trackio)
    push_to_hub: bool = False  # upload the adapter and its model card at the end
    hub_model_id: str | None = None  # repo for push_to_hub (default: the output_dir's name)
    hub_private_repo: bool | None = None

    def __post_init__(self) -> None:
        _check(self.max_steps >= 0, "train.max_steps", f"must be >= 0, got {self.max_steps}")
        _check(self.prompts_per_step >= 1, "train.prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        _check(self.micro_batch_size >= 0, "train.micro_batch_size", f"must be >= 0, got {self.micro_batch_size}")
        mbt = self.micro_batch_tokens
        _check(mbt is None or mbt == "auto" or (str(mbt).isdigit() and int(mbt) > 0), "train.micro_batch_tokens",
               f"must be a positive number of tokens or auto, got {mbt!r}")
        _check(self.learning_rate > 0 and math.isfinite(self.learning_rate), "train.learning_rate",
               f"must be a positive number, got {self.learning_rate}")
        _choice(self.lr_scheduler_type, "train.lr_scheduler_type", ("cosine", "linear", "constant"))
        _check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        _choice(self.optim, "train.optim", ("auto", "adamw", "adamw_8bit", "paged_adamw_8bit"))
        _choice(self.release_memory, "train.release_memory", RELEASE_MEMORY)
        _check(self.save_steps >= 0, "train.save_steps", f"must be >= 0, got {self.save_steps}")
        _check(self.eval_steps >= 0, "train.eval_steps", f"must be >= 0, got {self.eval_steps}")
        _check(self.logging_steps >= 1, "train.logging_steps", f"must be >= 1, got {self.logging_steps}")
        _check(self.time_budget_s >= 0, "train.time_budget_s", f"must be >= 0 (0 = off), got {self.time_budget_s}")
        _check(self.max_dynamic_rounds >= 0, "train.max_dynamic_rounds", f"must be >= 0, got {self.max_dynamic_rounds}")
        _check(self.collective_timeout_s > 0, "train.collective_timeout_s",
               f"must be > 0 seconds, got {self.collective_timeout_s}")
        _check(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", f"must be >= 1, got {self.max_nonfinite_steps}")
        _check(not (self.resume and self.overwrite), "train.overwrite", "and train.resume exclude each other")
        _check(self.num_train_epochs >= 0, "train.num_train_epochs", f"must be >= 0, got {self.num_train_epochs}")
        _check(self.save_total_limit >= 1, "train.save_total_limit", f"must be >= 1, got {self.save_total_limit}")


@dataclass
class EvalConfig:
    """Evaluation on the held-out split (before and after training, and every train.eval_steps):
    `num_generations` completions per prompt (1 = greedy), scored by `reward_funcs`; logged as
    eval/<func>/mean, and eval/<func>/pass@k for k = 1, 2, 4, ... <= num_generations (a sample
    passes when its reward >= success_threshold)."""

    num_generations: int = 1  # TRL's num_generations_eval; 1 = one greedy completion per prompt
    temperature: float = 1.0  # with num_generations > 1 (greedy otherwise)
    reward_funcs: list[str] | None = None  # None: accuracy (when the data has answers) else the run's rewards
    success_threshold: float = 1.0
    max_completion_length: int | None = None  # None = sampling.max_completion_length

    def __post_init__(self) -> None:
        _check(self.num_generations >= 1, "eval.num_generations", f"must be >= 1, got {self.num_generations}")
        _check(self.temperature > 0, "eval.temperature", f"must be > 0, got {self.temperature}")
        _check(self.max_completion_length is None or self.max_completion_length > 0, "eval.max_completion_length",
               f"must be > 0, got {self.max_completion_length}")


@dataclass
class DataConfig:
    task: str | None = "arithmetic"  # a built-in task (arithmetic | countdown); ignored when path is set
    path: str | None = None  # JSONL / CSV / Parquet file of prompts
    format: str = "auto"  # auto (by extension) | jsonl | csv | parquet | gsm8k
    eval_path: str | None = None
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    system_prompt: str | None = None
    prompt_template: str = "{prompt}"  # applied to the prompt column before the chat template
    use_chat_template: bool = True
    chat_template_kwargs: dict | None = None  # extra chat-template variables, e.g. {enable_thinking: false}
    train_size: int = 2000  # built-in tasks: number of training problems
    eval_size: int = 100  # eval problems (built-in tasks; a cap for files)
    eval_fraction: float = 0.1  # a file without eval_path: at most this share of its rows is held out (<= 0.5)
    task_seed: int = 1234
    difficulty: str = "easy"  # built-in tasks: easy | medium | hard
    on_long_prompt: str = "error"  # error | skip (counted); never truncated

    def __post_init__(self) -> None:
        _check(self.task is not None or self.path is not None, "data.task",
               "set data.task (a built-in task) or data.path (a file)")
        _choice(self.format, "data.format", ("auto", "jsonl", "csv", "parquet", "gsm8k"))
        _choice(self.on_long_prompt, "data.on_long_prompt", ("error", "skip"))
        _choice(self.difficulty, "data.difficulty", ("easy", "medium", "hard"))
        _check(self.train_size >= 1, "data.train_size", f"must be >= 1, got {self.train_size}")
        _check(self.eval_size >= 0, "data.eval_size", f"must be >= 0, got {self.eval_size}")
        _check(0.0 <= self.eval_fraction <= 0.5, "data.eval_fraction", f"must be in [0, 0.5], got {self.eval_fraction}")
        _check("{prompt}" in self.prompt_template, "data.prompt_template", "must contain {prompt}")
        if self.path is None and self.task is not None:
            from grpo_fast.tasks import TASKS

            _choice(self.task, "data.task", tuple(TASKS))


@dataclass
class RewardsConfig:
    # Names of built-in rewards (accuracy, format, overlong, judge, tool_use) or "module:function".
    funcs: list[str] = field(default_factory=lambda: ["accuracy"])
    weights: list[float] | None = None  # None = 1.0 each
    on_reward_error: str = "raise"  # raise | zero | skip
    format_pattern: str | None = None  # None = rewards.DEFAULT_FORMAT_PATTERN
    overlong_buffer: int = 0  # DAPO soft overlong: penalty ramps over the last N tokens (0 = max/4)
    overlong_penalty: float = 1.0
    judge_model: str | None = None  # a local HF folder for the `judge` reward
    judge_rubric: str | None = None  # None = rewards.DEFAULT_RUBRIC
    timeout_s: float = 600.0  # a reward call that takes longer fails (handled as on_reward_error says)

    def __post_init__(self) -> None:
        _check(len(self.funcs) >= 1, "rewards.funcs", "needs at least one reward function")
        _choice(self.on_reward_error, "rewards.on_reward_error", ("raise", "zero", "skip"))
        if self.weights is not None:
            _check(len(self.weights) == len(self.funcs), "rewards.weights",
                   f"has {len(self.weights)} values for {len(self.funcs)} funcs")
            _check(all(math.isfinite(w) for w in self.weights), "rewards.weights", "must be finite numbers")
        _check(self.overlong_buffer >= 0, "rewards.overlong_buffer", f"must be >= 0, got {self.overlong_buffer}")
        _check(self.timeout_s > 0, "rewards.timeout_s", f"must be > 0, got {self.timeout_s}")
        if "judge" in self.funcs:
            _check(self.judge_model is not None, "rewards.judge_model", "the judge reward needs a local model folder")
        for name in self.funcs:
            _check(name in ("accuracy", "format", "overlong", "judge", "tool_use") or ":" in name, "rewards.funcs",
                   f"{name!r} is neither a built-in reward (accuracy, format, overlong, judge, tool_use) nor "
                   f"module:function")


@dataclass
class ToolsConfig:
    """Multi-turn tool calling (grpo_fast/rollout): the model calls tools, reads their results and
    goes on; sampling.max_completion_length bounds the whole trajectory (model + tool tokens).
    In Python, GRPOTrainer(tools=[functions], environment_factory=...) sets functions and
    environment as objects; here they are import paths."""

    functions: list[str] | None = None  # "module:function" or built-in tools (calculator)
    environment: str | None = None  # "module:Factory": one instance per rollout, its public methods are the tools
    max_tool_calling_iterations: int | None = None  # tool-calling turns per trajectory; None = until the budget ends
    tool_call_parser: str | None = None  # hermes | llama3 | mistral | module:object; None = from the chat template
    tool_timeout_s: float = 30.0  # a tool call that takes longer becomes a timeout observation
    max_tool_workers: int = 8  # threads running blocking tools while the sampler decodes

    def __post_init__(self) -> None:
        m = self.max_tool_calling_iterations
        _check(m is None or m >= 1, "tools.max_tool_calling_iterations", f"must be >= 1 or None, got {m}")
        _check(self.tool_timeout_s > 0, "tools.tool_timeout_s", f"must be > 0 seconds, got {self.tool_timeout_s}")
        _check(self.max_tool_workers >= 1, "tools.max_tool_workers", f"must be >= 1, got {self.max_tool_workers}")
        for name in self.functions or []:
            _check(":" in name or name in BUILTIN_TOOLS, "tools.functions",
                   f"{name!r} is neither a built-in tool ({', '.join(BUILTIN_TOOLS)}) nor module:function")
        _check(self.environment is None or ":" in self.environment, "tools.environment",
               f"must be module:Factory, got {self.environment!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.functions) or self.environment is not None


BUILTIN_TOOLS = {"calculator": "grpo_fast.rollout.builtin_tools:calculator"}  # name -> module:function


SECTIONS = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "sampling": SamplingConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "rewards": RewardsConfig,
    "eval": EvalConfig,
    "tools": ToolsConfig,
}


# Sections whose fields repeat a primary section's names (eval.temperature beside sampling.temperature):
# a bare --name means the primary one; these are always written --eval.name.
SECONDARY = ("eval",)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)

    def __post_init__(self) -> None:
        # Non-finite numbers are refused everywhere (an inf beta trains NaNs into the adapter).
        for name, section in self.sections().items():
            for f in fields(section):
                value = getattr(section, f.name)
                values = value if isinstance(value, list) else [value]
                for v in values:
                    _check(not isinstance(v, float) or math.isfinite(v), f"{name}.{f.name}",
                           f"must be a finite number, got {value!r}")

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SECTIONS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict | None) -> Config:
        raw = dict(raw or {})
        unknown = set(raw) - set(SECTIONS)
        _check(not unknown, sorted(unknown)[0] if unknown else "", f"unknown section; sections are {', '.join(SECTIONS)}")
        parts = {}
        for name, klass in SECTIONS.items():
            section = raw.get(name) or {}
            _check(isinstance(section, dict), name, f"must be a mapping, got {type(section).__name__}")
            parts[name] = _build_section(name, klass, section)
        return cls(**parts)


def _build_section(section: str, klass: type, values: dict) -> Any:
    hints = get_type_hints(klass)
    known = {f.name for f in fields(klass)}
    kwargs = {}
    for key, value in values.items():
        _check(key in known, f"{section}.{key}", f"unknown field; {section} has {', '.join(sorted(known))}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return klass(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML value or a CLI string to the field's type, or raise naming the field."""
    args = get_args(hint)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        inner = [a for a in args if a is not type(None)]
        hint = inner[0]
    base = get_origin(hint) or hint
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{name}: must be a finite number, got {value!r}")
            return number
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if base is dict:
            if isinstance(value, str):  # from the command line: JSON, e.g. '{"enable_thinking": false}'
                import json

                value = json.loads(value)
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if base is list:
            (elem,) = get_args(hint)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(v, elem, name) for v in value]
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


# The default job (`grpo-fast train` with no arguments; examples/cpu_default.yaml holds the same):
# SmolLM2-135M-Instruct fp32 + LoRA on the built-in `arithmetic` task, on the CPU, in < 15 min.
# Short completions (the prompt asks for just the number) keep sampling cheap; G = 8 gives most
# groups a spread of right and wrong answers; a LoRA learning rate that moves in ~40 steps without
# collapsing: at 1e-3 the policy's entropy fell from 1.9 to 0.2 in 6 steps and, in some runs
# (differing only in fp32 rounding), locked into restating the sum with a wrong answer (24% -> 7%).
DEFAULT_JOB: dict = {
    "model": {"name_or_path": None},
    "lora": {"r": 16, "lora_alpha": 32},
    "sampling": {"num_generations": 8, "temperature": 1.0, "max_completion_length": 16, "max_prompt_length": 128},
    "loss": {"loss_type": "dapo", "beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.28},
    "train": {"output_dir": "runs/default", "max_steps": 40, "prompts_per_step": 4, "micro_batch_size": 8,
              "learning_rate": 5e-4, "warmup_steps": 2, "time_budget_s": 840},
    "data": {"task": "arithmetic", "difficulty": "easy", "train_size": 2000, "eval_size": 100},
    "rewards": {"funcs": ["accuracy"]},
}


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                base: dict | None = None) -> Config:
    """Read a YAML file (optional; else `base`, e.g. DEFAULT_JOB) and apply overrides.

    overrides: a list like ["--train.max_steps", "10", "--beta", "0.04"] (a bare field name must be
    unique across sections), or a dict {"train.max_steps": 10}.
    """
    raw: dict = {k: dict(v) for k, v in (base or {}).items()}
    if path is not None:
        raw = read_yaml(path)
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in _parse_overrides(overrides).items():
        section, name = _resolve_key(key)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raw[section] = {}
        raw[section][name] = value
    return Config.from_dict(raw)


def read_yaml(path: str | Path) -> dict:
    """A config file's sections; ConfigError naming the file (and line) when it cannot be read."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    if path.is_dir():
        raise ConfigError(f"--config: {str(path)!r} is a folder, not a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config: cannot read {str(path)!r}: {exc}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config: {path}{where} is not valid YAML: {problem}") from None
    _check(isinstance(raw, dict), str(path), "the config file must be a mapping of sections")
    return raw


def _parse_overrides(overrides: list[str] | dict | None) -> dict:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out: dict = {}
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--"):
            raise ConfigError(f"{token}: expected --key value")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            value = overrides[i + 1]
            i += 2
        else:  # a bare flag: --merge
            value = "true"
            i += 1
        out[key.replace("-", "_")] = value
    return out


def _resolve_key(key: str) -> tuple[str, str]:
    if "." in key:
        section, name = key.split(".", 1)
        _check(section in SECTIONS, key, f"unknown section {section!r}; sections are {', '.join(SECTIONS)}")
        return section, name
    owners = [s for s, k in SECTIONS.items() if key in {f.name for f in fields(k)}]
    _check(len(owners) > 0, key, "unknown option")
    if len(owners) > 1 and len([s for s in owners if s not in SECONDARY]) == 1:
        owners = [s for s in owners if s not in SECONDARY]  # --temperature is sampling's, --eval.temperature eval's
    _check(len(owners) == 1, key, f"ambiguous; write one of {', '.join(f'{s}.{key}' for s in owners)}")
    return owners[0], key
