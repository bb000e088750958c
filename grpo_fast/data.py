"""Prompt datasets: files or built-in tasks -> rows -> token ids, and a resumable prompt stream.

A row is a dict with `prompt` (the user message), `answer` (the reference, may be None) and any
other columns, which reach the reward functions as keyword arguments.

Files: JSONL, CSV or Parquet with configurable prompt / answer columns, or `gsm8k` (JSONL with
`question` and `answer` where the final answer follows '####'). Prompts are rendered with the
tokenizer's chat template (optional system prompt); a prompt longer than max_prompt_length is an
error or, with on_long_prompt="skip", dropped and counted. Never truncated.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from grpo_fast.errors import DataError, ResumeError
from grpo_fast.tasks import make_task


def read_table(path: str | Path, fmt: str = "auto", field: str = "data.path") -> list[dict]:
    """Rows of a JSONL / CSV / Parquet / GSM8K file as dicts. field: the config field that named
    the file (data.path or data.eval_path), for the messages."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "not found"
        raise DataError(f"{field}: {str(path)!r} is {what}")
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
        if fmt is None:
            raise DataError(f"data.format: cannot tell the format of {path.name}; set jsonl, csv, parquet or gsm8k")
    if fmt in ("jsonl", "gsm8k"):
        rows = []
        for lineno, line in _text_lines(path, field):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{field}: {path.name} line {lineno} is not JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{field}: {path.name} line {lineno} is a JSON {type(row).__name__}, "
                                    f"not an object with named columns")
                rows.append(row)
        return [gsm8k_row(r, i) for i, r in enumerate(rows)] if fmt == "gsm8k" else rows
    if fmt == "csv":
        lines = [line for _, line in _text_lines(path, field)]
        return list(csv.DictReader(lines))
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("data.format: reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow's errors have no common base worth naming
            raise DataError(f"{field}: {path.name} is not a readable Parquet file: {exc}") from None
    raise DataError(f"data.format: unknown format {fmt!r}")


def _text_lines(path: Path, field: str):
    """(line number, line) of a UTF-8 text file; DataError naming the line that is not UTF-8."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{field}: {path.name} line {lineno} is not UTF-8 text ({exc.reason} at byte "
                                f"{exc.start}); re-save the file as UTF-8") from None


def gsm8k_row(row: dict, index: int = 0) -> dict:
    """{'question', 'answer': '<solution> #### 42'} -> {'prompt', 'answer': '42', 'solution'}."""
    if "question" not in row or "answer" not in row:
        raise DataError(f"data.format: gsm8k row {index} needs 'question' and 'answer', has {sorted(row)}")
    solution = str(row["answer"])
    if "####" not in solution:
        raise DataError(f"data.format: gsm8k row {index} answer has no '#### <final answer>'")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return {"prompt": row["question"], "answer": final, "solution": solution}


def normalize_rows(rows: list[dict], prompt_column: str, answer_column: str, source: str) -> list[dict]:
    """Rename the configured columns to `prompt` / `answer`; other columns are kept."""
    out = []
    for i, row in enumerate(rows):
        if prompt_column not in row:
            raise DataError(f"data.prompt_column: {source} row {i} has no column {prompt_column!r} "
                             f"(columns: {', '.join(sorted(row))})")
        new = {k: v for k, v in row.items() if k not in (prompt_column, answer_column)}
        new["prompt"] = str(row[prompt_column])
        new["answer"] = row.get(answer_column)
        out.append(new)
    return out


def load_splits(cfg, echo=None) -> tuple[list[dict], list[dict]]:
    """DataConfig -> (train_rows, eval_rows). echo (e.g. print) hears how a file was split."""
    if cfg.path is None:
        return make_task(cfg.task, train_size=cfg.train_size, eval_size=cfg.eval_size,
                         seed=cfg.task_seed, difficulty=cfg.difficulty)
    pc, ac = ("prompt", "answer") if cfg.format == "gsm8k" else (cfg.prompt_column, cfg.answer_column)
    name = Path(cfg.path).name
    train = normalize_rows(read_table(cfg.path, cfg.format), pc, ac, name)
    if not train:
        raise DataError(f"data.path: {cfg.path} has no rows")
    if cfg.eval_path is not None:
        evals = normalize_rows(read_table(cfg.eval_path, cfg.format, "data.eval_path"), pc, ac,
                               Path(cfg.eval_path).name)
        evals = evals[: cfg.eval_size]
    else:  # hold out a seeded slice of the training file: at most eval_fraction of it
        n_eval = min(cfg.eval_size, int(len(train) * cfg.eval_fraction))
        order = list(range(len(train)))
        random.Random(cfg.task_seed).shuffle(order)
        held = set(order[:n_eval])
        evals = [train[i] for i in order[:n_eval]]
        train = [r for i, r in enumerate(train) if i not in held]
        if echo is not None:
            echo(f"data: {name} has {len(train) + n_eval} rows: {len(train)} train, {n_eval} held out for eval "
                 f"(at most data.eval_fraction={cfg.eval_fraction:g} of them and data.eval_size={cfg.eval_size}; "
                 f"set data.eval_path to use your own eval file)")
    return train, evals


# ---------------------------------------------------------------- tokenization


@dataclass
class EncodedPrompt:
    ids: list[int]
    row: dict


def render_prompt(tokenizer, row: dict, cfg, index: int | None = None) -> str:
    """The text the model sees: template(prompt), in the chat template when there is one. The
    template may name any column of the row ({prompt}, {context}, ...)."""
    try:
        user = cfg.prompt_template.format(**row)
    except KeyError as exc:
        where = "" if index is None else f"row {index} "
        raise DataError(f"data.prompt_template: names column {exc.args[0]!r}, which {where}does not have "
                        f"(columns: {', '.join(sorted(row))})") from None
    except (IndexError, ValueError) as exc:
        raise DataError(f"data.prompt_template: {cfg.prompt_template!r} is not a valid template: {exc}") from None
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
            {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (cfg.system_prompt + "\n\n" if cfg.system_prompt else "") + user


def encode_prompts(rows: list[dict], tokenizer, cfg, max_prompt_length: int, split: str = "train"):
    """Rows -> (list[EncodedPrompt], skipped count). A prompt over max_prompt_length tokens is an
    error naming the row, or skipped and counted with on_long_prompt='skip'."""
    out, skipped = [], 0
    for i, row in enumerate(rows):
        text = render_prompt(tokenizer, row, cfg, i)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            if cfg.on_long_prompt == "error":
                raise DataError(
                    f"sampling.max_prompt_length: {split} prompt {i} has {len(ids)} tokens > {max_prompt_length} "
                    f"(raise the limit, or set data.on_long_prompt=skip to drop such prompts): {row['prompt'][:80]!r}")
            skipped += 1
            continue
        out.append(EncodedPrompt(ids, row))
    if not out:
        raise DataError(f"sampling.max_prompt_length: every {split} prompt is longer than {max_prompt_length} tokens")
    return out, skipped


class PromptStream:
    """Endless seeded stream over the training prompts: a fresh permutation every epoch.

    The position (epoch, index) is the whole state, so a resumed run draws exactly the prompts the
    interrupted run would have drawn next."""

    def __init__(self, items: list, seed: int):
        self.items = items
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

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
        if state["size"] != len(self.items) or state["seed"] != self.seed:
            raise ResumeError("resume: the dataset or train.seed differs from the checkpoint's")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)
