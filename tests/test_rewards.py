"""Rewards: answer parsing, built-in rewards, user functions, weights / abstain, and every error
path (raise / NaN / wrong count / non-number) under each on_reward_error policy."""

import math
import sys
import types
from fractions import Fraction

import pytest
import torch

from grpo_fast.config import RewardsConfig
from grpo_fast.rewards import (RewardError, RewardSet, accuracy, build_rewards, compute_rewards, extract_answer,
                               make_format_reward, make_overlong_reward, parse_number)


@pytest.mark.parametrize("text, value", [
    ("12 + 7 = 19", 19), ("The answer is -4.", -4), ("1,234 apples", 1234), ("$12.50", Fraction(25, 2)),
    ("x = 3/4", Fraction(3, 4)), ("<think>2+2=5?</think><answer>4</answer> then 9", 4),
    ("so \\boxed{42} and 7", 42), ("steps... #### 1,203", 1203), ("no number here", None),
    ("values 1, 2", 2),
])
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_parse_number_rejects_bad_commas():
    assert parse_number("1,2") is None and parse_number("12,345") == 12345


def test_accuracy_basic_and_abstain():
    out = accuracy(["p"] * 4, ["19", "the sum is 18", "", "5"], ["19", "19", "19", None])
    assert out == [1.0, 0.0, 0.0, None]


def test_accuracy_countdown_rows():
    out = accuracy(["p", "p"], ["(3 + 5) * 2", "3 * 5 + 2"], ["16|2,3,5", "16|2,3,5"], task=["countdown"] * 2)
    assert out == [1.0, 0.0]


def test_format_reward_default_and_custom():
    fmt = make_format_reward()
    assert fmt([], ["<think>a</think>\n<answer>1</answer>", "<answer>1</answer>"]) == [1.0, 0.0]
    assert make_format_reward(r"^\d+$")([], ["19", "19 apples"]) == [1.0, 0.0]


def test_overlong_dapo_soft_penalty():
    # L = 10, buffer 4: no penalty up to 6, linear to -1 at 10, -1 beyond.
    fn = make_overlong_reward(10, buffer=4, penalty=1.0)
    got = fn([], [""] * 5, completion_lengths=[3, 6, 8, 10, 12])
    assert got == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def _rs(fn, on_error="raise", name="fn"):
    return RewardSet([name], [fn], [1.0], on_error)


PROMPTS = ["p0", "p1", "p2"]
COMPS = ["c0", "c1", "boom"]


def test_weights_and_abstain_matrix():
    rs = RewardSet(["a", "b"], [lambda p, c, **k: [1.0, None, 0.0], lambda p, c, **k: [0.5, 0.5, None]], [2.0, -1.0])
    res = compute_rewards(rs, PROMPTS, COMPS, {})
    assert torch.isnan(res.rewards[1, 0]) and torch.isnan(res.rewards[2, 1])
    assert res.total(rs.weight_tensor).tolist() == pytest.approx([1.5, -0.5, 0.0])


def test_columns_reach_the_function():
    seen = {}

    def fn(prompts, completions, answer, completion_lengths, **rest):
        seen.update(answer=answer, lengths=completion_lengths, rest=sorted(rest))
        return [0.0] * len(completions)

    compute_rewards(_rs(fn), PROMPTS, COMPS, {"answer": ["1", "2", "3"], "completion_lengths": [1, 2, 3], "task": [None] * 3})
    assert seen == {"answer": ["1", "2", "3"], "lengths": [1, 2, 3], "rest": ["task", "trainer_state"]}  # as TRL passes it


def raising(prompts, completions, **_):
    out = []
    for c in completions:
        if c == "boom":
            raise KeyError("missing field")
        out.append(1.0)
    return out


def nan_on_boom(prompts, completions, **_):
    return [float("nan") if c == "boom" else 1.0 for c in completions]


def wrong_count(prompts, completions, **_):
    return [1.0] * (len(completions) + 1)


def non_number(prompts, completions, **_):
    return ["yes" if c == "boom" else 1.0 for c in completions]


def inf_on_boom(prompts, completions, **_):
    return [math.inf if c == "boom" else 1.0 for c in completions]


@pytest.mark.parametrize("fn, msg", [
    (raising, r"'fn' raised KeyError.*sample 2 \(prompt='p2', completion='boom'\)"),
    (nan_on_boom, r"'fn' returned NaN on sample 2 \(prompt='p2', completion='boom'\)"),
    (non_number, r"'fn' returned a non-number 'yes' on sample 2"),
    (inf_on_boom, r"'fn' returned inf on sample 2"),
    (wrong_count, r"'fn' returned 4 values for 3 completions"),
])
def test_errors_raise_naming_function_and_sample(fn, msg):
    with pytest.raises(RewardError, match=msg):
        compute_rewards(_rs(fn), PROMPTS, COMPS, {})


@pytest.mark.parametrize("fn", [raising, nan_on_boom, non_number, inf_on_boom])
def test_errors_zero_and_skip_are_counted(fn):
    res = compute_rewards(_rs(fn, "zero"), PROMPTS, COMPS, {})
    assert res.rewards[:, 0].tolist() == [1.0, 1.0, 0.0] and res.errors == {"fn": 1}
    res = compute_rewards(_rs(fn, "skip"), PROMPTS, COMPS, {})
    assert res.rewards[:2, 0].tolist() == [1.0, 1.0] and torch.isnan(res.rewards[2, 0]) and res.errors == {"fn": 1}


def test_wrong_count_handled_per_sample():
    res = compute_rewards(_rs(wrong_count, "zero"), PROMPTS, COMPS, {})
    # Called one by one, it still returns 2 values for 1: every sample fails and is counted.
    assert res.rewards[:, 0].tolist() == [0.0, 0.0, 0.0] and res.errors == {"fn": 3}


def test_user_function_by_module_path(monkeypatch):
    mod = types.ModuleType("my_rewards_mod")
    mod.length_bonus = lambda prompts, completions, **k: [float(len(c)) for c in completions]
    monkeypatch.setitem(sys.modules, "my_rewards_mod", mod)
    rs = build_rewards(RewardsConfig(funcs=["accuracy", "my_rewards_mod:length_bonus"], weights=[1.0, 0.1]), 16)
    res = compute_rewards(rs, ["p"], ["19"], {"answer": ["19"]})
    assert res.rewards.tolist() == [[1.0, 2.0]]
    assert res.total(rs.weight_tensor).tolist() == pytest.approx([1.2])


def test_user_function_import_errors():
    with pytest.raises(ValueError, match="cannot import"):
        build_rewards(RewardsConfig(funcs=["no_such_module_xyz:fn"]), 16)
    with pytest.raises(ValueError, match="has no function"):
        build_rewards(RewardsConfig(funcs=["math:no_such_fn"]), 16)


def test_judge_reward_with_a_tiny_local_model(tmp_path):
    """The judge reads its score from a local model's greedy reply; a random tiny model replies
    with arbitrary tokens, so only the contract is checked: one value per completion, each None
    or in [0, 1]."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {str(i): i for i in range(10)} | {"<eos>": 10, "a": 11, " ": 12}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, eos_token_id=10,
                                 pad_token_id=10)).save_pretrained(tmp_path)
    rs = build_rewards(RewardsConfig(funcs=["judge"], judge_model=str(tmp_path)), 16)
    res = compute_rewards(rs, ["1", "2"], ["3", "4"], {"answer": ["3", "5"]})
    vals = res.rewards[:, 0]
    assert vals.shape == (2,) and all(torch.isnan(v) or 0.0 <= v <= 1.0 for v in vals)
