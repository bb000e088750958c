"""`countdown`: reach a target with + - * / using each given number once (TinyZero's task).

The answer column holds "target|n1,n2,n3"; the accuracy reward (rewards.countdown_correct)
parses the last expression in the completion, checks that it uses exactly the given numbers and
evaluates it safely. Problems are built backwards from a random expression, so each has a
solution. Difficulty sets how many numbers (3 easy, 4 medium/hard) and their range.
"""

from __future__ import annotations

import random

PROMPT = (
    "Using the numbers {nums}, each exactly once, and + - * /, make {target}. "
    "Answer with just the expression, for example (1 + 2) * 3."
)


def _problem(rng: random.Random, count: int, hi: int) -> tuple[int, list[int]]:
    while True:
        nums = [rng.randint(1, hi) for _ in range(count)]
        value = nums[0]
        for n in nums[1:]:
            op = rng.choice("+-*")
            value = value + n if op == "+" else value - n if op == "-" else value * n
        if 0 < value <= 1000:
            shuffled = nums[:]
            rng.shuffle(shuffled)
            return value, shuffled


def make_splits(*, train_size: int, eval_size: int, seed: int, difficulty: str = "easy"):
    count, hi = {"easy": (3, 10), "medium": (4, 12), "hard": (4, 25)}[difficulty]
    rng = random.Random(seed)
    seen: set[tuple] = set()
    rows = []
    # Draw until both splits are full; an attempt cap keeps tiny spaces from looping forever.
    for _ in range(50 * (train_size + eval_size) + 1000):
        if len(rows) >= train_size + eval_size:
            break
        target, nums = _problem(rng, count, hi)
        key = (target, tuple(sorted(nums)))  # disjointness is on the multiset, not the order
        if key in seen:
            continue
        seen.add(key)
        rows.append({
            "prompt": PROMPT.format(nums=", ".join(map(str, nums)), target=target),
            "answer": f"{target}|{','.join(map(str, nums))}",
            "task": "countdown",
        })
    if len(rows) <= eval_size:
        raise ValueError(f"data.eval_size: {eval_size} leaves no training problems")
    return rows[eval_size:], rows[:eval_size]
