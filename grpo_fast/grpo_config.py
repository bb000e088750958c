"""`GRPOConfig`: our sections, built from TRL's flat `GRPOConfig` field names.

    GRPOConfig(output_dir="runs/x", learning_rate=1e-5, num_generations=8, beta=0.04,
               per_device_train_batch_size=8, gradient_accumulation_steps=4, report_to="wandb")

Each TRL field either maps onto a field of ours (the table `TRL_FIELDS`; a few convert, e.g. TRL's
batch sizes counted in completions become prompts per step), or is accepted only at TRL's own
default (`TRL_DEFAULTS`: passing it changes nothing), or is an error that names it: a script
never runs with an option silently ignored. Our own names work too: a section (`lora={...}` or a
`LoraConfig`), `section.field`-style keywords (`**{"lora.r": 8}`) and bare field names that are
unique to one section (`prompts_per_step=4`). Unset fields keep *our* defaults, not TRL's
(README: "Coming from TRL" lists where they differ). Flat reads work as in TRL:
`args.learning_rate` is `args.train.learning_rate`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from grpo_fast.config import SECTIONS, Config, ConfigError, _resolve_key, load_config
from grpo_fast.trl_fields import TRL_DEFAULTS

OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw": "adamw", "adamw_8bit": "adamw_8bit",
              "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def _scale_rewards(v):
    return {True: "group", False: "none"}.get(v, v) if isinstance(v, bool) else v


def _report_to(v):
    if v is None or v == "none":
        return []
    return [v] if isinstance(v, str) else list(v)


# TRL name -> (our section.field, converter). Fields whose meaning is the same under both names.
TRL_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "output_dir": ("train.output_dir", str),
    "max_steps": ("train.max_steps", int),
    "num_train_epochs": ("train.num_train_epochs", float),
    "learning_rate": ("train.learning_rate", float),
    "lr_scheduler_type": ("train.lr_scheduler_type", lambda v: SCHEDULERS.get(str(v), str(v))),
    "warmup_steps": ("train.warmup_steps", int),
    "warmup_ratio": ("train.warmup_ratio", float),
    "optim": ("train.optim", lambda v: OPTIMIZERS.get(str(v), str(v))),
    "weight_decay": ("train.weight_decay", float),
    "adam_beta1": ("train.adam_beta1", float),
    "adam_beta2": ("train.adam_beta2", float),
    "max_grad_norm": ("train.max_grad_norm", float),
    "seed": ("train.seed", int),
    "ddp_timeout": ("train.collective_timeout_s", float),  # seconds, both (torchrun runs only)
    "fsdp": ("train.fsdp", lambda v: _fsdp(v)),
    "logging_steps": ("train.logging_steps", int),
    "save_steps": ("train.save_steps", int),
    "save_total_limit": ("train.save_total_limit", int),
    "eval_steps": ("train.eval_steps", int),
    "report_to": ("train.report_to", _report_to),
    "run_name": ("train.run_name", str),
    "project": ("train.project", str),
    "push_to_hub": ("train.push_to_hub", bool),
    "hub_model_id": ("train.hub_model_id", str),
    "hub_private_repo": ("train.hub_private_repo", bool),
    "disable_tqdm": ("train.progress", lambda v: not v),
    "num_generations": ("sampling.num_generations", int),
    "max_completion_length": ("sampling.max_completion_length", int),
    "max_prompt_length": ("sampling.max_prompt_length", int),
    "temperature": ("sampling.temperature", float),
    "top_p": ("sampling.top_p", float),
    "top_k": ("sampling.top_k", lambda v: int(v or 0)),
    "min_p": ("sampling.min_p", lambda v: float(v or 0.0)),
    "beta": ("loss.beta", float),
    "epsilon": ("loss.epsilon", float),
    "epsilon_high": ("loss.epsilon_high", lambda v: None if v is None else float(v)),
    "delta": ("loss.delta", lambda v: None if v is None else float(v)),
    "loss_type": ("loss.loss_type", str),
    "importance_sampling_level": ("loss.importance_sampling_level", str),
    "scale_rewards": ("loss.scale_rewards", _scale_rewards),
    "num_iterations": ("loss.num_iterations", int),
    "mask_truncated_completions": ("loss.mask_truncated_completions", bool),
    "use_bias_correction_kl": ("loss.use_bias_correction_kl", bool),
    "sapo_temperature_pos": ("loss.sapo_temperature_pos", float),
    "sapo_temperature_neg": ("loss.sapo_temperature_neg", float),
    "vespo_k_pos": ("loss.vespo_k_pos", float),
    "vespo_lambda_pos": ("loss.vespo_lambda_pos", float),
    "vespo_k_neg": ("loss.vespo_k_neg", float),
    "vespo_lambda_neg": ("loss.vespo_lambda_neg", float),
    "multi_objective_aggregation": ("loss.multi_objective_aggregation", str),
    "top_entropy_quantile": ("loss.top_entropy_quantile", float),
    "entropy_coef": ("loss.entropy_coef", float),
    "use_adaptive_entropy": ("loss.use_adaptive_entropy", bool),
    "entropy_coef_min": ("loss.entropy_coef_min", float),
    "entropy_coef_max": ("loss.entropy_coef_max", float),
    "entropy_coef_delta": ("loss.entropy_coef_delta", float),
    "entropy_target": ("loss.entropy_target", float),
    "off_policy_mask_threshold": ("loss.off_policy_mask_threshold", float),
    "reward_weights": ("rewards.weights", lambda v: None if v is None else [float(x) for x in v]),
    "chat_template_kwargs": ("data.chat_template_kwargs", lambda v: None if v is None else dict(v)),
    "gradient_checkpointing": ("model.gradient_checkpointing", bool),
    "num_generations_eval": ("eval.num_generations", lambda v: 1 if v is None else int(v)),
    "num_completions_to_print": ("train.log_completions", lambda v: 0 if v is None else int(v)),
    "max_tool_calling_iterations": ("tools.max_tool_calling_iterations", lambda v: None if v is None else int(v)),
}

# Converted from several TRL fields at once (see _batch_sizes, _precision, _strategies).
COMBINED = ("per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
            "steps_per_generation", "bf16", "fp16", "use_cpu", "eval_strategy", "save_strategy", "log_completions",
            "gradient_checkpointing_kwargs", "resume_from_checkpoint", "vllm_importance_sampling_correction",
            "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max",
            "vllm_importance_sampling_cap")


class GRPOConfig(Config):
    """A run config from TRL's flat field names and / or our sections (see the module docstring)."""

    def __init__(self, **kwargs):
        raw: dict[str, dict] = {}
        for name in list(kwargs):
            if name in SECTIONS:
                section = kwargs.pop(name)
                raw[name] = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section or {})
        self.resume_from_checkpoint = kwargs.pop("resume_from_checkpoint", None)
        combined = {k: kwargs.pop(k) for k in list(kwargs) if k in COMBINED}
        overrides: dict[str, Any] = {}
        for name, value in kwargs.items():
            overrides.update(_field(name, value))
        if "train.max_steps" in overrides:  # as in TRL, a max_steps > 0 overrides num_train_epochs
            overrides["train.num_train_epochs"] = 0.0
        overrides.update(_batch_sizes(combined, raw, overrides))
        overrides.update(_precision(combined))
        overrides.update(_strategies(combined, overrides))
        overrides.update(_sampling_correction(combined))
        cfg = load_config(None, overrides, base=raw)
        for f in dataclasses.fields(Config):
            object.__setattr__(self, f.name, getattr(cfg, f.name))
        self.__post_init__()

    def __getattr__(self, name: str):
        """Flat reads (args.learning_rate), as on TRL's config."""
        if name.startswith("_") or name in SECTIONS:
            raise AttributeError(name)
        target = TRL_FIELDS.get(name, (None,))[0]
        try:
            section, field = (target.split(".") if target else _resolve_key(name))
        except ConfigError:
            raise AttributeError(f"GRPOConfig has no field {name!r}") from None
        return getattr(getattr(self, section), field)

    def to_dict(self) -> dict:
        return Config.to_dict(self)


def _field(name: str, value) -> dict[str, Any]:
    """One keyword -> {section.field: value}."""
    if name in TRL_FIELDS:
        target, convert = TRL_FIELDS[name]
        if value is None or (name == "max_steps" and value <= 0):
            return {}  # TRL's "unset" (max_steps=-1: train by num_train_epochs): ours applies
        try:
            return {target: convert(value)}
        except (TypeError, ValueError) as exc:
            why = f" ({exc})" if str(exc) else ""
            raise ConfigError(f"{name}: cannot use {value!r} for {target}{why}") from None
    if "." in name or _is_ours(name):
        return {name: value}
    if name in TRL_DEFAULTS:
        if _same(value, TRL_DEFAULTS[name]):
            return {}  # TRL's own default: asks for nothing
        raise ConfigError(f"{name}: TRL's {name}={value!r} is not supported by grpo-fast"
                          f"{_hint(name)} (README: 'Coming from TRL' lists the fields we map)")
    raise ConfigError(f"{name}: unknown field; neither a TRL GRPOConfig field nor one of ours "
                      f"(grpo_fast/config.py)")


def _is_ours(name: str) -> bool:
    try:
        _resolve_key(name)
        return True
    except ConfigError:
        return False


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b or (a in (None, [], "") and b in (None, [], ""))


def _fsdp(value) -> bool:
    """TRL's fsdp option string ("full_shard auto_wrap") or list: full_shard is ours (train.fsdp:
    every decoder layer one unit, which is what auto_wrap picks for these models); the others
    are refused."""
    words = value.split() if isinstance(value, str) else [str(v) for v in value]
    if not words:
        return False
    other = [w for w in words if w not in ("full_shard", "auto_wrap")]
    if other or "full_shard" not in words:
        raise ValueError(f"grpo-fast shards with FSDP2's full_shard (each decoder layer a unit), not {' '.join(other) or value}")
    return True


def _hint(name: str) -> str:
    if name.startswith("vllm") or name == "use_vllm":
        return ": grpo-fast samples with its own paged sampler on the training model itself, no vLLM"
    if name in ("deepspeed", "fsdp_config", "ddp_backend"):
        return (": grpo-fast runs data-parallel under torchrun (NCCL / gloo), with train.fsdp: true to shard full "
                "fine-tuning")
    return ""


def _batch_sizes(combined: dict, raw: dict, overrides: dict) -> dict[str, Any]:
    """TRL counts batches in completions: each optimizer step trains on
    per_device_train_batch_size x gradient_accumulation_steps completions (= generation_batch_size,
    one generation per step), num_generations of them per prompt. Ours: prompts_per_step x G per
    step, micro_batch_size completions per forward/backward."""
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
            "steps_per_generation")
    if not any(combined.get(k) is not None for k in keys):
        return {}
    per_device = int(combined.get("per_device_train_batch_size") or 8)
    accum = int(combined.get("gradient_accumulation_steps") or 1)
    steps_per_gen = combined.get("steps_per_generation")
    if steps_per_gen is not None and int(steps_per_gen) != accum:
        raise ConfigError(f"steps_per_generation: {steps_per_gen} != gradient_accumulation_steps ({accum}) means "
                          f"several optimizer steps per generation, which grpo-fast does not do (use num_iterations "
                          f"for several updates on one generation)")
    completions = per_device * accum
    gen = combined.get("generation_batch_size")
    if gen is not None and int(gen) != completions:
        raise ConfigError(f"generation_batch_size: {gen} != per_device_train_batch_size x gradient_accumulation_steps "
                          f"({completions}); grpo-fast generates exactly one step's completions at a time")
    g = overrides.get("sampling.num_generations", raw.get("sampling", {}).get("num_generations", 8))
    if completions % int(g):
        raise ConfigError(f"per_device_train_batch_size: {per_device} x gradient_accumulation_steps {accum} = "
                          f"{completions} completions per step is not a multiple of num_generations ({g})")
    return {"train.prompts_per_step": completions // int(g), "train.micro_batch_size": per_device}


def _precision(combined: dict) -> dict[str, Any]:
    out = {}
    if combined.get("bf16") and combined.get("fp16"):
        raise ConfigError("bf16 and fp16: choose one")
    if combined.get("bf16"):
        out["model.dtype"] = "bfloat16"
    elif combined.get("fp16"):
        out["model.dtype"] = "float16"
    if combined.get("use_cpu"):
        out["model.device"] = "cpu"
    kwargs = combined.get("gradient_checkpointing_kwargs")
    if kwargs and kwargs.get("use_reentrant", False):
        raise ConfigError("gradient_checkpointing_kwargs: use_reentrant=True is not supported (grpo-fast checkpoints "
                          "with use_reentrant=False)")
    return out


def _strategies(combined: dict, overrides: dict) -> dict[str, Any]:
    out = {}
    if combined.get("eval_strategy") in ("no", None) and "eval_strategy" in combined:
        out["train.eval_steps"] = 0
    elif combined.get("eval_strategy") not in (None, "steps"):
        raise ConfigError(f"eval_strategy: {combined['eval_strategy']!r} is not supported; use 'steps' or 'no'")
    if combined.get("save_strategy") == "no":
        out["train.save_steps"] = 0
    elif combined.get("save_strategy") not in (None, "steps", "no"):
        raise ConfigError(f"save_strategy: {combined['save_strategy']!r} is not supported; use 'steps' or 'no'")
    if "log_completions" in combined and not combined["log_completions"] and "train.log_completions" not in overrides:
        out["train.log_completions"] = 0
    return out


def _sampling_correction(combined: dict) -> dict[str, Any]:
    """TRL's vllm_importance_sampling_* (the correction for the sampler's log-probs differing from
    the trainer's) -> loss.sampling_correction*. Given at all, TRL's defaults fill the rest:
    correction on, sequence_mask, clip_max 3."""
    keys = ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
            "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max", "vllm_importance_sampling_cap")
    if not any(k in combined for k in keys):
        return {}
    if not combined.get("vllm_importance_sampling_correction", True):
        return {"loss.sampling_correction": "none"}
    clip_max = combined.get("vllm_importance_sampling_clip_max", combined.get("vllm_importance_sampling_cap", 3.0))
    if combined.get("vllm_importance_sampling_cap") is not None:
        clip_max = combined["vllm_importance_sampling_cap"]  # TRL's deprecated name wins, as in TRL
    return {"loss.sampling_correction": str(combined.get("vllm_importance_sampling_mode", "sequence_mask")),
            "loss.sampling_correction_clip_min": combined.get("vllm_importance_sampling_clip_min"),
            "loss.sampling_correction_clip_max": clip_max}
