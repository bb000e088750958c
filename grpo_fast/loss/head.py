"""What the LM head's logits go through before the softmax the loss scores.

    y = h @ W.T + b                                   the head's raw logits
    z = c · tanh(s · y / c) / T    (soft cap c)       Gemma 2/3 `final_logit_softcapping`
    z = s · y / T                  (no soft cap)      Cohere `logit_scale`, Granite 1/`logits_scaling`

T is the sampling temperature. A model that post-processes its logits in any of these ways is
trained on the log-probs of z, as it samples. The trainer also checks the transform against the
model's own forward once (`grpo_fast.train.policy_loss.logit_transform`), so a model that
post-processes its logits some other way is refused, never trained on wrong log-probs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class LogitTransform(NamedTuple):
    temperature: float = 1.0
    scale: float = 1.0  # s
    softcap: float | None = None  # c

    def apply(self, y: Tensor) -> Tensor:
        """z from raw fp32 logits y (any shape), out of place."""
        if self.softcap is None:
            return y * (self.scale / self.temperature)
        return torch.tanh(y * (self.scale / self.softcap)) * (self.softcap / self.temperature)

    def check(self) -> LogitTransform:
        for name, v in (("temperature", self.temperature), ("logit_scale", self.scale)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        c = self.softcap
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0):
            raise ValueError(f"final_logit_softcapping must be None or a finite number > 0, got {c!r}")
        return LogitTransform(float(self.temperature), float(self.scale), None if c is None else float(c))


# Config attributes that scale a model's logits after the head (TRL 1.16's list).
_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier")


def logit_transform_of(config, temperature: float = 1.0) -> LogitTransform:
    """The transform a transformers model applies after its LM head, read from its config (the
    attributes TRL 1.16's fused head reads: final_logit_softcapping, logit_scale,
    output_multiplier, lm_head_multiplier, logits_scaling)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = None
    for name in _SCALES:
        if getattr(text, name, None) is not None:
            scale = float(getattr(text, name))
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        ls = float(text.logits_scaling)  # Granite / MiniCPM3 divide by it, HyperCLOVA X multiplies
        scale = ls if getattr(text, "model_type", "") == "hyperclovax" else 1.0 / ls
    return LogitTransform(temperature, 1.0 if scale is None else scale, softcap).check()
