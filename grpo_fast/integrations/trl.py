"""TRL 1.16's `GRPOTrainer`, with its loss computed by grpo-fast's fused op.

    from trl import GRPOConfig
    from grpo_fast.integrations.trl import FusedGRPOTrainer       # a GRPOTrainer subclass
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), ...)

    trainer = use_fused_loss(trl.GRPOTrainer(...))                # or: an existing trainer

Only the policy loss changes: the trainer's final hidden states and LM head go into
`grpo_fast.ops.fused_grpo_loss`, with every loss option mapped from its GRPOConfig (loss_type
including luspo and vespo, beta with use_bias_correction_kl, epsilon / epsilon_high / delta,
importance_sampling_level, sapo_* / vespo_*, top_entropy_quantile, entropy_coef and the adaptive
entropy control, off_policy_mask_threshold, the vLLM importance-sampling correction, the model's
logit scale / soft cap, cast_lm_head_to_fp32). Sampling, rewards, advantages, the old / reference
log-prob passes and the logging stay TRL's. The loss, its gradients and the metrics TRL logs
from `_compute_loss` are TRL's own (tests/test_integration_trl.py), including TRL's per
micro-batch definitions of bnpo's normalizer and the high-entropy threshold (grpo-fast's own
trainer takes both over the whole step instead).

Not supported (refused when met): several processes, vision-language inputs, MoE auxiliary
losses, token-level advantages.
"""
from __future__ import annotations

import types
import warnings

import torch

from grpo_fast.loss.head import logit_transform_of
from grpo_fast.loss.options import CLIPPED_LOSS_TYPES
from grpo_fast.ops import fused_grpo_loss

try:
    import trl
    from trl import GRPOTrainer
except ImportError as err:  # pragma: no cover - trl is an optional dependency
    raise ImportError("grpo_fast.integrations.trl needs trl (pip install 'trl>=1.16,<1.17')") from err

TESTED_TRL = "1.16."  # fused_compute_loss mirrors this version's GRPOTrainer._compute_loss
if not trl.__version__.startswith(TESTED_TRL):
    warnings.warn(f"grpo_fast.integrations.trl was checked against TRL {TESTED_TRL}x, this is TRL {trl.__version__}: "
                  f"its loss may differ from this TRL's own", stacklevel=2)

__all__ = ["FusedGRPOTrainer", "use_fused_loss", "fused_compute_loss"]

_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_images",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_tiles")


def _check_supported(trainer) -> None:
    if trainer.accelerator.num_processes > 1:
        raise NotImplementedError("grpo_fast.integrations.trl: one process only (grpo-fast is single-device)")
    if getattr(trainer, "aux_loss_enabled", False):
        raise NotImplementedError("grpo_fast.integrations.trl: MoE auxiliary losses (router_aux_loss_coef) are not "
                                  "supported; set router_aux_loss_coef=0")


def _causal_lm(trainer, model):
    lm = trainer.accelerator.unwrap_model(model)
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def _completion_hidden(trainer, model, input_ids, attention_mask, width: int):
    """Final hidden states that predict the completion tokens [B, C, H], and the LM head."""
    lm = _causal_lm(trainer, model)
    with trainer.accelerator.autocast():
        out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state[:, -width - 1:-1]  # position P - 1 + t predicts completion token t
    return hidden, lm.get_output_embeddings(), lm.config


def fused_compute_loss(self, model, inputs):
    """TRL 1.16's `GRPOTrainer._compute_loss`, term for term, on grpo-fast's fused op."""
    _check_supported(self)
    if any(inputs.get(k) is not None for k in _MULTIMODAL):
        raise NotImplementedError("grpo_fast.integrations.trl: vision-language inputs are not supported")
    args = self.args
    mode = "train" if self.model.training else "eval"
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    advantages = inputs["advantages"]
    if advantages.dim() != 1:
        raise NotImplementedError("grpo_fast.integrations.trl: token-level advantages [B, T] are not supported")

    hidden, head, config = _completion_hidden(self, model, input_ids, attention_mask, completion_ids.size(1))
    weight, bias = head.weight, head.bias
    if args.cast_lm_head_to_fp32:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    transform = logit_transform_of(config)

    # TRL's normalizers, per micro-batch: accumulation divides grpo / sapo / bnpo / dr_grpo / luspo,
    # the generation batch's token count (rescaled to one accumulation window) divides dapo / cispo / vespo.
    accum = self.current_gradient_accumulation_steps if mode == "train" else 1
    n_items = None
    if self.loss_type in ("dapo", "cispo", "vespo"):
        n_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            n_items = n_items * accum / args.steps_per_generation
    elif self.loss_type == "bnpo":
        n_items = mask.sum().clamp(min=1.0) * accum
    # The entropy bonus: TRL's coefficient (adaptive: gated by the last step's entropy), over accumulation.
    bonus = self._entropy_bonus_enabled
    coef = 0.0
    if bonus:
        coef = self.entropy_coef
        if self.use_adaptive_entropy and not self._last_world_entropy <= args.entropy_target:
            coef = 0.0
    correction = "none"
    if self.use_vllm and self.vllm_importance_sampling_correction:
        correction = self.vllm_importance_sampling_mode

    loss, m = fused_grpo_loss(
        hidden, weight.to(hidden.dtype), completion_ids, mask, advantages, inputs.get("old_per_token_logps"),
        inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
        loss_type=self.loss_type, beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
        delta=args.delta, temperature=self.temperature, importance_sampling_level=self.importance_sampling_level,
        max_completion_length=self.max_completion_length, num_items_in_batch=n_items,
        bias=None if bias is None else bias.to(hidden.dtype), num_sequences_in_batch=completion_ids.size(0) * accum,
        sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg, use_bias_correction_kl=args.use_bias_correction_kl,
        top_entropy_quantile=self.top_entropy_quantile, entropy_coef=coef / accum,
        off_policy_mask_threshold=self.off_policy_mask_threshold,
        sampling_logprobs=inputs.get("sampling_per_token_logps"), sampling_correction=correction,
        sampling_correction_clip_min=self.vllm_importance_sampling_clip_min,
        sampling_correction_clip_max=self.vllm_importance_sampling_clip_max,
        logit_scale=transform.scale, final_logit_softcapping=transform.softcap)
    _log_metrics(self, mode, m, loss, bonus, accum)
    return loss


def _log_metrics(self, mode: str, m: dict, loss, bonus: bool, accum: int) -> None:
    """What TRL's _compute_loss appends to self._metrics, from the op's metrics (one process)."""
    metrics = self._metrics[mode]
    if bonus:
        policy_loss = m.get("policy_loss", loss.detach())
        # TRL logs the policy loss before its division by the accumulation steps (not for dapo / cispo / vespo)
        if self.loss_type not in ("dapo", "cispo", "vespo"):
            policy_loss = policy_loss * accum
        metrics["policy_loss"].append(float(policy_loss))
        if self.use_adaptive_entropy and mode == "train":
            kept = "num_high_entropy_tokens" if "num_high_entropy_tokens" in m else "num_tokens"
            mean = m["entropy/high"] if kept != "num_tokens" else m["entropy"]
            stats = torch.stack([mean * m[kept], m[kept]]).detach()
            self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                total = self._entropy_window_stats
                world_entropy = (total[0] / total[1].clamp(min=1.0)).item()
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
    if self.beta != 0.0:
        metrics["kl"].append(float(m["kl"]))
    metrics["entropy"].append(float(m["entropy"]))
    if self.loss_type in CLIPPED_LOSS_TYPES:
        for ours, theirs in (("clip_ratio/low", "clip_ratio/low_mean"), ("clip_ratio/high", "clip_ratio/high_mean"),
                             ("clip_ratio/region", "clip_ratio/region_mean"), ("clip_ratio/low_min", "clip_ratio/low_min"),
                             ("clip_ratio/high_max", "clip_ratio/high_max")):
            metrics[theirs].append(float(m[ours]))
    elif self.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(float(m["cispo_clip_ratio"]))
    elif self.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"].append(float(m["vespo/phi_seq_mean"]))


class FusedGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer whose policy loss is grpo-fast's fused op (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_supported(self)

    _compute_loss = fused_compute_loss


def use_fused_loss(trainer: GRPOTrainer) -> GRPOTrainer:
    """Make an existing trl.GRPOTrainer compute its loss with grpo-fast's fused op; returns it."""
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"use_fused_loss: expected a trl.GRPOTrainer, got {type(trainer).__name__}")
    _check_supported(trainer)
    trainer._compute_loss = types.MethodType(fused_compute_loss, trainer)
    return trainer
