"""Tool-call parsers: a model turn's text in, its prose and its tool calls out.

Each model family writes calls its own way:

- Hermes / Qwen2.5 / Qwen3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call;
- Llama 3.x (JSON tool calling): ``{"name": ..., "parameters": {...}}`` as the whole message,
  optionally after ``<|python_tag|>``, several separated by ``;``;
- Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (and the newer
  ``[TOOL_CALLS]name[ARGS]{...}``).

A parser never raises on model output: a call that is present but unreadable (bad JSON, no name)
comes back as ``ParsedTurn.error``, which the agent loop turns into a parse-error observation.
``stop_strings`` are where sampling should pause to run tools; empty when the call ends with EOS.
Users plug in their own with ``get_parser(obj_or_callable)``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

from .tools import ToolCall


@dataclass(frozen=True)
class ParsedTurn:
    content: str  # the turn's text without the tool-call markup
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None  # set when a call is present but malformed


def _call_from_obj(obj, *, args_keys=("arguments", "parameters")) -> ToolCall:
    """A ToolCall from a decoded JSON object, or ValueError saying what is missing."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object with a 'name', got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"the call has no 'name' string: {json.dumps(obj)[:200]}")
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models JSON-encode the arguments twice
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments of {name!r} are a string that is not JSON ({exc})") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"arguments of {name!r} must be a JSON object, got {type(args).__name__}")
    return ToolCall(name, args)


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc}): {text[:200]!r}") from None


def _strip_end(text: str, markers: tuple[str, ...]) -> str:
    """Drop trailing end-of-turn markers (the completion may be decoded with special tokens)."""
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for m in markers:
            if text.endswith(m):
                text, changed = text[: -len(m)].rstrip(), True
    return text


class HermesParser:
    """``<tool_call>{json}</tool_call>`` blocks (Hermes, Qwen2.5, Qwen3). An unclosed last block
    (the text ends inside it) is parsed too. Default stop string ``</tool_call>``: sampling pauses
    after the first call, so each turn makes one call; pass ``stop_strings=()`` to let the model
    write several calls and end the turn itself."""

    name = "hermes"
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def __init__(self, stop_strings: tuple[str, ...] = ("</tool_call>",)):
        self.stop_strings = tuple(stop_strings)

    def parse(self, text: str) -> ParsedTurn:
        text = _strip_end(text, ("<|im_end|>", "<|endoftext|>"))
        calls, errors = [], []
        for i, m in enumerate(self._block.finditer(text)):
            try:
                calls.append(_call_from_obj(_loads(m.group(1).strip())))
            except ValueError as exc:
                errors.append(f"tool call {i + 1}: {exc}")
        content = self._block.sub("", text).strip()
        return ParsedTurn(content, calls, "; ".join(errors) or None)


class Llama3Parser:
    """Llama 3.x JSON tool calls: the message is one or more ``{"name", "parameters"}`` objects,
    optionally after ``<|python_tag|>``, separated by ``;``. A message that starts with ``{`` but
    is not a call (no "name") is prose. The call ends with ``<|eom_id|>`` / ``<|eot_id|>`` (EOS
    tokens), so there is no stop string."""

    name = "llama3"
    stop_strings: tuple[str, ...] = ()
    _tag = "<|python_tag|>"

    def parse(self, text: str) -> ParsedTurn:
        text = _strip_end(text, ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))
        tagged = self._tag in text
        prose, _, body = text.partition(self._tag) if tagged else ("", "", text)
        body = body.strip()
        if not tagged and not (body.startswith("{") and '"name"' in body):
            return ParsedTurn(text.strip())
        calls, decoder, pos = [], json.JSONDecoder(), 0
        try:
            while pos < len(body):
                obj, pos = decoder.raw_decode(body, pos)
                calls.append(_call_from_obj(obj))
                while pos < len(body) and body[pos] in " \t\r\n;":
                    pos += 1
        except json.JSONDecodeError as exc:
            return ParsedTurn(prose.strip(), calls, f"tool call {len(calls) + 1}: not valid JSON ({exc}): "
                                                    f"{body[pos:pos + 200]!r}")
        except ValueError as exc:
            return ParsedTurn(prose.strip(), calls, f"tool call {len(calls) + 1}: {exc}")
        if not calls:
            return ParsedTurn(prose.strip(), [], "a <|python_tag|> call with no JSON after it")
        return ParsedTurn(prose.strip(), calls)


class MistralParser:
    """``[TOOL_CALLS][{...}, ...]`` (v3 tokenizers) or ``[TOOL_CALLS]name[ARGS]{...}`` (v11+).
    The turn ends with ``</s>`` (EOS), so there is no stop string."""

    name = "mistral"
    stop_strings: tuple[str, ...] = ()
    _tag = "[TOOL_CALLS]"

    def parse(self, text: str) -> ParsedTurn:
        text = _strip_end(text, ("</s>",))
        if self._tag not in text:
            return ParsedTurn(text.strip())
        prose, _, rest = text.partition(self._tag)
        calls, errors = [], []
        for i, chunk in enumerate(rest.split(self._tag)):
            chunk = chunk.strip()
            try:
                if chunk.startswith("["):
                    obj = _loads(chunk)
                    objs = obj if isinstance(obj, list) else [obj]
                    calls.extend(_call_from_obj(o) for o in objs)
                elif "[ARGS]" in chunk:
                    name, _, args = chunk.partition("[ARGS]")
                    name = name.split("[CALL_ID]")[0].strip()
                    calls.append(_call_from_obj({"name": name, "arguments": _loads(args.strip())}))
                else:
                    calls.append(_call_from_obj(_loads(chunk)))
            except ValueError as exc:
                errors.append(f"tool call block {i + 1}: {exc}")
        return ParsedTurn(prose.strip(), calls, "; ".join(errors) or None)


class FunctionParser:
    """Adapts a user callable ``text -> ParsedTurn | list[ToolCall | dict]`` to the parser
    interface. A callable that raises is reported as a parse error, like malformed output."""

    name = "custom"

    def __init__(self, fn: Callable, stop_strings: tuple[str, ...] = ()):
        self.fn, self.stop_strings = fn, tuple(stop_strings)

    def parse(self, text: str) -> ParsedTurn:
        try:
            out = self.fn(text)
            if isinstance(out, ParsedTurn):
                return out
            calls = [c if isinstance(c, ToolCall) else _call_from_obj(c) for c in (out or [])]
        except Exception as exc:  # a user parser must not crash the rollout
            return ParsedTurn(text, [], f"{type(exc).__name__}: {exc}")
        return ParsedTurn(text if not calls else "", calls)


PARSERS = {"hermes": HermesParser, "qwen": HermesParser, "qwen2.5": HermesParser, "qwen3": HermesParser,
           "llama3": Llama3Parser, "llama3_json": Llama3Parser, "mistral": MistralParser}


def detect_parser_name(tokenizer) -> str:
    """The parser a tokenizer's chat template implies: Mistral's and Llama 3's templates carry
    their own markers; everything else (ChatML, Qwen, SmolLM2) gets the Hermes format."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "<|start_header_id|>" in template:
        return "llama3"
    return "hermes"


def get_parser(spec=None, tokenizer=None):
    """Resolve a parser: None → by the tokenizer's chat template (Hermes without one); a name in
    PARSERS; an object with ``.parse`` (given ``stop_strings`` if it has none); a class with
    ``.parse`` (instantiated); or a callable ``text -> ParsedTurn | list[ToolCall | dict]``."""
    if spec is None:
        return PARSERS[detect_parser_name(tokenizer) if tokenizer is not None else "hermes"]()
    if isinstance(spec, str):
        key = spec.lower()
        if key not in PARSERS:
            raise ValueError(f"unknown tool-call parser {spec!r}; known: {sorted(PARSERS)}, or pass an object "
                             "with .parse(text) or a callable")
        return PARSERS[key]()
    if isinstance(spec, type) and hasattr(spec, "parse"):
        spec = spec()
    if hasattr(spec, "parse") and callable(spec.parse):
        if not hasattr(spec, "stop_strings"):
            return FunctionParser(spec.parse)
        return spec
    if callable(spec):
        return FunctionParser(spec)
    raise ValueError(f"tool-call parser must be None, a name ({sorted(PARSERS)}), an object with .parse(text) "
                     f"or a callable; got {type(spec).__name__}")
