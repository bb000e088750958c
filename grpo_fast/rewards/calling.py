"""Calling reward functions: once per function on the whole batch, guarded, into a reward matrix.

Each function is called with keywords, as TRL calls it:
    fn(prompts=..., completions=..., completion_ids=..., <every dataset column>=..., trainer_state=...)
(`completion_lengths` and `finish_reasons` come as columns too). `async def` functions run
concurrently, each on its own event loop; plain ones one after another. Every call runs on a
worker thread and is abandoned after `timeout_s` (Python cannot stop a thread: a hung call keeps
its daemon thread, the run goes on).

A function that raises, returns NaN / a non-number, returns the wrong number of values or times
out is either fatal (on_error="raise": a RewardError naming the function and the sample) or
handled per sample ("zero": that value becomes 0; "skip": that value abstains) and counted.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo_fast.errors import UserError
from grpo_fast.rewards.registry import RewardSet
from grpo_fast.rewards.shapes import completion_text


class RewardError(UserError, RuntimeError):
    """A reward function failed; the message names the function and the sample."""


class RewardTimeout(Exception):
    """A reward call ran past rewards.timeout_s (handled like any error of the function)."""


class _Call:
    """One call of a reward function on a worker thread (an awaitable result is run to completion
    on the thread's own event loop)."""

    def __init__(self, fn, kwargs: dict, timeout_s: float | None):
        fn = _keyword_callable(fn)
        self.box: dict = {}
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.thread = threading.Thread(target=self._run, args=(fn, kwargs), daemon=True, name="reward-call")
        self.thread.start()

    def _run(self, fn, kwargs) -> None:
        try:
            value = fn(**kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
            self.box["value"] = value
        except BaseException as exc:  # noqa: BLE001 - handed to the caller in result()
            self.box["error"] = exc

    def result(self):
        self.thread.join(None if self.deadline is None else max(0.0, self.deadline - time.monotonic()))
        if self.thread.is_alive():
            raise RewardTimeout
        if "error" in self.box:
            raise self.box["error"]
        return self.box["value"]


def _keyword_callable(fn):
    """fn called with keywords, as TRL calls reward functions: fn(prompts=..., completions=...,
    **columns). A function whose first two parameters have other names (p, c) gets them
    positionally, as grpo-fast's first releases called them."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: keywords it is
        return fn
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if "prompts" in params or "completions" in params or len(positional) < 2:
        return fn

    def call(prompts, completions, **kwargs):
        return fn(prompts, completions, **kwargs)

    return call


async def _awaited(awaitable):
    return await awaitable


def _call(fn, kwargs: dict, timeout_s: float | None):
    return _Call(fn, kwargs, timeout_s).result()


@dataclass
class RewardResult:
    rewards: torch.Tensor  # [N, F] fp32; NaN = abstain (None, or a skipped error)
    errors: dict[str, int] = field(default_factory=dict)  # per function, samples that failed

    def total(self, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum over functions, abstentions counted as 0: [N]."""
        return torch.nansum(self.rewards * weights, dim=1)


def _describe(i: int, prompts: list, completions: list) -> str:
    def short(s) -> str:
        s = completion_text(s).replace("\n", "\\n")
        return s if len(s) <= 200 else s[:200] + "..."

    return f"sample {i} (prompt={short(prompts[i])!r}, completion={short(completions[i])!r})"


def _value_problem(v: Any) -> str | None:
    """None when v is a valid reward value (a finite number or None), else why not."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v)  # numpy / torch scalars
        except (TypeError, ValueError):
            return f"returned a non-number {v!r}"
    if math.isnan(float(v)):
        return "returned NaN"
    if math.isinf(float(v)):
        return f"returned {float(v)}"
    return None


def compute_rewards(rs: RewardSet, prompts: list, completions: list, columns: dict[str, list], *,
                    trainer_state=None) -> RewardResult:
    """Call every function on the batch -> RewardResult. prompts / completions in TRL's shapes
    (strings, or message lists for conversational prompts); columns: dataset columns and
    completion_ids / completion_lengths / finish_reasons, aligned with the completions."""
    n = len(completions)
    out = torch.full((n, len(rs.funcs)), float("nan"), dtype=torch.float32)
    errors: dict[str, int] = {}
    kwargs = dict(columns, prompts=prompts, completions=completions, trainer_state=trainer_state)
    # async functions start together (their awaits overlap); plain ones run one after another.
    started = {j: _Call(fn, kwargs, rs.timeout_s) for j, fn in enumerate(rs.funcs) if _is_async(fn)}
    for j, (name, fn) in enumerate(zip(rs.names, rs.funcs)):
        call = started.get(j) or _Call(fn, kwargs, rs.timeout_s)
        try:
            values = _batch_result(name, call, n, rs.on_error)
        except RewardTimeout:
            # One sample at a time would wait up to n timeouts: the whole batch counts as failed.
            if rs.on_error == "raise":
                raise RewardError(f"reward function {name!r} did not return within rewards.timeout_s="
                                  f"{rs.timeout_s:g} s on a batch of {n} completions") from None
            values = [_handle(name, None, i, prompts, completions, rs.on_error, errors) for i in range(n)]
        if values is None:  # the batch call failed: go sample by sample to find / isolate failures
            values = [_call_one(name, fn, i, kwargs, rs, errors) for i in range(n)]
        else:
            for i, v in enumerate(values):
                problem = _value_problem(v)
                if problem is not None:
                    values[i] = _handle(name, problem, i, prompts, completions, rs.on_error, errors)
        for i, v in enumerate(values):
            if v is not None:
                out[i, j] = float(v)
    return RewardResult(out, errors)


def _is_async(fn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _batch_result(name, call: _Call, n: int, on_error) -> list | None:
    try:
        values = call.result()
    except RewardTimeout:
        raise
    except Exception:
        return None  # find the failing sample(s) one by one
    if values is None or not hasattr(values, "__len__") or len(values) != n:
        got = "None" if values is None else (len(values) if hasattr(values, "__len__") else type(values).__name__)
        if on_error == "raise":
            raise RewardError(f"reward function {name!r} returned {got} values for {n} completions")
        return None
    return list(values)


def _call_one(name, fn, i, kwargs: dict, rs: RewardSet, errors):
    one = {k: (v[i:i + 1] if isinstance(v, list) else v) for k, v in kwargs.items()}
    prompts, completions = kwargs["prompts"], kwargs["completions"]
    try:
        values = _call(fn, one, rs.timeout_s)
    except RewardTimeout:
        if rs.on_error == "raise":
            raise RewardError(f"reward function {name!r} did not return within rewards.timeout_s on "
                              f"{_describe(i, prompts, completions)}") from None
        return _handle(name, None, i, prompts, completions, rs.on_error, errors)
    except Exception as exc:
        if rs.on_error == "raise":
            raise RewardError(f"reward function {name!r} raised {type(exc).__name__}: {exc} on "
                              f"{_describe(i, prompts, completions)}") from exc
        return _handle(name, None, i, prompts, completions, rs.on_error, errors)
    if values is None or not hasattr(values, "__len__") or len(values) != 1:
        return _handle(name, "returned the wrong number of values", i, prompts, completions, rs.on_error, errors)
    problem = _value_problem(values[0])
    if problem is not None:
        return _handle(name, problem, i, prompts, completions, rs.on_error, errors)
    return values[0]


def _handle(name, problem, i, prompts, completions, on_error, errors):
    if on_error == "raise":
        raise RewardError(f"reward function {name!r} {problem} on {_describe(i, prompts, completions)}")
    errors[name] = errors.get(name, 0) + 1
    return 0.0 if on_error == "zero" else None
