"""Built-in synthetic tasks with verifiable answers and seeded, disjoint train / eval splits.

Each task enumerates (or samples) a space of problems, shuffles it with a seed, and cuts the
eval split off the front; the train split is drawn from the rest, so no eval problem is ever
trained on. A row is a dict with at least `prompt` (the user message) and `answer`.
"""

from __future__ import annotations

from grpo_fast.tasks import arithmetic, countdown

TASKS = {"arithmetic": arithmetic.make_splits, "countdown": countdown.make_splits}


def make_task(name: str, *, train_size: int, eval_size: int, seed: int, difficulty: str = "easy"):
    """Return (train_rows, eval_rows) of the built-in task `name`."""
    if name not in TASKS:
        raise ValueError(f"data.task: unknown task {name!r}; built-in tasks are {', '.join(TASKS)}")
    return TASKS[name](train_size=train_size, eval_size=eval_size, seed=seed, difficulty=difficulty)


__all__ = ["TASKS", "make_task"]
