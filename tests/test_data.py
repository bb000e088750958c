"""Data: file formats, column mapping, GSM8K, built-in tasks' disjoint splits, long prompts, and
the prompt stream's exact resume."""

import csv
import json

import pytest

from grpo_fast.config import DataConfig
from grpo_fast.data import PromptStream, encode_prompts, gsm8k_row, load_splits, read_table
from grpo_fast.tasks import make_task


class CharTokenizer:
    """One token per character; no chat template, so render_prompt uses the plain text."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


ROWS = [{"q": f"what is {i} + 1?", "a": str(i + 1), "extra": i} for i in range(10)]


def _write(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["q", "a", "extra"])
            w.writeheader()
            w.writerows(ROWS)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_file_formats_and_columns(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    cfg = DataConfig(path=str(path), prompt_column="q", answer_column="a", eval_size=3, eval_fraction=0.3, task_seed=5)
    train, evals = load_splits(cfg)
    assert len(train) == 7 and len(evals) == 3
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in evals})
    row = next(r for r in train + evals if r["prompt"] == "what is 4 + 1?")
    assert str(row["answer"]) == "5" and str(row["extra"]) == "4"  # other columns are kept


def test_missing_column_names_the_option(tmp_path):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(ValueError, match="data.prompt_column.*'question'"):
        load_splits(DataConfig(path=str(path), prompt_column="question"))


def test_bad_json_line_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{not json}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_table(path)


def test_gsm8k_format(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "Tom has 3 apples and buys 1,200 more. How many?", "answer": "3 + 1200 = 1203\n#### 1,203"},
            {"question": "q2", "answer": "x\n#### 7"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, evals = load_splits(DataConfig(path=str(path), format="gsm8k", eval_size=1))
    got = {r["prompt"]: r["answer"] for r in train + evals}
    assert got["Tom has 3 apples and buys 1,200 more. How many?"] == "1203"
    with pytest.raises(ValueError, match="####"):
        gsm8k_row({"question": "q", "answer": "no marker"})


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
@pytest.mark.parametrize("difficulty", ["easy", "medium"])
def test_tasks_seeded_and_disjoint(task, difficulty):
    a_train, a_eval = make_task(task, train_size=300, eval_size=50, seed=3, difficulty=difficulty)
    b_train, b_eval = make_task(task, train_size=300, eval_size=50, seed=3, difficulty=difficulty)
    assert a_train == b_train and a_eval == b_eval  # seeded
    assert len(a_eval) == 50 and len(a_train) == 300
    if task == "arithmetic":
        keys = lambda rows: {r["prompt"] for r in rows}  # noqa: E731
    else:  # countdown: disjoint on (target, multiset of numbers), whatever the order shown
        keys = lambda rows: {(r["answer"].split("|")[0], tuple(sorted(r["answer"].split("|")[1].split(",")))) for r in rows}  # noqa: E731
    assert keys(a_train).isdisjoint(keys(a_eval))
    c_train, c_eval = make_task(task, train_size=300, eval_size=50, seed=4, difficulty=difficulty)
    assert c_eval != a_eval  # another seed, another split


def test_arithmetic_answers_are_right():
    train, _ = make_task("arithmetic", train_size=200, eval_size=10, seed=0, difficulty="medium")
    for r in train:
        expr = r["prompt"].split("What is ")[1].split("?")[0]
        assert str(eval(expr)) == r["answer"]


def test_countdown_problems_are_solvable():
    from grpo_fast.rewards import countdown_correct

    train, _ = make_task("countdown", train_size=50, eval_size=5, seed=0)
    for r in train:
        assert "|" in r["answer"] and int(r["answer"].split("|")[0]) > 0
    # A hand-made check of the verifier on a known problem.
    assert countdown_correct("(3 + 5) * 2", "16|2,3,5") == 1.0
    assert countdown_correct("3 + 5 + 2", "16|2,3,5") == 0.0


def test_long_prompts_error_or_counted_skip():
    rows = [{"prompt": "short", "answer": "1"}, {"prompt": "x" * 100, "answer": "2"}]
    cfg = DataConfig(on_long_prompt="error")
    with pytest.raises(ValueError, match=r"max_prompt_length.*prompt 1 has 100 tokens"):
        encode_prompts(rows, CharTokenizer(), cfg, max_prompt_length=50)
    enc, skipped = encode_prompts(rows, CharTokenizer(), DataConfig(on_long_prompt="skip"), max_prompt_length=50)
    assert skipped == 1 and [e.row["prompt"] for e in enc] == ["short"]
    assert len(enc[0].ids) == len("short")  # never truncated, never padded


def test_system_prompt_and_template_in_plain_text():
    cfg = DataConfig(system_prompt="SYS", prompt_template="Q: {prompt}")
    enc, _ = encode_prompts([{"prompt": "hi"}], CharTokenizer(), cfg, max_prompt_length=100)
    assert "".join(map(chr, enc[0].ids)) == "SYS\n\nQ: hi"


def test_prompt_stream_resumes_exactly():
    items = list(range(7))
    a = PromptStream(items, seed=1)
    first = a.take(5)
    state = a.state_dict()
    rest = a.take(12)  # crosses two epoch boundaries
    b = PromptStream(items, seed=1)
    b.load_state_dict(state)
    assert b.take(12) == rest
    assert sorted(first + rest[:2]) == items  # an epoch is a permutation
    with pytest.raises(ValueError, match="resume"):
        PromptStream(list(range(8)), seed=1).load_state_dict(state)
