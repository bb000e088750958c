"""Reward functions and the guarded call that turns them into a reward matrix.

A reward function has TRL's signature, called with keywords:

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

`columns` holds every dataset column (e.g. `answer`) as a list aligned with the completions,
plus `completion_lengths`, `finish_reasons` and `trainer_state`. With conversational prompts,
`prompts` are message lists and each completion is [{"role": "assistant", "content": ...}];
multi-turn (tools), the whole conversation after the prompt: assistant and tool messages, and the
`environments` column (each rollout's environment, or None).
None means "abstain": the function has no opinion on that sample and it does not count in its
reward (NaN in the matrix, handled by `compute_advantages`). `async def` functions are awaited
concurrently.

builtin.py: `accuracy`, `format`, `overlong`, `judge`; registry.py: which functions a run uses
(names, callables, module:function); calling.py: the guarded, timed call (`compute_rewards`).
"""

from grpo_fast.rewards.builtin import (DEFAULT_FORMAT_PATTERN, DEFAULT_RUBRIC, accuracy, answer_span,
                                       countdown_correct, extract_answer, make_format_reward, make_judge_reward,
                                       make_overlong_reward, math_equal, parse_number)
from grpo_fast.rewards.calling import RewardError, RewardResult, RewardTimeout, compute_rewards
from grpo_fast.rewards.registry import RewardSet, add_rewards, build_rewards, func_name, load_user_function
from grpo_fast.rewards.shapes import as_completions, completion_text

__all__ = ["DEFAULT_FORMAT_PATTERN", "DEFAULT_RUBRIC", "RewardError", "RewardResult", "RewardSet", "RewardTimeout",
           "accuracy", "add_rewards", "answer_span", "as_completions", "build_rewards", "completion_text", "compute_rewards",
           "countdown_correct", "extract_answer", "func_name", "load_user_function", "make_format_reward",
           "make_judge_reward", "make_overlong_reward", "math_equal", "parse_number"]
