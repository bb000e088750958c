"""Chat-template rendering of a multi-turn rollout as token deltas.

The sampler keeps each sequence alive and only appends tokens, so the conversation is rendered
once (the prompt) and then extended turn by turn: after a model turn that called tools, the
environment appends ``observation_tokens`` (the end of the assistant turn if the model did not
write it, the tool messages in the template's own format, and the next assistant header). The
result must be what the template would render for the whole conversation, or the model trains
on a format it never sees at inference.

How the delta is found without knowing the template: render a sentinel conversation
``[user, assistant(SENTINEL), tool...]`` with the generation prompt and keep the text after
SENTINEL. That is exactly "what follows an assistant message's content": the turn's end
marker, the tool turns and the next header, whatever the template's syntax. If the completion
already ends with the turn's end marker (it stopped on EOS rather than on a stop string such as
``</tool_call>``), that marker is dropped from the delta. Templates that only accept tool
messages after an assistant message with ``tool_calls`` (and ids) are rendered with those and
the delta is taken after the rendered assistant turn instead.

A template that ignores ``tools`` (renders the same with and without, e.g. SmolLM2's plain
ChatML) gets a Hermes-style tool description in the system message, and tool results wrapped in
``<tool_response>`` tags, so that small default models can still call tools in a format the
Hermes parser reads.
"""

from __future__ import annotations

import json

from .tools import ToolResult

SENTINEL = "<<grpo_fast:sentinel:8d1e>>"
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_b7", "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}
_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "</s>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_ignores_tools_cache: dict = {}


def default_tool_system_text(schemas: list[dict]) -> str:
    """Hermes-style instructions listing the tools, for templates that do not render ``tools``."""
    listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return ("# Tools\n\nYou may call functions to help with the user's request. Their signatures are listed "
            f"inside <tools></tools>:\n<tools>\n{listing}\n</tools>\n\n"
            "To call a function, write a JSON object with its name and arguments inside <tool_call></tool_call> "
            "tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n"
            "Each result comes back inside <tool_response></tool_response> tags.")


def _render(tokenizer, messages, *, add_generation_prompt, **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered template text (special-token strings in it become their ids; no BOS
    is added: the template writes its own), as ``apply_chat_template(tokenize=True)`` does."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def template_ignores_tools(tokenizer, **chat_template_kwargs) -> bool:
    """True when the chat template renders the same text with and without ``tools``."""
    key = (id(tokenizer), str(getattr(tokenizer, "chat_template", None)), repr(sorted(chat_template_kwargs.items())))
    if key not in _ignores_tools_cache:
        msgs = [{"role": "user", "content": "hi"}]
        plain = _render(tokenizer, msgs, add_generation_prompt=True, **chat_template_kwargs)
        with_tools = _render(tokenizer, msgs, add_generation_prompt=True, tools=[_PROBE_TOOL], **chat_template_kwargs)
        _ignores_tools_cache[key] = plain == with_tools
    return _ignores_tools_cache[key]


def with_tool_system_text(messages: list[dict], schemas: list[dict]) -> list[dict]:
    """``messages`` with the default tool description added to the system message (a new system
    message first when there is none)."""
    text = default_tool_system_text(schemas)
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}] + list(messages[1:])
    return [{"role": "system", "content": text}] + list(messages)


def render_prompt_text(tokenizer, messages: list[dict], tools_schemas: list[dict] | None = None,
                       **chat_template_kwargs) -> str:
    """The prompt as text: ``apply_chat_template(messages, tools=..., add_generation_prompt=True)``,
    with the default tool description injected when the template ignores ``tools``."""
    if tools_schemas:
        if template_ignores_tools(tokenizer, **chat_template_kwargs):
            messages = with_tool_system_text(messages, tools_schemas)
        chat_template_kwargs = {**chat_template_kwargs, "tools": tools_schemas}
    return _render(tokenizer, messages, add_generation_prompt=True, **chat_template_kwargs)


def render_prompt(tokenizer, messages: list[dict], tools_schemas: list[dict] | None = None,
                  **chat_template_kwargs) -> list[int]:
    """Token ids of the prompt (see ``render_prompt_text``)."""
    return encode(tokenizer, render_prompt_text(tokenizer, messages, tools_schemas, **chat_template_kwargs))


def tool_messages(results: list[ToolResult], *, wrap: bool = False) -> list[dict]:
    """Chat messages for tool results: role "tool" with ``name`` and ``tool_call_id`` (some
    templates require them; ids are 9 alphanumerics, as Mistral's templates demand), content
    wrapped in ``<tool_response>`` tags when ``wrap`` (templates without tool support)."""
    out = []
    for i, r in enumerate(results):
        content = f"<tool_response>\n{r.content}\n</tool_response>" if wrap else r.content
        out.append({"role": "tool", "name": r.name, "tool_call_id": f"call{i:05d}", "content": content})
    return out


def _assistant_with_calls(messages: list[dict], results: list[ToolResult]) -> dict:
    calls = [{"id": m["tool_call_id"], "type": "function",
              "function": {"name": m["name"], "arguments": dict(r.call.arguments) if r.call else {}}}
             for m, r in zip(messages, results)]
    return {"role": "assistant", "content": SENTINEL, "tool_calls": calls}


def _leading_special(tokenizer, text: str) -> str | None:
    """The added/special token string ``text`` starts with, if any (longest match)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or []) | set(tokenizer.get_added_vocab())
    hits = [s for s in specials if s and text.startswith(s)]
    return max(hits, key=len) if hits else None


def _tail_after_assistant(tokenizer, results: list[ToolResult], wrap: bool, kw: dict) -> str:
    """Text that follows an assistant message's content up to and including the next assistant
    header, when tool messages follow (see the module docstring)."""
    msgs = tool_messages(results, wrap=wrap)
    user = {"role": "user", "content": "u"}
    first_error = None
    try:
        full = _render(tokenizer, [user, {"role": "assistant", "content": SENTINEL}] + msgs,
                       add_generation_prompt=True, **kw)
        if full.count(SENTINEL) == 1:
            return full[full.index(SENTINEL) + len(SENTINEL):]
        first_error = "the sentinel assistant content did not appear once in the rendering"
    except Exception as exc:  # the template refused tool messages without tool_calls
        first_error = f"{type(exc).__name__}: {exc}"
    try:
        assistant = _assistant_with_calls(msgs, results)
        base = _render(tokenizer, [user, assistant], add_generation_prompt=False, **kw)
        full = _render(tokenizer, [user, assistant] + msgs, add_generation_prompt=True, **kw)
    except Exception as exc:
        raise ValueError(f"the chat template cannot render tool messages after an assistant turn "
                         f"({first_error}; with tool_calls: {type(exc).__name__}: {exc})") from None
    if not full.startswith(base):
        raise ValueError("the chat template is not prefix-preserving for tool turns: the conversation with tool "
                         "messages does not extend the one without them")
    # The assistant turn's end: from its last end marker (e.g. "</s>") to the end of `base`. (Some
    # templates write tool_calls instead of the content: then search all of `base`.)
    body = base[base.index(SENTINEL) + len(SENTINEL):] if SENTINEL in base else base
    specials = set(getattr(tokenizer, "all_special_tokens", []) or []) | set(_END_MARKERS)
    cut = max((body.rfind(s) for s in specials if s and body.rfind(s) >= 0), default=len(body))
    return body[cut:] + full[len(base):]


def observation_text(tokenizer, results: list[ToolResult], *, completion_text: str, ended_turn: bool | None = None,
                     **chat_template_kwargs) -> str:
    """The text appended after a model turn (see ``observation_tokens``)."""
    if not results:
        raise ValueError("observation_text needs at least one ToolResult")
    wrap = template_ignores_tools(tokenizer, **chat_template_kwargs)
    tail = _tail_after_assistant(tokenizer, results, wrap, chat_template_kwargs)
    lead = _leading_special(tokenizer, tail)
    if ended_turn is None:
        # The model ended its turn itself when its text ends with the template's end marker or
        # with another end-of-turn token (e.g. Llama's <|eom_id|> where the template writes <|eot_id|>).
        enders = {lead} if lead else set()
        enders |= {t for t in (*_END_MARKERS, getattr(tokenizer, "eos_token", None)) if t}
        ended_turn = any(completion_text.endswith(t) for t in enders)
    if ended_turn and lead:  # the model wrote the end marker itself: do not append it twice
        tail = tail[len(lead):]
    return tail


def observation_tokens(tokenizer, results: list[ToolResult], *, completion_text: str, ended_turn: bool | None = None,
                       **chat_template_kwargs) -> list[int]:
    """Token ids that follow a model turn which called tools: the end of the assistant turn
    (unless ``completion_text`` already ends with it), the tool messages rendered with the
    template's tool role, and the next assistant generation prompt.

    ``completion_text`` is the model's text for this turn decoded WITH special tokens (so an
    end-of-turn token is visible); ``ended_turn`` overrides the check when the caller knows
    (e.g. from the sampler's finish reason: "eos" ended the turn, "stop" did not).
    """
    return encode(tokenizer, observation_text(tokenizer, results, completion_text=completion_text,
                                              ended_turn=ended_turn, **chat_template_kwargs))
