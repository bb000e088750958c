"""Prompt datasets: where rows come from (sources), what the model sees (prompts), and the
resumable order they are drawn in (stream).

A row is a dict with `prompt` (a string, or a conversation: a list of {role, content}
messages), `answer` (the reference, may be None) and any other columns, which reach the reward
functions as keyword arguments.
"""

from grpo_fast.data.prompts import EncodedPrompt, encode_prompts, is_conversation, render_prompt
from grpo_fast.data.sources import gsm8k_row, load_splits, normalize_rows, read_table
from grpo_fast.data.stream import PromptStream, StreamingPrompts

__all__ = ["EncodedPrompt", "PromptStream", "StreamingPrompts", "encode_prompts", "gsm8k_row", "is_conversation",
           "load_splits", "normalize_rows", "read_table", "render_prompt"]
