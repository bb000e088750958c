"""Which reward functions a run uses: built-in names, `module:function` strings, or callables
(TRL's `reward_funcs`), each with a name (its metrics key), a weight, and the error policy."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from grpo_fast.errors import ConfigError
from grpo_fast.rewards.builtin import accuracy, make_format_reward, make_judge_reward, make_overlong_reward, tool_use

RewardFn = Callable[..., list]
BUILTIN = ("accuracy", "format", "overlong", "judge", "tool_use")


def load_user_function(spec: str) -> RewardFn:
    """'package.module:function' -> the function. The working directory is searched first, so a
    my_rewards.py beside the config needs no PYTHONPATH."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"rewards.funcs: {spec!r} is not module:function")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"rewards.funcs: cannot import {module_name!r} for {spec!r} (looked in {cwd} and on "
                          f"PYTHONPATH): {exc}") from exc
    except Exception as exc:  # the module itself raised while importing
        raise ConfigError(f"rewards.funcs: importing {module_name!r} for {spec!r} raised "
                          f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"rewards.funcs: {module_name} has no function {attr!r}")
    return fn


@dataclass
class RewardSet:
    """Named reward functions with weights and the error policy."""

    names: list[str]
    funcs: list[RewardFn]
    weights: list[float]
    on_error: str = "raise"
    timeout_s: float | None = None  # per call of a function; None = no limit

    @property
    def weight_tensor(self) -> torch.Tensor:
        return torch.tensor(self.weights, dtype=torch.float32)


def _builtin(name: str, cfg, max_completion_length: int) -> RewardFn:
    if name == "accuracy":
        return accuracy
    if name == "format":
        return make_format_reward(cfg.format_pattern)
    if name == "tool_use":
        return tool_use
    if name == "overlong":
        return make_overlong_reward(max_completion_length, cfg.overlong_buffer, cfg.overlong_penalty)
    return make_judge_reward(cfg.judge_model, cfg.judge_rubric)


def func_name(fn) -> str:
    """A callable's metrics name, as TRL names it (its __name__)."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def build_rewards(cfg, max_completion_length: int, funcs: list | None = None) -> RewardSet:
    """RewardsConfig (and, from the Python API, `funcs`: callables, built-in names or
    module:function strings, replacing cfg.funcs) -> RewardSet. Names must be distinct."""
    specs = list(cfg.funcs) if funcs is None else list(funcs)
    names, fns = [], []
    for spec in specs:
        if isinstance(spec, str):
            fn = _builtin(spec, cfg, max_completion_length) if spec in BUILTIN else load_user_function(spec)
            names.append(spec)
        elif callable(spec):
            if isinstance(spec, torch.nn.Module):
                raise ConfigError(f"reward_funcs: {type(spec).__name__} is a model; reward models are not supported, "
                                  f"pass a function (the `judge` built-in grades with a local model)")
            fn = spec
            names.append(func_name(spec))
        else:
            raise ConfigError(f"reward_funcs: {spec!r} is neither a callable, a built-in name ({', '.join(BUILTIN)}) "
                              f"nor module:function")
        fns.append(fn)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"reward_funcs: two reward functions are named {dupes[0]!r}; their metrics would collide "
                          f"(rename one)")
    weights = list(cfg.weights) if cfg.weights is not None else [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ConfigError(f"rewards.weights: has {len(weights)} values for {len(fns)} reward functions")
    return RewardSet(names, fns, weights, cfg.on_reward_error, cfg.timeout_s)


def add_rewards(rs: RewardSet, funcs: list[RewardFn], weight: float = 1.0) -> None:
    """Append reward functions the run brings itself (an environment's get_reward, named after its
    class), each with `weight`; a name already taken is an error, as in build_rewards."""
    for fn in funcs:
        name = func_name(fn)
        if name in rs.names:
            raise ConfigError(f"reward_funcs: a reward function is already named {name!r}, the environment "
                              f"{name}'s get_reward() reward would collide with it (rename one)")
        rs.names.append(name)
        rs.funcs.append(fn)
        rs.weights.append(weight)
