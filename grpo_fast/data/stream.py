"""The order prompts are drawn in, resumable exactly.

PromptStream: the encoded prompts of an in-memory dataset, a fresh seeded permutation every
epoch. StreamingPrompts: a streamed dataset (datasets.IterableDataset) drawn in order, each row
normalized and encoded as it comes, reshuffled per epoch through its own buffer shuffle. Either
one's state is its position (epoch, index), so a resumed run draws exactly the prompts the
interrupted run would have drawn next.
"""

from __future__ import annotations

import random

from grpo_fast.data.prompts import EncodedPrompt, encode_prompt, too_long
from grpo_fast.errors import DataError, ResumeError


class PromptStream:
    """Endless seeded stream over the training prompts: a fresh permutation every epoch."""

    def __init__(self, items: list, seed: int):
        self.items = items
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self.skipped = 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return len(self.items)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, k: int) -> list:
        out = []
        while len(out) < k:
            if self.index >= len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            out.append(self.items[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size") != len(self.items) or state["seed"] != self.seed:
            raise ResumeError("resume: the dataset or train.seed differs from the checkpoint's")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)


class StreamingPrompts:
    """An IterableDataset drawn in order: rows normalized (normalize: row, index -> row) and
    encoded on the way, over-long prompts skipped or refused as data.on_long_prompt says."""

    def __init__(self, dataset, seed: int, *, normalize, tokenizer, cfg, max_prompt_length: int,
                 shuffle_buffer: int = 1000):
        self.dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 1 else dataset
        self.seed = seed
        self.normalize, self.tokenizer, self.cfg = normalize, tokenizer, cfg
        self.max_prompt_length = max_prompt_length
        self.epoch = 0
        self.index = 0  # rows of this epoch already drawn (skipped ones included)
        self.skipped = 0
        self._rows = None

    def _iterator(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        it = iter(self.dataset)
        for _ in range(self.index):  # resume: the rows this epoch already gave
            next(it)
        return it

    def _next_row(self) -> dict:
        if self._rows is None:
            self._rows = self._iterator()
        for attempt in range(2):
            try:
                return dict(next(self._rows))
            except StopIteration:
                if self.index == 0:
                    raise DataError("train_dataset: the streamed dataset gave no rows") from None
                self.epoch += 1
                self.index = 0
                self._rows = self._iterator()
        raise DataError("train_dataset: the streamed dataset gave no rows")

    def take(self, k: int) -> list[EncodedPrompt]:
        out = []
        while len(out) < k:
            raw = self._next_row()
            row = self.normalize(raw, self.index)
            self.index += 1
            ids = encode_prompt(row, self.index - 1, self.tokenizer, self.cfg)
            if too_long(ids, row, self.index - 1, self.cfg, self.max_prompt_length, "train"):
                self.skipped += 1
                continue
            out.append(EncodedPrompt(ids, row))
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "streaming": True}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("streaming") or state["seed"] != self.seed:
            raise ResumeError("resume: the dataset (streamed or not) or train.seed differs from the checkpoint's")
        self.epoch, self.index = state["epoch"], state["index"]
        self._rows = None
