"""The built-in reward functions: `accuracy` (the answer against the reference, math-verify for
symbolic answers), `format` (a regex over the whole completion), `overlong` (DAPO's soft length
penalty) and `judge` (a local model grades the answer). Each has TRL's signature and returns one
value per completion (None = abstain).
"""

from __future__ import annotations

import logging
import math
import re
from fractions import Fraction
from typing import Callable

import torch

from grpo_fast.rewards.shapes import completion_text

DEFAULT_FORMAT_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
DEFAULT_RUBRIC = (
    "You are grading an answer.\nQuestion: {prompt}\nReference answer: {answer}\n"
    "Answer to grade: {completion}\nScore the answer from 0 (wrong) to 10 (fully correct). "
    "Reply with the score only."
)

RewardFn = Callable[..., list]


# ---------------------------------------------------------------- answer parsing (accuracy)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
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


def last_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (braces balanced, so \boxed{\frac{1}{2}} works)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def answer_span(completion: str) -> str:
    """Where the completion states its answer: inside <answer> tags, else the last \\boxed{},
    else after a '####' marker, else the whole text."""
    found = _ANSWER_TAG.findall(completion)
    if found:
        completion = found[-1]
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if "####" in completion:
        return completion.rsplit("####", 1)[1]
    return completion


def extract_answer(completion: str) -> Fraction | None:
    """The number the completion answers with: its answer span (see answer_span) if that is a
    number, else the last number in it."""
    span = answer_span(completion)
    value = parse_number(span)
    if value is not None:
        return value
    for cand in reversed(_NUMBER.findall(span)):
        value = parse_number(cand)
        if value is None and "," in cand:  # keep a list "1, 2" apart
            value = parse_number(cand.rsplit(",", 1)[1])
        if value is not None:
            return value
    return None


def _latex(text: str) -> str:
    return text if "$" in text else f"${text}$"


def math_equal(gold: str, answer: str) -> bool:
    """math-verify's equivalence (LaTeX, fractions, roots, sets, expressions) of two answer texts.
    Its own signal-based timeouts are off: reward calls run on worker threads, timed by the caller."""
    import math_verify

    # It warns on every call that its (signal-based) timeouts are off; the caller times the call.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    parsed_gold = math_verify.parse(_latex(gold), parsing_timeout=None)
    if not parsed_gold:
        return False
    parsed = math_verify.parse(_latex(answer), parsing_timeout=None)
    return bool(parsed) and bool(math_verify.verify(parsed_gold, parsed, timeout_seconds=None))


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


def tool_use(completions, **_) -> list[float]:
    """1.0 when the trajectory called a tool that answered (a "tool" message with status "ok":
    not an error, timeout or parse-error observation), else 0.0: a shaping reward that teaches a
    model to reach for its tools (a single-turn completion never has tool messages)."""
    out = []
    for c in completions:
        messages = c if isinstance(c, (list, tuple)) else []
        ok = any(isinstance(m, dict) and m.get("role") == "tool" and m.get("status", "ok") == "ok" for m in messages)
        out.append(1.0 if ok else 0.0)
    return out


def accuracy(prompts, completions, answer, task=None, **_) -> list[float | None]:
    """1.0 when the completion's answer equals the reference, else 0.0; None when the row has no
    reference. A numeric reference ('42', '1,234', '3/4') is compared exactly with the number the
    completion answers with (its <answer> / \\boxed{} / '####' span, else its last number), and
    through math-verify when that span is LaTeX (\\frac{84}{2}); any other reference (LaTeX,
    sets, expressions) is compared by math-verify. Countdown rows evaluate the expression."""
    out: list[float | None] = []
    for i, (completion, ref) in enumerate(zip(completions, answer)):
        if ref is None or (isinstance(ref, float) and math.isnan(ref)) or str(ref).strip() == "":
            out.append(None)
            continue
        ref, text = str(ref), completion_text(completion)
        if task is not None and task[i] == "countdown":
            out.append(countdown_correct(text, ref))
            continue
        span = answer_span(text)
        gold_number = parse_number(ref)
        if gold_number is None:
            out.append(1.0 if math_equal(ref, span) else 0.0)
        elif "\\" in span:
            out.append(1.0 if math_equal(ref, span) else 0.0)
        else:
            out.append(1.0 if extract_answer(text) == gold_number else 0.0)
    return out


def make_format_reward(pattern: str | None = None) -> RewardFn:
    """1.0 when the whole completion matches the regex (DOTALL), else 0.0."""
    regex = re.compile(pattern or DEFAULT_FORMAT_PATTERN, re.DOTALL)

    def format(prompts, completions, **_):  # noqa: A001 - the reward's public name
        return [1.0 if regex.match(completion_text(c)) else 0.0 for c in completions]

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
            msg = template.format(prompt=p if isinstance(p, str) else completion_text(p), completion=completion_text(c),
                                  answer=a)
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


