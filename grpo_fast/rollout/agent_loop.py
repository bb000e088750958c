"""Tool-calling trajectories on the sampler: the turn handler that reads a model turn, runs its
tool calls and answers with the observation's tokens, and what the trainer reads afterwards.

One step, as data:

    rows [B] ──ToolSetup.start──► per row: G environments (or the shared tools), reset(**row);
                                  the prompt rendered once with the tools' schemas
       │
       ▼ Sampler.generate(prompts, params, turn_handler=rollout)      (grpo_fast/sampler/turns.py)
       a turn ends (EOS, a stop string such as "</tool_call>") ──► rollout(turn):
           parse the turn ──► no call: the trajectory is finished (None)
                         ──► calls: ToolExecutor runs them (thread pool, per-call timeout) and the
                             Future resolves to observation_tokens(...); the sampler appends them
                             and prefills only them, the other sequences decode meanwhile
       │
       ▼ conversations (assistant / tool messages per trajectory, what reward functions see),
         environment rewards, tool metrics

Limits, each ending as documented, never as a crash: max_tool_calling_iterations (the turn after
the last allowed call finishes the trajectory), the trajectory's token budget
(sampling.max_completion_length: an observation that does not fit ends it with "length"), a
per-call timeout ("timeout" observation), a tool that raises ("error" observation), a malformed
call ("parse_error" observation, counted as an iteration).
"""

from __future__ import annotations

import importlib
import inspect
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from grpo_fast.data.prompts import messages_for
from grpo_fast.config import BUILTIN_TOOLS
from grpo_fast.errors import ConfigError
from grpo_fast.rollout.environments import EnvironmentInstance, EnvironmentSpec, append_to_last_user, tools_by_name
from grpo_fast.rollout.executor import ToolExecutor
from grpo_fast.rollout.parsers import get_parser
from grpo_fast.rollout.render import observation_tokens, render_prompt
from grpo_fast.rollout.tools import ToolResult, tool_schema
from grpo_fast.sampler.turns import TurnEnd


@dataclass
class Trajectory:
    """One rollout's tools and record: what reward functions and metrics see afterwards."""

    tools: dict[str, Callable]
    environment: EnvironmentInstance | None = None
    messages: list[dict] = field(default_factory=list)  # the completion as assistant / tool messages
    iterations: int = 0  # turns that called tools (a malformed call counts)
    results: Counter = field(default_factory=Counter)  # observations by status: ok, error, timeout, parse_error, ...
    tool_seconds: float = 0.0  # from a turn's calls submitted to their observation rendered


class ToolSetup:
    """What a run's tools are, built once: standalone tools and/or an environment factory, the
    tool-call parser, the executor (its threads and event loop), the limits."""

    def __init__(self, tokenizer, *, tools=(), environment_factory=None, parser=None,
                 max_tool_calling_iterations: int | None = None, timeout_s: float = 30.0, max_workers: int = 8,
                 chat_template_kwargs: dict | None = None):
        tools = list(tools or ())
        if not tools and environment_factory is None:
            raise ValueError("ToolSetup needs tools or an environment_factory")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tool calling needs a tokenizer with a chat template (tool results are rendered "
                             "with its tool role)")
        self.tokenizer = tokenizer
        self.tools = tools_by_name(tools)
        self.schemas = [tool_schema(fn) for fn in tools]  # errors name the tool that lacks a docstring
        self.environment = EnvironmentSpec(environment_factory, tools) if environment_factory is not None else None
        self.parser = get_parser(parser, tokenizer)
        self.max_iterations = max_tool_calling_iterations
        self._executor_args = dict(timeout=timeout_s, max_workers=max_workers)
        self._executor: ToolExecutor | None = None
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    @classmethod
    def from_config(cls, tokenizer, tools_cfg, *, tools=None, environment_factory=None,
                    chat_template_kwargs=None) -> ToolSetup | None:
        """The run's setup from the Python API's objects, else the config's import paths; None
        when the run has no tools."""
        tools = list(tools) if tools is not None else [load_tool(s) for s in tools_cfg.functions or []]
        if environment_factory is None and tools_cfg.environment:
            environment_factory = load_object(tools_cfg.environment, "tools.environment")
        if not tools and environment_factory is None:
            return None
        parser = tools_cfg.tool_call_parser
        if isinstance(parser, str) and ":" in parser:
            parser = load_object(parser, "tools.tool_call_parser")
        try:
            return cls(tokenizer, tools=tools, environment_factory=environment_factory, parser=parser,
                       max_tool_calling_iterations=tools_cfg.max_tool_calling_iterations,
                       timeout_s=tools_cfg.tool_timeout_s, max_workers=tools_cfg.max_tool_workers,
                       chat_template_kwargs=chat_template_kwargs)
        except ValueError as exc:  # a tool without a docstring, an unknown parser, ...: the user's to fix
            raise ConfigError(f"tools: {exc}") from None

    @property
    def stop_strings(self) -> list[str]:
        """Where sampling pauses for tools (e.g. "</tool_call>"), beside the run's own stops."""
        return list(self.parser.stop_strings)

    def environment_rewards(self) -> list[Callable]:
        """One reward function per environment class with get_reward(), named after the class
        (its metrics key); it reads the `environments` column and abstains (None) elsewhere."""
        if self.environment is None:
            return []
        out = []
        for factory in self.environment.factories.values():
            probe = factory()  # not reset: only its class is read
            if callable(getattr(probe, "get_reward", None)):
                out.append(_environment_reward(type(probe)))
        return out

    @property
    def executor(self) -> ToolExecutor:
        """The thread pool and event loop that run tools; started on first use (again after close())."""
        if self._executor is None:
            self._executor = ToolExecutor(**self._executor_args)
        return self._executor

    def start(self, messages: list[list[dict]], rows: list[dict], num_generations: int) -> ToolRollout:
        """The trajectories of one generate call: rows [B] with their conversations [B]."""
        return ToolRollout(self, messages, rows, num_generations)

    def start_prompts(self, prompts: list, data_cfg, num_generations: int) -> ToolRollout:
        """start() for encoded prompts (grpo_fast.data.EncodedPrompt): each row's conversation as
        the data section renders it (system prompt, prompt_template), re-rendered with the tools."""
        return self.start([messages_for(p.row, data_cfg) for p in prompts], [p.row for p in prompts], num_generations)

    def stops(self, stop) -> list[str]:
        """The run's own stop strings and the parser's."""
        return list(stop or []) + self.stop_strings

    def close(self) -> None:
        """Stop the executor's threads and loop (between rollouts; a later start() restarts them)."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


class ToolRollout:
    """B × G trajectories: their prompts (rendered once per row, with the tools' schemas) and the
    turn handler the sampler calls (``__call__``)."""

    def __init__(self, setup: ToolSetup, messages: list[list[dict]], rows: list[dict], num_generations: int):
        self.setup = setup
        self.trajectories: list[list[Trajectory]] = []
        self.prompt_ids: list[list[int]] = []
        for i, (conversation, row) in enumerate(zip(messages, rows)):
            group = [self._trajectory(row) for _ in range(num_generations)]
            texts = {t.environment.reset_text if t.environment else None for t in group}
            if len(texts) > 1:
                raise ValueError(f"the {num_generations} environments of prompt {i} returned different reset() texts; "
                                 f"GRPO compares the completions of one prompt, so reset(**row) must start every "
                                 f"rollout of a row from the same observation")
            first = group[0]
            conversation = append_to_last_user(conversation, first.environment.reset_text if first.environment else None)
            schemas = first.environment.schemas if first.environment else setup.schemas
            self.prompt_ids.append(render_prompt(setup.tokenizer, conversation, schemas,
                                                 **setup.chat_template_kwargs))
            self.trajectories.append(group)

    def _trajectory(self, row: dict) -> Trajectory:
        if self.setup.environment is None:
            return Trajectory(dict(self.setup.tools))
        env = self.setup.environment.create(row)
        return Trajectory(env.tools, env)

    def __call__(self, turn: TurnEnd) -> Future | None:
        """The turn handler (grpo_fast.sampler.turns): None finishes the trajectory; otherwise a
        Future of the observation's tokens."""
        setup = self.setup
        traj = self.trajectories[turn.group_idx][turn.child_idx]
        text = setup.tokenizer.decode(turn.turn_token_ids, skip_special_tokens=False)
        parsed = setup.parser.parse(text)
        clean = setup.tokenizer.decode(turn.turn_token_ids, skip_special_tokens=True)
        message = {"role": "assistant", "content": clean}
        if parsed.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)}}
                                     for c in parsed.tool_calls]
        traj.messages.append(message)
        if not parsed.tool_calls and parsed.error is None:
            return None  # the model answered
        if setup.max_iterations is not None and traj.iterations >= setup.max_iterations:
            return None  # out of tool-calling turns: this turn's calls are not run
        traj.iterations += 1
        started = time.perf_counter()
        calls = setup.executor.submit(list(parsed.tool_calls), tools=traj.tools, parse_error=parsed.error)
        answer: Future = Future()

        def observe(done: Future) -> None:
            try:
                results: list[ToolResult] = done.result()
                traj.tool_seconds += time.perf_counter() - started
                traj.results.update(r.status for r in results)
                traj.messages.extend({"role": "tool", "name": r.name, "content": r.content, "status": r.status}
                                     for r in results)
                answer.set_result(observation_tokens(setup.tokenizer, results, completion_text=text,
                                                     ended_turn=turn.finish_reason == "eos",
                                                     **setup.chat_template_kwargs))
            except Exception as exc:  # a rendering failure: the sampler reports it with the sequence
                answer.set_exception(exc)

        calls.add_done_callback(observe)
        return answer

    def flat(self) -> list[Trajectory]:
        """Trajectories in completion order [B * G]."""
        return [t for group in self.trajectories for t in group]

    def reward_inputs(self) -> tuple[list[list[dict]], list]:
        """What reward functions get, in completion order: each completion as its conversation
        after the prompt (assistant and tool messages), and the `environments` column (each
        rollout's environment instance, None without environments; TRL passes the instances)."""
        flat = self.flat()
        return ([[dict(m) for m in t.messages] for t in flat],
                [t.environment.env if t.environment else None for t in flat])

    def group_counts(self, group_idx: int) -> dict:
        """One group's tool counters (plain numbers: they travel between ranks): observations by
        status, trajectories that called a tool, seconds spent on tools."""
        group = self.trajectories[group_idx]
        counts = Counter()
        for t in group:
            counts.update(t.results)
        return {"observations": dict(counts), "with_calls": sum(sum(t.results.values()) > 0 for t in group),
                "seconds": sum(t.tool_seconds for t in group)}


def tool_metrics(groups: list[dict], num_turns: list[int]) -> dict[str, float]:
    """The step's tool metrics from the kept groups' ``group_counts`` and every completion's turns:
    tools/call_frequency = observations per trajectory (a malformed call counts),
    tools/failure_frequency = share of them that were not "ok"; errors / timeouts / parse_errors
    counted; turns_mean = model turns per trajectory."""
    counts = Counter()
    for g in groups:
        counts.update(g["observations"])
    n = max(1, len(num_turns))
    calls = sum(counts.values())
    return {
        "tools/turns_mean": sum(num_turns) / n,
        "tools/call_frequency": calls / n,
        "tools/failure_frequency": (calls - counts.get("ok", 0)) / calls if calls else 0.0,
        "tools/errors": float(counts.get("error", 0) + counts.get("unknown_tool", 0)),
        "tools/timeouts": float(counts.get("timeout", 0)),
        "tools/parse_errors": float(counts.get("parse_error", 0)),
        "tools/trajectories_with_calls": sum(g["with_calls"] for g in groups) / n,
        "tools/environment_seconds": sum(g["seconds"] for g in groups),
    }


def _environment_reward(cls: type) -> Callable:
    """get_reward() of every rollout whose environment is a `cls`, None (abstain) for the others;
    named after the class (its metrics key). Async when get_reward is (awaited with the others)."""
    def missing():
        return ValueError(f"the {cls.__name__} reward needs the `environments` column (multi-turn rollouts)")

    if inspect.iscoroutinefunction(getattr(cls, "get_reward", None)):
        async def reward(environments=None, **kwargs):
            if environments is None:
                raise missing()
            return [await e.get_reward() if type(e) is cls else None for e in environments]
    else:
        def reward(environments=None, **kwargs):
            if environments is None:
                raise missing()
            return [e.get_reward() if type(e) is cls else None for e in environments]

    reward.__name__ = reward.__qualname__ = cls.__name__
    return reward


_lock = threading.Lock()


def load_tool(spec: str) -> Callable:
    """A tool from the config: a built-in name (calculator) or module:function."""
    return load_object(BUILTIN_TOOLS.get(spec, spec), "tools.functions")


def load_object(spec: str, field_name: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{field_name}: {spec!r} is not module:name")
    with _lock:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"{field_name}: cannot import {module_name!r} for {spec!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{field_name}: {module_name} has no {attr!r}") from None
