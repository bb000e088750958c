"""The entropy bonus's coefficient from step to step: fixed (`entropy_coef`), or Skywork-OR1's
adaptive control (TRL's `use_adaptive_entropy`, arXiv 2505.22312).

Adaptive: the coefficient applied during a step is `coef` when the previous step's entropy was
at or below `target`, else 0 (the first step applies 0: no measurement yet). After each optimizer
step, `coef` moves by `delta` towards more bonus when the step's entropy (the mean over the tokens
the bonus acts on) is at or below the target, towards less otherwise, within [coef_min, coef_max].
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EntropyControl:
    coef: float = 0.0
    adaptive: bool = False
    coef_min: float = 0.0
    coef_max: float = 1.0
    delta: float = 0.005
    target: float = 0.2
    last_entropy: float = math.inf  # the previous step's measured entropy

    @classmethod
    def from_config(cls, loss_cfg) -> EntropyControl:
        """From the run config's loss section (TRL's field names)."""
        return cls(coef=loss_cfg.entropy_coef, adaptive=loss_cfg.use_adaptive_entropy,
                   coef_min=loss_cfg.entropy_coef_min, coef_max=loss_cfg.entropy_coef_max,
                   delta=loss_cfg.entropy_coef_delta, target=loss_cfg.entropy_target)

    @property
    def enabled(self) -> bool:
        return self.coef != 0.0 or self.adaptive

    def applied(self) -> float:
        """The coefficient every micro-batch of this step uses."""
        if not self.adaptive:
            return self.coef
        return self.coef if self.last_entropy <= self.target else 0.0

    def update(self, entropy: float) -> None:
        """After an optimizer step whose measured entropy was `entropy`."""
        if not self.adaptive:
            return
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_entropy = float(entropy)

    def state_dict(self) -> dict:
        """What a checkpoint keeps (JSON: inf as None)."""
        return {"coef": self.coef, "last_entropy": None if math.isinf(self.last_entropy) else self.last_entropy}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state.get("coef", self.coef))
        last = state.get("last_entropy")
        self.last_entropy = math.inf if last is None else float(last)

    def as_dict(self) -> dict:
        return asdict(self)
