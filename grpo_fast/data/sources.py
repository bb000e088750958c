"""Where prompt rows come from: a `datasets.Dataset` / `IterableDataset` (or a list of dicts)
handed to the trainer, a folder written by `Dataset.save_to_disk`, JSONL / CSV / Parquet /
GSM8K files, or a built-in task.

Files are read through `datasets` (CSV, Parquet) or line by line (JSONL, so that a bad line is
reported with its number); every source ends as rows with `prompt` and `answer` under the
configured column names. A streamed dataset (IterableDataset) stays lazy: `load_splits` returns
it as is and the trainer draws from it in order (grpo_fast.data.stream.StreamingPrompts).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from grpo_fast.data.prompts import check_conversation
from grpo_fast.errors import DataError
from grpo_fast.tasks import make_task


def read_table(path: str | Path, fmt: str = "auto", field: str = "data.path") -> list[dict]:
    """Rows of a JSONL / CSV / Parquet / GSM8K file (or a save_to_disk folder) as dicts.
    field: the config field that named the file (data.path or data.eval_path), for the messages."""
    path = Path(path)
    if path.is_dir():
        return _dataset_rows(_load_from_disk(path, field, split="train"))
    if not path.is_file():
        raise DataError(f"{field}: {str(path)!r} is not found")
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
        if fmt is None:
            raise DataError(f"data.format: cannot tell the format of {path.name}; set jsonl, csv, parquet or gsm8k")
    if fmt in ("jsonl", "gsm8k"):
        rows = _jsonl_rows(path, field)
        return [gsm8k_row(r, i) for i, r in enumerate(rows)] if fmt == "gsm8k" else rows
    if fmt in ("csv", "parquet"):
        if fmt == "csv":
            for _ in _text_lines(path, field):  # a non-UTF-8 line is named before the CSV parser fails
                pass
        import datasets

        loader = datasets.Dataset.from_csv if fmt == "csv" else datasets.Dataset.from_parquet
        try:
            ds = loader(str(path), keep_in_memory=True)
        except Exception as exc:  # pyarrow / datasets errors have no common base worth naming
            raise DataError(f"{field}: {path.name} is not a readable {fmt.upper()} file: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return _dataset_rows(ds)
    raise DataError(f"data.format: unknown format {fmt!r}")


def _jsonl_rows(path: Path, field: str) -> list[dict]:
    rows = []
    for lineno, line in _text_lines(path, field):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{field}: {path.name} line {lineno} is not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise DataError(f"{field}: {path.name} line {lineno} is a JSON {type(row).__name__}, "
                            f"not an object with named columns")
        rows.append(row)
    return rows


def _text_lines(path: Path, field: str):
    """(line number, line) of a UTF-8 text file; DataError naming the line that is not UTF-8."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{field}: {path.name} line {lineno} is not UTF-8 text ({exc.reason} at byte "
                                f"{exc.start}); re-save the file as UTF-8") from None


def _load_from_disk(path: Path, field: str, split: str):
    """A Dataset saved with save_to_disk; a DatasetDict gives its `split` (or its only split)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{field}: {str(path)!r} is a folder but not one written by Dataset.save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split in loaded:
            return loaded[split]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataError(f"{field}: {path} holds splits {', '.join(loaded)}; none is called {split!r}")
    return loaded


def _dataset_rows(ds) -> list[dict]:
    return [dict(row) for row in ds]


def is_streaming(source) -> bool:
    """A lazily iterated source (datasets.IterableDataset): drawn in order, never materialized."""
    return type(source).__name__ == "IterableDataset"


def as_rows(source, name: str) -> list[dict]:
    """A Dataset, a DatasetDict's train split or a list of dicts, as a list of dicts."""
    if isinstance(source, (list, tuple)):
        for i, r in enumerate(source):
            if not isinstance(r, dict):
                raise DataError(f"{name}: row {i} is a {type(r).__name__}; a list of rows must hold dicts")
        return [dict(r) for r in source]
    if type(source).__name__ == "DatasetDict":
        if "train" not in source:
            raise DataError(f"{name}: a DatasetDict needs a 'train' split, it has {', '.join(source)}")
        source = source["train"]
    if type(source).__name__ == "Dataset":
        return _dataset_rows(source)
    raise DataError(f"{name}: expected a datasets.Dataset, IterableDataset or a list of dicts, got "
                    f"{type(source).__name__}")


def gsm8k_row(row: dict, index: int = 0) -> dict:
    """{'question', 'answer': '<solution> #### 42'} -> {'prompt', 'answer': '42', 'solution'}."""
    if "question" not in row or "answer" not in row:
        raise DataError(f"data.format: gsm8k row {index} needs 'question' and 'answer', has {sorted(row)}")
    solution = str(row["answer"])
    if "####" not in solution:
        raise DataError(f"data.format: gsm8k row {index} answer has no '#### <final answer>'")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return {"prompt": row["question"], "answer": final, "solution": solution}


def normalize_row(row: dict, index: int, prompt_column: str, answer_column: str, source: str) -> dict:
    """Rename the configured columns to `prompt` / `answer` (other columns are kept); a prompt is
    a string or a conversation (list of {role, content}), checked here."""
    if prompt_column not in row:
        raise DataError(f"data.prompt_column: {source} row {index} has no column {prompt_column!r} "
                        f"(columns: {', '.join(sorted(row))})")
    new = {k: v for k, v in row.items() if k not in (prompt_column, answer_column)}
    prompt = row[prompt_column]
    if isinstance(prompt, (list, tuple)):
        new["prompt"] = check_conversation(prompt, f"{source} row {index}")
    else:
        new["prompt"] = str(prompt)
    new["answer"] = row.get(answer_column)
    return new


def normalize_rows(rows: list[dict], prompt_column: str, answer_column: str, source: str) -> list[dict]:
    return [normalize_row(r, i, prompt_column, answer_column, source) for i, r in enumerate(rows)]


def load_splits(cfg, echo=None, *, train_dataset=None, eval_dataset=None):
    """DataConfig (and datasets handed to the trainer) -> (train, eval). Each is a list of rows,
    except a streamed train_dataset, returned as is (see is_streaming). echo (e.g. print) hears
    how a file was split."""
    pc, ac = ("prompt", "answer") if cfg.format == "gsm8k" else (cfg.prompt_column, cfg.answer_column)
    if train_dataset is not None:
        if is_streaming(train_dataset):
            train = train_dataset  # normalized row by row as it is drawn
        else:
            train = normalize_rows(as_rows(train_dataset, "train_dataset"), pc, ac, "train_dataset")
        name = "train_dataset"
    elif cfg.path is None:
        return make_task(cfg.task, train_size=cfg.train_size, eval_size=cfg.eval_size,
                         seed=cfg.task_seed, difficulty=cfg.difficulty)
    else:
        name = Path(cfg.path).name
        train = normalize_rows(read_table(cfg.path, cfg.format), pc, ac, name)
    if not is_streaming(train) and not train:
        raise DataError(f"data.path: {name} has no rows" if train_dataset is None else "train_dataset has no rows")
    if eval_dataset is not None:
        rows = (_take(eval_dataset, cfg.eval_size) if is_streaming(eval_dataset)
                else as_rows(eval_dataset, "eval_dataset"))
        return train, normalize_rows(rows, pc, ac, "eval_dataset")[: cfg.eval_size]
    if cfg.eval_path is not None:
        evals = normalize_rows(read_table(cfg.eval_path, cfg.format, "data.eval_path"), pc, ac,
                               Path(cfg.eval_path).name)
        return train, evals[: cfg.eval_size]
    if is_streaming(train):
        return train, []  # a stream has no held-out slice: pass eval_dataset
    # Hold out a seeded slice of the training rows: at most eval_fraction of them.
    n_eval = min(cfg.eval_size, int(len(train) * cfg.eval_fraction))
    order = list(range(len(train)))
    random.Random(cfg.task_seed).shuffle(order)
    held = set(order[:n_eval])
    evals = [train[i] for i in order[:n_eval]]
    train = [r for i, r in enumerate(train) if i not in held]
    if echo is not None:
        echo(f"data: {name} has {len(train) + n_eval} rows: {len(train)} train, {n_eval} held out for eval "
             f"(at most data.eval_fraction={cfg.eval_fraction:g} of them and data.eval_size={cfg.eval_size}; "
             f"set data.eval_path or eval_dataset to use your own eval rows)")
    return train, evals


def _take(stream, n: int) -> list[dict]:
    out = []
    for row in stream:
        if len(out) >= n:
            break
        out.append(dict(row))
    return out
