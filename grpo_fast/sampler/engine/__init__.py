"""The generate loop (`Sampler`)."""

from grpo_fast.sampler.engine.sampler import Sampler

__all__ = ["Sampler"]
