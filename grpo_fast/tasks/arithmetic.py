"""`arithmetic`: integer arithmetic questions whose answer is one number.

The prompt states the exact answer format ("Answer with just the final number"), and the
accuracy reward takes the last number of the completion, so the model is rewarded for the right
number, not for prose. Difficulty sets the operand range and operators:

    easy    a + b, a - b (a >= b)          a, b in [1, 20]
    medium  a + b, a - b, a * b            a, b in [1, 50], products with b <= 12
    hard    a + b - c, a * b + c           a, b, c in [1, 99], products with b <= 12
"""

from __future__ import annotations

import itertools
import random

PROMPT = "What is {expr}? Answer with just the final number."


def _space(difficulty: str) -> list[tuple[str, int]]:
    """Every (expression, answer) of the difficulty, in a fixed order."""
    out = []
    if difficulty == "easy":
        for a, b in itertools.product(range(1, 21), repeat=2):
            out.append((f"{a} + {b}", a + b))
            if a >= b:
                out.append((f"{a} - {b}", a - b))
    elif difficulty == "medium":
        for a, b in itertools.product(range(1, 51), repeat=2):
            out.append((f"{a} + {b}", a + b))
            if a >= b:
                out.append((f"{a} - {b}", a - b))
            if b <= 12:
                out.append((f"{a} * {b}", a * b))
    else:  # hard: too many to enumerate; a seeded sample, deduplicated below
        rng = random.Random(0)
        for _ in range(60_000):
            a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 99)
            out.append((f"{a} + {b} - {c}", a + b - c))
            b12 = rng.randint(2, 12)
            out.append((f"{a} * {b12} + {c}", a * b12 + c))
        out = list(dict.fromkeys(out))
    return out


def make_splits(*, train_size: int, eval_size: int, seed: int, difficulty: str = "easy"):
    space = _space(difficulty)
    random.Random(seed).shuffle(space)
    if eval_size >= len(space):
        raise ValueError(f"data.eval_size: {eval_size} leaves no training problems ({len(space)} in '{difficulty}')")
    # `expression` lets a prompt_template show a tool call on it (examples/tool_calculator.yaml)
    rows = [{"prompt": PROMPT.format(expr=e), "answer": str(v), "task": "arithmetic", "expression": e}
            for e, v in space]
    eval_rows = rows[:eval_size]
    train_rows = rows[eval_size : eval_size + train_size]
    return train_rows, eval_rows
