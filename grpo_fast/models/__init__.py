"""Model helpers: the built-in default model and (later) architecture-specific runners."""

from grpo_fast.models.default_model import DEFAULT_MODEL_NAME, default_model_dir

__all__ = ["DEFAULT_MODEL_NAME", "default_model_dir"]
