"""What to sample: the knobs of one `Sampler.generate` call, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for every prompt of a `generate` call.

    n: completions per prompt (GRPO's G). temperature: 0 means greedy. top_k: 0 = off.
    top_p: 1.0 = off. min_p: 0.0 = off. max_tokens: completion length cap (finish "length").
    stop_token_ids: extra tokens that end a completion (finish "stop"; the model's EOS tokens end
    it with "eos" unless ignore_eos). stop: strings that end a completion once its decoded text
    contains one (finish "stop"; tokens are kept up to the one that completed the string).
    seed: makes the whole call reproducible; None draws a base seed from torch's global RNG.
    max_turn_tokens (multi-turn): a model turn that reaches this many tokens ends like a stop
    (reason "turn_length", given to the turn handler; a trajectory that ends there is "length").
    first_group: the index of this call's first prompt in a larger batch it is a share of (data
    parallel: a rank's groups). Every sequence's seed derives from (seed, first_group + prompt
    index, completion index), so a share samples what the whole batch would have for it.

    The logged log-prob of each token is log softmax(logits / temperature) — the temperature-scaled
    full distribution, before top-k/top-p/min-p filtering (what the trainer recomputes). With
    temperature 0 it is the plain log softmax(logits).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False
    max_turn_tokens: int | None = None
    first_group: int = 0

    def __post_init__(self):
        # Accept lists (and a single string for `stop`) but store tuples: the dataclass is frozen/hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if any(not s for s in stop):
            raise ValueError("stop must not contain empty strings")
        if self.max_turn_tokens is not None and (not isinstance(self.max_turn_tokens, int) or self.max_turn_tokens < 1):
            raise ValueError(f"max_turn_tokens must be an int >= 1 or None, got {self.max_turn_tokens!r}")
        if not isinstance(self.first_group, int) or self.first_group < 0:
            raise ValueError(f"first_group must be an int >= 0, got {self.first_group!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
