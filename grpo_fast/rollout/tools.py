"""Tools as the model sees them: a JSON schema per Python function, and the call / result records
that flow between the parser, the executor and the chat template.

A tool is any Python callable with type hints and a Google-style docstring (a summary line and an
``Args:`` entry per parameter), sync or ``async def``, a plain function or a bound method (an
environment's method: ``self`` is not part of the schema). This is the contract TRL 1.16 and
``transformers.apply_chat_template(tools=...)`` use, so tools written for TRL port unchanged.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable

STATUSES = ("ok", "error", "timeout", "parse_error", "unknown_tool")


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: the tool's name and its (JSON-decoded) keyword arguments."""
    name: str
    arguments: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    """What the environment answers to one call. ``call`` is None for a parse error (there was no
    well-formed call). ``content`` is the text the model reads; for a failure it says what went
    wrong, so the failure is an observation the model can learn from, never a crash."""
    call: ToolCall | None
    content: str
    status: str = "ok"  # one of STATUSES

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"ToolResult status {self.status!r} is not one of {STATUSES}")
        if not isinstance(self.content, str):
            raise ValueError(f"ToolResult content must be a str, got {type(self.content).__name__}")

    @property
    def name(self) -> str:
        """The tool's name as the chat template's tool message carries it."""
        return self.call.name if self.call is not None else "invalid_tool_call"


def tool_name(fn: Callable) -> str:
    """The name a tool is called by: the function's ``__name__`` (a bound method's, without the class)."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        raise ValueError(f"tool {fn!r} has no __name__; pass a function or a bound method")
    return name


def tool_schema(fn: Callable) -> dict:
    """The OpenAI / Hugging Face function schema of ``fn``:
    ``{"type": "function", "function": {"name", "description", "parameters": <JSON schema>}}``.

    Built by ``transformers.utils.get_json_schema`` (the same code ``apply_chat_template`` runs on a
    callable), so the prompt shows what a TRL run would show. It needs a docstring with a
    description, a type hint for every parameter and an ``Args:`` line for every parameter; a
    missing piece is a ValueError naming the function and the piece, raised when the tool is
    registered rather than mid-rollout. ``*args`` / ``**kwargs`` cannot be described to the model
    and are refused.
    """
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

    if not callable(fn):
        raise ValueError(f"tool {fn!r} is not callable")
    name = getattr(fn, "__qualname__", None) or tool_name(fn)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tool {name}: cannot read its signature ({exc})") from None
    star = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if star:
        raise ValueError(f"tool {name}: *args / **kwargs ({', '.join(star)}) cannot be described in a JSON "
                         "schema; give every argument a name, a type hint and an Args: line")
    if not inspect.getdoc(fn):
        raise ValueError(f"tool {name} has no docstring; write one with a summary line and an 'Args:' section "
                         "describing each argument (Google style)")
    try:
        return get_json_schema(fn)
    except DocstringParsingException as exc:
        raise ValueError(f"tool {name}: docstring problem: {exc}. Each argument needs an 'Args:' line "
                         "'name: description'") from None
    except TypeHintParsingException as exc:
        raise ValueError(f"tool {name}: type hint problem: {exc}") from None


def stringify(value: Any) -> str:
    """A tool's return value as the text the model reads: JSON for dicts / lists / tuples (so
    structure survives), ``str`` for everything else (None reads "None", as in TRL)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return str(value)
    return str(value)
