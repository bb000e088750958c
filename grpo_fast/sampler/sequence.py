"""Bookkeeping of one prompt group and of one completion (a sequence in the KV block manager)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not yet prefilled, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"  # holds KV blocks; its last token is pending (KV written next decode)
    PAUSED = "paused"  # a turn ended; holds its blocks while the environment answers (multi-turn)
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion of a group. ``token_ids`` = prompt + completion; while RUNNING, the KV of
    every token but the last is in the cache and the last one's is written by the next decode.

    A multi-turn completion is segments of model and environment tokens: ``model_mask[i]`` is 1
    where completion token i was sampled, 0 where the environment appended it (its logprob is 0).
    ``turn_start`` is the completion index where the current model turn began."""

    seq_id: int
    group: "Group"
    child_idx: int
    seed: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # [C]
    model_mask: list[int] = field(default_factory=list)  # [C]
    turn_start: int = 0
    num_turns: int = 1
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - len(self.group.prompt_token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[len(self.group.prompt_token_ids) :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]


@dataclass(eq=False)
class Group:
    """One prompt and its G completions. The prompt is prefilled once under ``prefill_id`` (a
    block-manager sequence that is forked into the children and then freed)."""

    group_idx: int
    prompt_token_ids: list[int]
    prefill_id: int
    children: list[Sequence] = field(default_factory=list)


# A unit of prefill work: a fresh group (prompt, then fork into G), or a preempted sequence
# (prompt + its completion so far, recomputed; it then samples its own next token).
PrefillItem = Group | Sequence


def prefill_tokens(item: PrefillItem) -> list[int]:
    return item.prompt_token_ids if isinstance(item, Group) else item.token_ids


def prefill_seq_id(item: PrefillItem) -> int:
    return item.prefill_id if isinstance(item, Group) else item.seq_id
