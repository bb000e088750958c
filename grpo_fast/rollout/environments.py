"""Environments with TRL 1.16's ``environment_factory`` semantics.

``environment_factory`` is a zero-argument callable returning an environment, or a dict of them
keyed by name. Every rollout (trajectory) gets its own instance, so the G completions of a prompt
never share state. The environment's contract, as in TRL:

- its public methods (names not starting with ``_``), except ``reset`` and ``get_reward``, are
  its tools, described to the model by their signatures and docstrings;
- ``reset(**row)`` (required) prepares the instance for the dataset row; a returned string is
  appended to the last user message before generation, None appends nothing. With a dict of
  factories the row's ``environment`` column picks the factory and is not passed to ``reset``;
- ``get_reward()`` (optional, sync or async) scores the finished rollout; the trainer logs it
  under the environment's class name.

Standalone ``tools`` (plain functions) are offered alongside every environment's methods.
``EnvironmentSpec(None, tools=[...])`` is the tools-only case (TRL's ``tools=`` without an
environment): the same ``create(row)`` path, with no instance, no reset text and no reward, so the
agent loop has one code path.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .tools import tool_name, tool_schema

RESERVED = ("reset", "get_reward")


def tools_by_name(tools) -> dict[str, Callable]:
    """A list of tool callables as a name → callable dict; two tools with one name is an error
    (the model could not tell them apart)."""
    table: dict[str, Callable] = {}
    for fn in tools:
        name = tool_name(fn)
        if name in table:
            raise ValueError(f"two tools are named {name!r}; tool names must be unique")
        table[name] = fn
    return table


@dataclass
class EnvironmentInstance:
    """One rollout's environment: the instance, its tools (bound methods plus standalone tools),
    their schemas for the chat template, the text ``reset`` returned, and the factory's name."""
    env: Any
    tools: dict[str, Callable]
    schemas: list[dict]
    reset_text: str | None
    name: str
    reward_name: str = ""  # the class name: where get_reward's value is logged
    has_reward: bool = field(default=False)

    def reward(self) -> float | None:
        """``get_reward()`` of the finished rollout (awaited if async), or None without one."""
        if not self.has_reward:
            return None
        value = self.env.get_reward()
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value))
        if value is None:
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.reward_name}.get_reward() returned {value!r}; expected a float or None") from None

    def apply_reset_text(self, messages: list[dict]) -> list[dict]:
        """``messages`` with ``reset_text`` appended to the last user message (a new list; the
        dataset row is not mutated). TRL concatenates without a separator; so do we."""
        return append_to_last_user(messages, self.reset_text)


class EnvironmentSpec:
    """Resolves ``environment_factory`` (a callable or a dict of callables) and creates one
    instance per rollout with ``create(row)``. Method schemas are computed once per class."""

    def __init__(self, factory: Callable | Mapping[str, Callable] | None, tools=()):
        if factory is None:
            self.factories, self.multi = {}, False
        elif isinstance(factory, Mapping):
            if not factory:
                raise ValueError("environment_factory is an empty dict; give at least one name → factory")
            bad = [k for k, f in factory.items() if not callable(f)]
            if bad:
                raise ValueError(f"environment_factory entries {bad} are not callables")
            self.factories, self.multi = dict(factory), True
        elif callable(factory):
            self.factories, self.multi = {None: factory}, False
        else:
            raise ValueError(f"environment_factory must be None, a callable or a dict of callables, "
                             f"got {type(factory).__name__}")
        self.standalone = tools_by_name(tools)
        self._standalone_schemas = [tool_schema(fn) for fn in self.standalone.values()]
        self._class_schemas: dict[type, list[tuple[str, dict]]] = {}

    @property
    def names(self) -> list:
        return list(self.factories)

    def factory_for(self, row: Mapping) -> tuple[Any, Callable]:
        """The (name, factory) a row selects: its ``environment`` column with a dict of factories."""
        if not self.multi:
            return None, self.factories[None]
        if "environment" not in row:
            raise ValueError(f"environment_factory is a dict, so each row needs an 'environment' column; this row "
                             f"has columns {sorted(row)}. Known environments: {self.names}")
        name = row["environment"]
        if name not in self.factories:
            raise ValueError(f"row has environment={name!r}, which is not among the environments passed to "
                             f"environment_factory; known: {self.names}")
        return name, self.factories[name]

    def create(self, row: Mapping) -> EnvironmentInstance:
        """A fresh environment for one rollout of ``row``, reset with the row's columns."""
        if not self.factories:  # tools only
            return EnvironmentInstance(env=None, tools=dict(self.standalone), schemas=list(self._standalone_schemas),
                                       reset_text=None, name="tools")
        name, factory = self.factory_for(row)
        env = factory()
        cls = type(env)
        if not callable(getattr(env, "reset", None)):
            raise ValueError(f"environment {cls.__name__} (from environment_factory) has no callable reset(); "
                             "define reset(self, **row) returning None or the text to append to the prompt")
        methods = self._methods(env)
        tools = dict(self.standalone)
        for method_name, _ in methods:
            tools[method_name] = getattr(env, method_name)
        kwargs = {k: v for k, v in row.items() if k != "environment"} if self.multi else dict(row)
        text = env.reset(**kwargs)
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{cls.__name__}.reset() returned {type(text).__name__}; expected None or a str "
                             "to append to the last user message")
        return EnvironmentInstance(env=env, tools=tools, schemas=self._standalone_schemas + [s for _, s in methods],
                                   reset_text=text, name=name if name is not None else cls.__name__,
                                   reward_name=cls.__name__,
                                   has_reward=callable(getattr(env, "get_reward", None)))

    def _methods(self, env) -> list[tuple[str, dict]]:
        """(name, schema) of the tool methods of ``env``'s class, computed once per class. Members
        are listed on the class (as TRL does) so properties are not evaluated."""
        cls = type(env)
        if cls not in self._class_schemas:
            found = []
            for member, fn in inspect.getmembers(cls, predicate=inspect.isfunction):
                if member.startswith("_") or member in RESERVED:
                    continue
                if member in self.standalone:
                    raise ValueError(f"{cls.__name__}.{member} has the name of a standalone tool; rename one")
                try:
                    found.append((member, tool_schema(getattr(env, member))))
                except ValueError as exc:
                    raise ValueError(f"environment {cls.__name__}: {exc}") from None
            self._class_schemas[cls] = found
        return self._class_schemas[cls]


def append_to_last_user(messages: list[dict], text: str | None) -> list[dict]:
    """A copy of ``messages`` whose last user message ends with ``text`` (None: unchanged copy)."""
    messages = list(messages)
    if text is None:
        return messages
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            content = messages[i].get("content") or ""
            if not isinstance(content, str):
                raise ValueError("reset() text can only be appended to a string user message content")
            messages[i] = {**messages[i], "content": content + text}
            return messages
    raise ValueError("reset() returned text but the prompt has no user message to append it to")


async def _await(value):
    return await value
