"""Multi-turn training: tool calls parsed from the model's turns and run, their results appended
as environment tokens that carry no loss and no gradient, limits ending as documented, and the
trainer running tool-calling rollouts end to end (tools and environment_factory, TRL's API)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM

from grpo_fast import GRPOConfig, GRPOTrainer
from grpo_fast.config import LossConfig
from grpo_fast.rollout import ParsedTurn, ToolCall, ToolSetup
from grpo_fast.sampler.turns import TurnEnd
from grpo_fast.train.generation import Generator
from grpo_fast.train.model import policy_modules
from grpo_fast.train.policy_loss import policy_loss
from grpo_fast.train.rollout_batch import make_batch
from test_train_loop import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_tools"))


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny)


def lookup(key: str) -> str:
    """Look a key up.

    Args:
        key: The key.
    """
    return "42"


def boom(key: str) -> str:
    """Always fails.

    Args:
        key: Ignored.
    """
    raise KeyError(key)


def slow(key: str) -> str:
    """Sleeps past the timeout.

    Args:
        key: Ignored.
    """
    time.sleep(1.0)
    return "late"


def turn(tok, text, *, reason="stop", num_turns=1, group=0, child=0):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return TurnEnd(group, child, ids, ids, reason, num_turns, 100)


def start(tok, **kw):
    setup = ToolSetup(tok, tools=[lookup, boom, slow], timeout_s=0.2, **kw)
    rollout = setup.start([[{"role": "user", "content": "q"}]], [{"prompt": "q"}], 1)
    return setup, rollout


def call(name, args='{"key": "a"}'):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def test_tool_results_errors_timeouts_and_parse_errors_become_observations(tok):
    setup, rollout = start(tok, max_tool_calling_iterations=4)
    assert "lookup" in tok.decode(rollout.prompt_ids[0])  # the schemas reach the prompt
    traj = rollout.trajectories[0][0]
    for text, expected in [(call("lookup"), "42"), (call("boom"), "KeyError"), (call("slow"), "timed out"),
                           ('<tool_call>\n{"name": "lookup", "arguments": \n</tool_call>', "parse")]:
        answer = rollout(turn(tok, text))
        observation = tok.decode(answer.result(timeout=10))
        assert expected in observation, (text, observation)
        assert observation.endswith("<assistant>")  # the next assistant header: the model speaks next
    assert dict(traj.results) == {"ok": 1, "error": 1, "timeout": 1, "parse_error": 1}
    assert traj.iterations == 4
    assert rollout(turn(tok, call("lookup"))) is None  # max_tool_calling_iterations reached: finished
    assert rollout(turn(tok, "the answer is 42")) is None  # no call: the model answered
    roles = [m["role"] for m in traj.messages]
    assert roles == ["assistant", "tool"] * 4 + ["assistant", "assistant"]
    assert traj.messages[0]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": {"key": "a"}}
    setup.close()  # the trainer closes after its final eval; a later trainer.evaluate() starts it again
    again = setup.start([[{"role": "user", "content": "q"}]], [{"prompt": "q"}], 1)
    assert "42" in tok.decode(again(turn(tok, call("lookup"))).result(timeout=10))
    setup.close()


def test_observation_tokens_extend_the_rendered_conversation(tok):
    """Prompt + model turn + observation = the template's rendering of the whole conversation."""
    setup, rollout = start(tok)
    text = call("lookup")
    obs = rollout(turn(tok, text)).result(timeout=10)
    conversation = rollout.prompt_ids[0] + tok(text, add_special_tokens=False)["input_ids"] + obs
    rendered = tok.decode(conversation)
    assert rendered.endswith(text + "\n<tool><tool_response>\n42\n</tool_response>\n<assistant>")
    setup.close()


def test_environment_tokens_carry_no_loss_and_no_gradient():
    """The loss and every gradient are unchanged when the targets at environment positions
    change (they are masked out), and the on-policy DAPO loss is -Σ A·n / Σ n over model tokens."""
    torch.manual_seed(0)
    from transformers import LlamaConfig

    base = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))
    policy = policy_modules(model)
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9]]
    completions = [[10, 11, 30, 31, 32, 12, 13], [14, 15, 16], [17, 33, 34, 18]]
    masks = [[1, 1, 0, 0, 0, 1, 1], [1, 1, 1], [1, 0, 0, 1]]
    advantages = torch.tensor([1.0, -0.5, 2.0])
    lc = LossConfig()

    def loss_and_grads(batch):
        model.zero_grad()
        n_tok = float(batch.mask.sum())
        loss, _ = policy_loss(policy, batch, advantages, None, None, loss_cfg=lc, temperature=1.0,
                              max_completion_length=8, num_items_in_batch=n_tok, num_sequences_in_batch=3)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    batch = make_batch(prompts, completions, 0, model_masks=masks)
    assert batch.mask.tolist() == [[1, 1, 0, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0, 0]]
    loss, grads = loss_and_grads(batch)
    n = torch.tensor([4.0, 3.0, 2.0])  # model tokens per row
    torch.testing.assert_close(loss, -(advantages * n).sum() / n.sum())
    other = make_batch(prompts, completions, 0, model_masks=masks)
    env = other.mask == 0
    other.targets[env & (torch.arange(7) < torch.tensor([7, 3, 4])[:, None])] = 49  # other env-token targets
    loss2, grads2 = loss_and_grads(other)
    torch.testing.assert_close(loss2, loss)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g)
    assert any(float(g.abs().sum()) > 0 for g in grads)


class ScriptedCalls:
    """A parser that reads every turn as a call of `lookup` (a random model writes no JSON):
    turns end at frequent characters, so trajectories go through several tool turns."""

    stop_strings = (">", "5", "7", "a", "e")

    def parse(self, text):
        return ParsedTurn(text, [ToolCall("lookup", {"key": text[-1:]})], None)


def test_hf_fallback_loop_equals_the_sampler_greedy(tiny, tok):
    model = LlamaForCausalLM.from_pretrained(tiny).eval()
    setup = ToolSetup(tok, tools=[lookup], parser=ScriptedCalls(), max_tool_calling_iterations=2)
    outs = {}
    for backend in ("sampler", "hf"):
        rollout = setup.start([[{"role": "user", "content": f"q{i}"}] for i in range(2)],
                              [{"prompt": "q"}] * 2, 2)
        gen = Generator(model, tok, backend=backend)
        outs[backend] = gen.generate(rollout.prompt_ids, n=2, temperature=0.0, max_tokens=60,
                                     stop=setup.stop_strings, turn_handler=rollout)
    setup.close()
    for a, b in zip(outs["sampler"], outs["hf"]):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
        assert [c.model_mask for c in a.completions] == [c.model_mask for c in b.completions]
        assert [c.finish_reason for c in a.completions] == [c.finish_reason for c in b.completions]
    assert any(c.num_turns > 1 for o in outs["sampler"] for c in o.completions)


SEEN = {}


def saw_tools(prompts, completions, environments=None, **kwargs):
    SEEN["completion"] = completions[0]
    SEEN["completions"] = completions
    SEEN["environments"] = environments
    return [float(sum(m["role"] == "tool" for m in c)) for c in completions]


class CounterEnv:
    """Counts its own calls; one instance per rollout."""

    def __init__(self):
        self.calls = 0

    def reset(self, **row):
        self.row = row
        return None

    def lookup(self, key: str) -> str:
        """Look a key up in this environment.

        Args:
            key: The key.
        """
        self.calls += 1
        return str(self.calls)

    def get_reward(self):
        return float(self.calls)


def args(out, **extra):
    fields = dict(output_dir=str(out), max_steps=2, learning_rate=1e-3, num_generations=3, per_device_train_batch_size=6,
                  gradient_accumulation_steps=1, max_completion_length=160, seed=1, report_to="none", disable_tqdm=True,
                  logging_steps=1, max_tool_calling_iterations=2, max_prompt_length=1024,
                  **{"sampling.backend": "sampler", "lora.r": 4, "lora.lora_alpha": 8, "eval_before": False,
                     "tools.tool_call_parser": "test_multiturn_training:ScriptedCalls"})
    return GRPOConfig(**{**fields, **extra})


def rows(n=4):
    return [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)} for i in range(n)]


@pytest.mark.parametrize("kind", ["tools", "environment_factory"])
def test_trainer_runs_tool_calling_rollouts(tiny, tmp_path, kind):
    datasets = pytest.importorskip("datasets")
    SEEN.clear()
    extra = {"tools": [lookup]} if kind == "tools" else {"environment_factory": CounterEnv}
    trainer = GRPOTrainer(str(tiny), saw_tools, args(tmp_path / kind), train_dataset=datasets.Dataset.from_list(rows()),
                          **extra)
    result = trainer.train()
    assert result.steps == 2
    last = [json.loads(x) for x in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["tools/call_frequency"] > 0 and last["tools/turns_mean"] > 1
    assert last["tools/failure_frequency"] == 0.0
    completion = SEEN["completion"]
    assert completion[0]["role"] == "assistant" and any(m["role"] == "tool" for m in completion)
    if kind == "environment_factory":
        assert "rewards/CounterEnv/mean" in last  # get_reward, logged under the class name
        envs = SEEN["environments"]
        assert len({id(e) for e in envs}) == len(envs)  # one environment per rollout
        # each environment saw exactly its own trajectory's calls
        assert all(isinstance(e, CounterEnv) for e in envs)  # the instances themselves, as TRL passes them
        assert [e.calls for e in envs] == [sum(m["role"] == "tool" for m in c) for c in SEEN["completions"]]
    else:
        assert all(e is None for e in SEEN["environments"])


def test_tool_use_reward_counts_calls_that_answered():
    from grpo_fast.rewards import build_rewards
    from grpo_fast.config import RewardsConfig

    (fn,) = build_rewards(RewardsConfig(funcs=["tool_use"]), 16).funcs
    said = {"role": "assistant", "content": "x"}
    completions = [[said, {"role": "tool", "content": "3", "status": "ok"}, said],
                   [said, {"role": "tool", "content": "Error: KeyError: 'a'", "status": "error"}, said],
                   [said], "a plain-text completion"]
    assert fn(completions=completions) == [1.0, 0.0, 0.0, 0.0]


class Greeter:
    def __init__(self):
        self.n = 0

    def reset(self, **row):
        return f" (secret {row['secret']})"

    def poke(self) -> str:
        """Poke the environment."""
        self.n += 1
        return str(self.n)


class Moody(Greeter):
    counter = 0

    def reset(self, **row):
        Moody.counter += 1
        return f" mood {Moody.counter}"


def test_environment_reset_text_joins_the_prompt_and_must_agree_within_a_group(tok):
    setup = ToolSetup(tok, environment_factory=Greeter)
    rollout = setup.start([[{"role": "user", "content": "Guess."}]], [{"prompt": "Guess.", "secret": 7}], 3)
    text = tok.decode(rollout.prompt_ids[0])
    assert "Guess. (secret 7)" in text and "poke" in text  # reset text appended, the method is a tool
    envs = [t.environment.env for t in rollout.flat()]
    assert len({id(e) for e in envs}) == 3  # one instance per rollout
    with pytest.raises(ValueError, match="returned different reset"):
        ToolSetup(tok, environment_factory=Moody).start([[{"role": "user", "content": "x"}]], [{"prompt": "x"}], 2)
    setup.close()
