"""Group sampler: B prompts × G completions from the live (4-bit + LoRA) model on shared paged KV.

One engine, one concept per file (nano-vllm's layout): sampling_params.py (what to sample),
sequence.py (per-group and per-completion bookkeeping), block_manager.py (the paged KV pool, by
sequence), scheduler.py (admission, decode batches, preemption), model_runner.py (the model over
paged KV), sampling_op.py (the token sampling op; sampling_reference.py its oracle), sampler.py
(the generate loop), outputs.py (results and stats); kv_budget.py and decode_graphs.py beside.
"""

from grpo_fast.sampler.outputs import Completion, GroupOutput, SamplerStats
from grpo_fast.sampler.sampler import Sampler
from grpo_fast.sampler.sampling_op import sample
from grpo_fast.sampler.sampling_params import SamplingParams

__all__ = ["Completion", "GroupOutput", "Sampler", "SamplerStats", "SamplingParams", "sample"]
