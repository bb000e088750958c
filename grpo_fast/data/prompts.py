"""What the model sees: a row's prompt rendered to text (the chat template when the tokenizer
has one) and tokenized, never truncated.

A prompt is a string (the user message, optionally through `data.prompt_template` and after
`data.system_prompt`) or a conversation: a list of {role, content} messages (system prompt,
few-shot turns, ...), rendered as it is with `add_generation_prompt=True` and
`data.chat_template_kwargs` (e.g. {"enable_thinking": false} for Qwen3).
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo_fast.errors import DataError

ROLES = ("system", "user", "assistant", "tool", "developer")


def is_conversation(prompt) -> bool:
    return isinstance(prompt, (list, tuple))


def check_conversation(messages, where: str) -> list[dict]:
    """A conversation as a list of {role, content} dicts; DataError naming the row otherwise."""
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"data: {where} prompt message {j} is not a {{'role', 'content'}} mapping: {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"data: {where} prompt message {j} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        out.append(dict(m))
    if not out:
        raise DataError(f"data: {where} has an empty conversation as its prompt")
    return out


@dataclass
class EncodedPrompt:
    ids: list[int]
    row: dict


def _template(cfg, row: dict, text: str, index: int | None) -> str:
    """prompt_template applied to `text` (the prompt, or a conversation's last user message); the
    template may name any column of the row."""
    try:
        return cfg.prompt_template.format(**{**row, "prompt": text})
    except KeyError as exc:
        where = "" if index is None else f"row {index} "
        raise DataError(f"data.prompt_template: names column {exc.args[0]!r}, which {where}does not have "
                        f"(columns: {', '.join(sorted(row))})") from None
    except (IndexError, ValueError) as exc:
        raise DataError(f"data.prompt_template: {cfg.prompt_template!r} is not a valid template: {exc}") from None


def messages_for(row: dict, cfg, index: int | None = None) -> list[dict]:
    """The conversation the chat template renders for a row."""
    prompt = row["prompt"]
    if is_conversation(prompt):
        messages = [dict(m) for m in prompt]
        if cfg.prompt_template != "{prompt}":
            last = max(i for i, m in enumerate(messages) if m["role"] == "user") if any(
                m["role"] == "user" for m in messages) else None
            if last is not None:
                messages[last]["content"] = _template(cfg, row, messages[last]["content"], index)
    else:
        messages = [{"role": "user", "content": _template(cfg, row, prompt, index)}]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def render_prompt(tokenizer, row: dict, cfg, index: int | None = None) -> str:
    """The text the model sees: the chat template over messages_for(row) when the tokenizer has
    one; otherwise (plain-text prompts only) system prompt + template(prompt)."""
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        kwargs = dict(cfg.chat_template_kwargs or {})
        try:
            return tokenizer.apply_chat_template(messages_for(row, cfg, index), tokenize=False,
                                                 add_generation_prompt=True, **kwargs)
        except DataError:
            raise
        except Exception as exc:  # jinja errors: a template that refuses these messages or kwargs
            where = "" if index is None else f" (row {index})"
            raise DataError(f"data: the tokenizer's chat template failed on a prompt{where}: "
                            f"{type(exc).__name__}: {exc}") from None
    if is_conversation(row["prompt"]):
        raise DataError("data: conversational prompts need a tokenizer with a chat template "
                        "(and data.use_chat_template: true)")
    user = _template(cfg, row, row["prompt"], index)
    return (cfg.system_prompt + "\n\n" if cfg.system_prompt else "") + user


def encode_prompt(row: dict, index: int, tokenizer, cfg) -> list[int]:
    return tokenizer(render_prompt(tokenizer, row, cfg, index), add_special_tokens=False)["input_ids"]


def too_long(ids: list[int], row: dict, index: int, cfg, max_prompt_length: int, split: str) -> bool:
    """Whether to skip a prompt over max_prompt_length (on_long_prompt=skip); DataError under error."""
    if len(ids) <= max_prompt_length:
        return False
    if cfg.on_long_prompt == "error":
        text = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        raise DataError(
            f"sampling.max_prompt_length: {split} prompt {index} has {len(ids)} tokens > {max_prompt_length} "
            f"(raise the limit, or set data.on_long_prompt=skip to drop such prompts): {text[:80]!r}")
    return True


def encode_prompts(rows: list[dict], tokenizer, cfg, max_prompt_length: int, split: str = "train"):
    """Rows -> (list[EncodedPrompt], skipped count). A prompt over max_prompt_length tokens is an
    error naming the row, or skipped and counted with on_long_prompt='skip'."""
    out, skipped = [], 0
    for i, row in enumerate(rows):
        ids = encode_prompt(row, i, tokenizer, cfg)
        if too_long(ids, row, i, cfg, max_prompt_length, split):
            skipped += 1
            continue
        out.append(EncodedPrompt(ids, row))
    if not out:
        raise DataError(f"sampling.max_prompt_length: every {split} prompt is longer than {max_prompt_length} tokens")
    return out, skipped
