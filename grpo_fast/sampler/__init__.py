"""Group sampler: B prompts × G completions from the live (4-bit + LoRA) model on shared paged KV.

Layout (one concept per file): sampling_params.py (what to sample), sequence.py (per-group and
per-completion bookkeeping), scheduler.py (admission, decode batches, preemption), model_runner.py
(the model over paged KV), engine/sampler.py (the generate loop), outputs.py (results and stats).
"""

from grpo_fast.sampler.engine.sampler import Sampler
from grpo_fast.sampler.outputs import Completion, GroupOutput, SamplerStats
from grpo_fast.sampler.sampling_params import SamplingParams

__all__ = ["Completion", "GroupOutput", "Sampler", "SamplerStats", "SamplingParams"]
