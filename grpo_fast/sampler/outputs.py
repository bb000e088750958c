"""What `Sampler.generate` returns: per prompt a group of G completions, plus run statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Completion:
    """One completion. Multi-turn (a turn handler appended environment tokens): ``model_mask``
    marks the sampled tokens (1) and the environment's (0, logprob 0.0); None = all sampled."""

    token_ids: list[int]  # [C] generated tokens (the stop/EOS token included)
    logprobs: list[float]  # [C] log-prob of each token under log softmax(logits / temperature)
    finish_reason: str  # "eos" | "stop" | "length"
    model_mask: list[int] | None = None  # [C] 1 = sampled, 0 = environment; None: all sampled
    num_turns: int = 1

    def segments(self) -> list[tuple[list[int], str]]:
        """The completion as runs of (tokens, source), source "model" or "environment"."""
        mask = self.model_mask if self.model_mask is not None else [1] * len(self.token_ids)
        out: list[tuple[list[int], str]] = []
        for token, m in zip(self.token_ids, mask):
            source = "model" if m else "environment"
            if out and out[-1][1] == source:
                out[-1][0].append(token)
            else:
                out.append(([token], source))
        return out


@dataclass
class GroupOutput:
    prompt_token_ids: list[int]
    completions: list[Completion]  # [G], in child order


@dataclass
class SamplerStats:
    """Counters of the last `generate` call. Throughputs are tokens computed per second of
    forward+sampling time in that phase (prefill: prompt tokens incl. recomputed ones)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    generated_tokens: int = 0
    wall_seconds: float = 0.0
    num_blocks: int = 0  # size of the block pool
    block_size: int = 0
    kv_bytes: int = 0  # bytes of the K/V cache tensors (all layers)
    peak_blocks_used: int = 0
    # Peak over steps of (blocks the live sequences would hold unshared) - (blocks actually held).
    peak_blocks_saved_by_sharing: int = 0
    preemptions: int = 0
    steps: int = 0
    # multi-turn: environment tokens appended to live sequences, the prefill of those tokens
    # (each once: never the conversation again), the turns that ended in a handler call
    environment_tokens: int = 0
    extend_seconds: float = 0.0
    handler_calls: int = 0
    wait_seconds: float = 0.0  # nothing to decode: waiting on the environment

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds else 0.0

    def as_dict(self) -> dict:
        return dict(asdict(self), prefill_tokens_per_s=self.prefill_tokens_per_s,
                    decode_tokens_per_s=self.decode_tokens_per_s, generated_tokens_per_s=self.generated_tokens_per_s)
