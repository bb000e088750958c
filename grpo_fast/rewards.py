"""Reward functions and the guarded call that turns them into a reward matrix.

A reward function has TRL's signature:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` holds every dataset column (e.g. `answer`) as a list aligned with the completions,
plus `completion_ids`, `completion_lengths` and `finish_reasons`. None means "abstain": the
function has no opinion on that sample and it does not count in its reward (NaN in the matrix,
handled by `compute_advantages`).

Built-ins: `accuracy`, `format`, `overlong`, `judge`; anything else is `module:function`.

`compute_rewards` calls each function once on the whole batch and checks the result. A function
that raises, returns NaN / a non-number, or returns the wrong number of values is either fatal
(on_reward_error="raise": a RewardError naming the function and the sample) or handled per sample
("zero": that value becomes 0; "skip": that value abstains) and counted in the metrics.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import torch

from grpo_fast.errors import ConfigError, UserError

DEFAULT_FORMAT_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
DEFAULT_RUBRIC = (
    "You are grading an answer.\nQuestion: {prompt}\nReference answer: {answer}\n"
    "Answer to grade: {completion}\nScore the answer from 0 (wrong) to 10 (fully correct). "
    "Reply with the score only."
)

RewardFn = Callable[..., list]


class RewardError(UserError, RuntimeError):
    """A reward function failed; the message names the function and the sample."""


class RewardTimeout(Exception):
    """A reward call ran past rewards.timeout_s (handled like any error of the function)."""


# ---------------------------------------------------------------- answer parsing (accuracy)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_number(text: str) -> Fraction | None:
    """One number from a string: '1,234', '-3.5', '3/4', '$12', '12.' -> exact Fraction, else None.
    A comma is a thousands separator only in groups of three ('1,234'); '1,2' is not a number."""
    text = text.strip().replace("$", "").replace("\\!", "").rstrip(".")
    if not text:
        return None
    if "," in text and not re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        return None
    text = text.replace(",", "")
    try:
        if "/" in text:
            num, den = text.split("/")
            return Fraction(int(num), int(den))
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(completion: str) -> Fraction | None:
    """The number the completion answers with: inside <answer> tags or \\boxed{} if present,
    otherwise the last number in the text (after a '####' marker if there is one)."""
    for pattern in (_ANSWER_TAG, _BOXED):
        found = pattern.findall(completion)
        if found:
            completion = found[-1]
            break
    if "####" in completion:
        completion = completion.rsplit("####", 1)[1]
    # Drop thousands separators inside numbers, but keep a list "1, 2" apart.
    candidates = _NUMBER.findall(completion)
    for cand in reversed(candidates):
        value = parse_number(cand)
        if value is None and "," in cand:
            value = parse_number(cand.rsplit(",", 1)[1])
        if value is not None:
            return value
    return None


def _math_verify():
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return None
    return math_verify


def countdown_correct(completion: str, answer: str) -> float:
    """1.0 if the last arithmetic expression in the completion uses exactly the given numbers
    (answer = "target|n1,n2,...") and evaluates to the target."""
    target_s, nums_s = answer.split("|")
    target, nums = int(target_s), sorted(int(n) for n in nums_s.split(","))
    found = _ANSWER_TAG.findall(completion)
    text = found[-1] if found else completion
    exprs = re.findall(r"[\d+\-*/() .]+", text)
    exprs = [e.strip() for e in exprs if re.search(r"\d", e) and re.search(r"[+\-*/]", e)]
    if not exprs:
        return 0.0
    expr = exprs[-1].split("=")[0].strip()
    used = sorted(int(n) for n in re.findall(r"\d+", expr))
    if used != nums or not re.fullmatch(r"[\d+\-*/() .]+", expr):
        return 0.0
    try:
        value = eval(compile(expr, "<countdown>", "eval"), {"__builtins__": {}}, {})  # digits/ops only
    except (SyntaxError, ZeroDivisionError, TypeError):
        return 0.0
    return 1.0 if abs(value - target) < 1e-9 else 0.0


def accuracy(prompts, completions, answer, task=None, **_) -> list[float | None]:
    """1.0 when the completion's answer equals the reference, else 0.0; None when the row has no
    reference. Countdown rows are checked by evaluating the expression. With math-verify
    installed, symbolic answers (LaTeX, fractions) are compared by math_verify; otherwise numbers
    are compared exactly as fractions."""
    mv = _math_verify()
    out: list[float | None] = []
    for i, (completion, ref) in enumerate(zip(completions, answer)):
        if ref is None or (isinstance(ref, float) and math.isnan(ref)) or str(ref).strip() == "":
            out.append(None)
            continue
        ref = str(ref)
        if task is not None and task[i] == "countdown":
            out.append(countdown_correct(completion, ref))
            continue
        ref_value = extract_answer(ref)
        got = extract_answer(completion)
        if got is not None and ref_value is not None:
            out.append(1.0 if got == ref_value else 0.0)
        elif mv is not None:
            gold = mv.parse(ref)
            out.append(1.0 if gold and mv.verify(gold, mv.parse(completion)) else 0.0)
        else:
            out.append(0.0)
    return out


def make_format_reward(pattern: str | None = None) -> RewardFn:
    """1.0 when the whole completion matches the regex (DOTALL), else 0.0."""
    regex = re.compile(pattern or DEFAULT_FORMAT_PATTERN, re.DOTALL)

    def format(prompts, completions, **_):  # noqa: A001 - the reward's public name
        return [1.0 if regex.match(c) else 0.0 for c in completions]

    return format


def make_overlong_reward(max_completion_length: int, buffer: int = 0, penalty: float = 1.0) -> RewardFn:
    """DAPO soft overlong punishment. With L = max_completion_length, Lc = buffer:
        0                             if len <= L - Lc
        -penalty * (len - (L-Lc))/Lc  if L - Lc < len <= L
        -penalty                      if len > L"""
    cache = buffer or max(1, max_completion_length // 4)
    start = max_completion_length - cache

    def overlong(prompts, completions, completion_lengths, **_):
        out = []
        for n in completion_lengths:
            if n <= start:
                out.append(0.0)
            elif n <= max_completion_length:
                out.append(-penalty * (n - start) / cache)
            else:
                out.append(-penalty)
        return out

    return overlong


def make_judge_reward(model_path: str, rubric: str | None = None, *, max_new_tokens: int = 4) -> RewardFn:
    """A local HF causal LM grades each completion: the rubric prompt (with {prompt}, {answer},
    {completion}) goes through its chat template, it answers greedily, the first number in its
    reply / 10 is the reward (clamped to [0, 1]); no number -> None (abstain)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    template = rubric or DEFAULT_RUBRIC

    @torch.no_grad()
    def judge(prompts, completions, answer=None, **_):
        answers = answer if answer is not None else [""] * len(completions)
        texts = []
        for p, c, a in zip(prompts, completions, answers):
            msg = template.format(prompt=p, completion=c, answer=a)
            if tok.chat_template:
                texts.append(tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                                     add_generation_prompt=True))
            else:
                texts.append(msg)
        enc = tok(texts, return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        replies = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        scores = []
        for r in replies:
            m = re.search(r"\d+(?:\.\d+)?", r)
            scores.append(None if m is None else min(max(float(m.group()) / 10.0, 0.0), 1.0))
        return scores

    return judge


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


def build_rewards(cfg, max_completion_length: int) -> RewardSet:
    """RewardsConfig -> RewardSet."""
    funcs = []
    for name in cfg.funcs:
        if name == "accuracy":
            funcs.append(accuracy)
        elif name == "format":
            funcs.append(make_format_reward(cfg.format_pattern))
        elif name == "overlong":
            funcs.append(make_overlong_reward(max_completion_length, cfg.overlong_buffer, cfg.overlong_penalty))
        elif name == "judge":
            funcs.append(make_judge_reward(cfg.judge_model, cfg.judge_rubric))
        else:
            funcs.append(load_user_function(name))
    weights = list(cfg.weights) if cfg.weights is not None else [1.0] * len(funcs)
    return RewardSet(list(cfg.funcs), funcs, weights, cfg.on_reward_error, cfg.timeout_s)


# ---------------------------------------------------------------- the guarded call


@dataclass
class RewardResult:
    rewards: torch.Tensor  # [N, F] fp32; NaN = abstain (None, or a skipped error)
    errors: dict[str, int] = field(default_factory=dict)  # per function, samples that failed

    def total(self, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum over functions, abstentions counted as 0: [N]."""
        return torch.nansum(self.rewards * weights, dim=1)


def _describe(i: int, prompts: list[str], completions: list[str]) -> str:
    def short(s: str) -> str:
        s = s.replace("\n", "\\n")
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


def compute_rewards(rs: RewardSet, prompts: list[str], completions: list[str], columns: dict[str, list]) -> RewardResult:
    """Call every function on the batch -> RewardResult. See the module docstring for errors."""
    n = len(completions)
    out = torch.full((n, len(rs.funcs)), float("nan"), dtype=torch.float32)
    errors: dict[str, int] = {}
    for j, (name, fn) in enumerate(zip(rs.names, rs.funcs)):
        fn = _with_time_limit(fn, rs.timeout_s)
        try:
            values = _call_batch(name, fn, prompts, completions, columns, rs.on_error)
        except RewardTimeout:
            # One sample at a time would wait up to n timeouts: the whole batch counts as failed.
            if rs.on_error == "raise":
                raise RewardError(f"reward function {name!r} did not return within rewards.timeout_s="
                                  f"{rs.timeout_s:g} s on a batch of {n} completions") from None
            values = [_handle(name, None, i, prompts, completions, rs.on_error, errors) for i in range(n)]
        if values is None:  # the batch call failed: go sample by sample to find / isolate failures
            values = [_call_one(name, fn, i, prompts, completions, columns, rs.on_error, errors) for i in range(n)]
        else:
            for i, v in enumerate(values):
                problem = _value_problem(v)
                if problem is not None:
                    values[i] = _handle(name, problem, i, prompts, completions, rs.on_error, errors)
        for i, v in enumerate(values):
            if v is not None:
                out[i, j] = float(v)
    return RewardResult(out, errors)


def _with_time_limit(fn: RewardFn, timeout_s: float | None) -> RewardFn:
    """fn, run in a worker thread and abandoned (RewardTimeout) after timeout_s. Python cannot
    stop a thread: a hung call keeps its (daemon) thread, but the run goes on."""
    if timeout_s is None:
        return fn

    def limited(*args, **kwargs):
        box: dict = {}

        def target():
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                box["error"] = exc

        worker = threading.Thread(target=target, daemon=True, name="reward-call")
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            raise RewardTimeout
        if "error" in box:
            raise box["error"]
        return box["value"]

    return limited


def _call_batch(name, fn, prompts, completions, columns, on_error) -> list | None:
    try:
        values = fn(prompts, completions, **columns)
    except RewardTimeout:
        raise
    except Exception:
        return None  # find the failing sample(s) one by one
    if values is None or not hasattr(values, "__len__") or len(values) != len(completions):
        got = "None" if values is None else (len(values) if hasattr(values, "__len__") else type(values).__name__)
        if on_error == "raise":
            raise RewardError(f"reward function {name!r} returned {got} values for {len(completions)} completions")
        return None
    return list(values)


def _call_one(name, fn, i, prompts, completions, columns, on_error, errors):
    one = {k: v[i : i + 1] for k, v in columns.items()}
    try:
        values = fn(prompts[i : i + 1], completions[i : i + 1], **one)
    except RewardTimeout:
        if on_error == "raise":
            raise RewardError(f"reward function {name!r} did not return within rewards.timeout_s on "
                              f"{_describe(i, prompts, completions)}") from None
        return _handle(name, None, i, prompts, completions, on_error, errors)
    except Exception as exc:
        if on_error == "raise":
            raise RewardError(f"reward function {name!r} raised {type(exc).__name__}: {exc} on "
                              f"{_describe(i, prompts, completions)}") from exc
        return _handle(name, None, i, prompts, completions, on_error, errors)
    if values is None or not hasattr(values, "__len__") or len(values) != 1:
        return _handle(name, "returned the wrong number of values", i, prompts, completions, on_error, errors)
    problem = _value_problem(values[0])
    if problem is not None:
        return _handle(name, problem, i, prompts, completions, on_error, errors)
    return values[0]


def _handle(name, problem, i, prompts, completions, on_error, errors):
    if on_error == "raise":
        raise RewardError(f"reward function {name!r} {problem} on {_describe(i, prompts, completions)}")
    errors[name] = errors.get(name, 0) + 1
    return 0.0 if on_error == "zero" else None
