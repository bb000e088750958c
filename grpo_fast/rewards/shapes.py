"""The shapes reward functions see, as in TRL: with a plain-text prompt a completion is a string;
with a conversational prompt (a list of {role, content} messages) the prompt is that list and
each completion is [{"role": "assistant", "content": text}]."""

from __future__ import annotations


def as_completions(texts: list[str], prompts: list) -> list:
    """Completions shaped after their prompts (TRL's convention)."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, (list, tuple)) else t for t, p in zip(texts, prompts)]


def completion_text(completion) -> str:
    """The text of a completion in either shape."""
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        # multi-turn: the model's own words (assistant turns), not the tool results it read
        said = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
        return "\n".join(str(m.get("content", "")) for m in said)
    return str(completion)
