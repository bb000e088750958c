"""The GRPO trainer's components and its loop (torchtune's recipe vs components):
model.py (load, 4-bit, LoRA, optimizer; the policy's modules), generation.py (the sampler, or HF
generate, behind one call), rollout_batch.py (what a step trains on), packed_forward.py (the
training forward: each group's prompt once, block mask), policy_loss.py (hidden states -> the
fused loss and scored log-probs), loop.py (the recipe), checkpoint.py, metrics.py, evaluate.py,
memory.py."""
