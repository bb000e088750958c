"""Multi-turn sampling: what the sampler tells a turn handler when a model turn ends, and how it
reads the answer.

A turn ends when a sequence stops on EOS, a stop string / token or SamplingParams.max_turn_tokens
(not on its whole length budget, max_tokens).
With a ``turn_handler`` the sampler calls ``handler(TurnEnd)``; the handler answers

- ``None`` (or ``[]``): the trajectory is finished, with the turn's finish reason;
- a list of token ids: the environment's tokens (a tool result rendered with the chat template,
  ending in the next assistant header); they are appended to the live sequence, only they are
  prefilled (against the sequence's paged KV), and decoding resumes;
- a ``concurrent.futures.Future`` of either: the sequence holds its blocks and waits while the
  other sequences keep decoding (a blocking tool runs in a thread pool).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass


@dataclass(frozen=True)
class TurnEnd:
    group_idx: int  # the prompt's index in the generate call
    child_idx: int  # which of its G completions
    completion_token_ids: list[int]  # [C] everything after the prompt so far (all turns)
    turn_token_ids: list[int]  # the model tokens of the turn that just ended
    finish_reason: str  # "eos" | "stop" | "turn_length" (SamplingParams.max_turn_tokens)
    num_turns: int  # model turns so far, this one included
    tokens_left: int  # max_tokens - C: what the rest of the trajectory may still add


def call_handler(handler, turn: TurnEnd) -> Future:
    """The handler's answer as a Future: a plain answer is an already-completed one, and an
    exception the handler raises is kept in it (reported with the sequence it belongs to)."""
    done: Future = Future()
    try:
        answer = handler(turn)
    except Exception as exc:
        done.set_exception(exc)
        return done
    if isinstance(answer, Future):
        return answer
    done.set_result(answer)
    return done


def environment_tokens(answer, vocab_size: int, where: str) -> list[int] | None:
    """Validate a resolved answer: None / [] = finished, else a list of in-vocabulary ids."""
    if answer is None:
        return None
    if hasattr(answer, "tolist") and not isinstance(answer, (list, tuple)):
        answer = answer.tolist()
    if isinstance(answer, (str, bytes)) or not isinstance(answer, (list, tuple)):
        raise ValueError(f"turn_handler returned {type(answer).__name__} for {where}; expected None or a list "
                         f"of token ids (tokenize the environment's text first)")
    ids = list(answer)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise ValueError(f"turn_handler returned tokens for {where} that are not ints in [0, {vocab_size})")
    return ids or None


def read_answer(future: Future, vocab_size: int, where: str) -> list[int] | None:
    """A resolved handler answer as environment tokens (None: finished); a handler that raised is
    a RuntimeError naming the sequence (`where`)."""
    try:
        answer = future.result()
    except Exception as exc:
        raise RuntimeError(f"turn_handler failed for {where}: {type(exc).__name__}: {exc}") from exc
    return environment_tokens(answer, vocab_size, where)


def trajectory_end(tokens: list[int] | None, turn_reason: str, num_completion_tokens: int,
                   max_tokens: int) -> str | None:
    """The finish reason when the answer ends the trajectory, else None (the tokens are appended):
    no tokens finish it with the turn's reason ("length" for a turn_length turn); tokens that
    leave no room for a model token within max_tokens end it with "length"."""
    if tokens is None:
        return "length" if turn_reason == "turn_length" else turn_reason
    if num_completion_tokens + len(tokens) >= max_tokens:
        return "length"
    return None
