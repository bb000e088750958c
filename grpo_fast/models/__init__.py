"""The models we run: the built-in default model (default_model), what is inside an HF causal LM
(causal_lm), and the sampler's view of a Llama-family decoder (llama_family) with its CPU decode
fast paths (decode_fast_paths, native_decode, cpu_ops)."""

from grpo_fast.models.default_model import DEFAULT_MODEL_NAME, default_model_dir

__all__ = ["DEFAULT_MODEL_NAME", "default_model_dir"]
