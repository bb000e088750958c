"""The Python API a TRL user already knows: GRPOTrainer / GRPOConfig, conversational datasets
through `datasets`, TRL-style reward functions (sync and async), callbacks, evaluation with
pass@k, the model card, and the CLI as a thin layer over the same run."""

import asyncio
import json
import math

import pytest
import torch

from grpo_fast import GRPOConfig, GRPOTrainer, cli
from grpo_fast.errors import ConfigError
from test_train_loop import CHAT, make_tiny_model

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_api"))


def conversations(n=12):
    return [{"prompt": [{"role": "system", "content": "Answer with one digit."},
                        {"role": "user", "content": f"What is {i % 5} + {i % 4}?"}],
             "answer": str(i % 5 + i % 4), "level": i % 3} for i in range(n)]


SEEN = {}


def first_char_digit(prompts, completions, completion_ids, level, trainer_state, **kwargs):
    """TRL-style: conversational completions are lists of assistant messages."""
    SEEN.update(prompt=prompts[0], completion=completions[0], level=level[0], step=trainer_state.global_step,
                ids=completion_ids[0])
    return [float(c[0]["content"][:1].isdigit()) for c in completions]


async def async_length(completions, **kwargs):
    await asyncio.sleep(0.01)
    return [min(len(c[0]["content"]), 6) / 6 for c in completions]


def args(out, **extra):
    fields = dict(output_dir=str(out), max_steps=2, learning_rate=1e-3, num_generations=3, per_device_train_batch_size=6,
                  gradient_accumulation_steps=1, max_completion_length=6, seed=1, report_to="none", disable_tqdm=True,
                  logging_steps=1, **{"sampling.backend": "hf", "lora.r": 4, "lora.lora_alpha": 8, "eval_before": False})
    return GRPOConfig(**{**fields, **extra})


def metrics_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_api_end_to_end_with_a_conversational_dataset(tiny, tmp_path):
    ds = datasets.Dataset.from_list(conversations())
    trainer = GRPOTrainer(model=str(tiny), reward_funcs=[first_char_digit, async_length], args=args(tmp_path),
                          train_dataset=ds, eval_dataset=datasets.Dataset.from_list(conversations(4)))
    result = trainer.train()
    assert result.steps == 2
    assert isinstance(SEEN["prompt"], list) and SEEN["prompt"][0]["role"] == "system"
    assert SEEN["completion"][0]["role"] == "assistant" and isinstance(SEEN["ids"], list)
    assert SEEN["level"] in (0, 1, 2) and SEEN["step"] in (0, 1)
    steps = [r for r in metrics_rows(tmp_path) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("rewards/first_char_digit/mean", "rewards/async_length/mean", "rewards/async_length/std", "reward_std",
                "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio", "learning_rate",
                "entropy", "clip_ratio/low_mean", "num_tokens"):
        assert key in steps[0], key
    assert steps[1]["num_tokens"] > steps[0]["num_tokens"] > 0
    evals = [r for r in metrics_rows(tmp_path) if "eval/accuracy/mean" in r]
    assert evals and "eval/accuracy/pass@1" in evals[-1]
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "first_char_digit" in card and "async_length" in card and str(tiny) in card


def test_async_reward_functions_run_concurrently():
    from grpo_fast.rewards import RewardSet, compute_rewards

    async def slow(completions, **_):
        await asyncio.sleep(0.5)
        return [1.0] * len(completions)

    async def slow2(completions, **_):
        await asyncio.sleep(0.5)
        return [0.0] * len(completions)

    import time

    t0 = time.perf_counter()
    res = compute_rewards(RewardSet(["a", "b"], [slow, slow2], [1.0, 1.0]), ["p"], ["c"], {})
    assert res.rewards.tolist() == [[1.0, 0.0]] and time.perf_counter() - t0 < 0.9  # overlapped, not 1 s


def test_the_cli_runs_the_same_job(tiny, tmp_path, monkeypatch):
    """The run's own config.yaml, the same data (saved with save_to_disk) and the same reward
    (module:function) through the CLI give the same metrics, step by step."""
    ds = datasets.Dataset.from_list(conversations())
    ds.save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "api_rewards.py").write_text(
        "def first_char_digit(prompts, completions, **kwargs):\n"
        "    return [float(c[0]['content'][:1].isdigit()) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    GRPOTrainer(model=str(tiny), reward_funcs=["api_rewards:first_char_digit"],
                args=args(tmp_path / "api", **{"data.eval_size": 0}), train_dataset=ds).train()
    rc = cli.main(["train", "--config", str(tmp_path / "api" / "config.yaml"), "--output_dir", str(tmp_path / "cli"),
                   "--data.path", str(tmp_path / "ds")])
    assert rc == 0
    api = [r for r in metrics_rows(tmp_path / "api") if "reward" in r]
    via_cli = [r for r in metrics_rows(tmp_path / "cli") if "reward" in r]
    assert len(api) == len(via_cli) == 2
    for a, b in zip(api, via_cli):
        for key in ("reward", "loss", "grad_norm", "rewards/api_rewards:first_char_digit/mean"):
            assert a[key] == b[key], key


def test_streamed_dataset_trains_and_resumes_at_the_right_row(tiny, tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(30)]

    def stream():
        return datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=1)

    seen = []

    def record(prompts, completions, **_):
        seen.extend(prompts[::3])
        return [0.5] * len(completions)

    full = tmp_path / "full"
    GRPOTrainer(model=str(tiny), reward_funcs=record, args=args(full, max_steps=4), train_dataset=stream()).train()
    all_prompts = list(seen)
    seen.clear()
    cut = tmp_path / "cut"
    trainer = GRPOTrainer(model=str(tiny), reward_funcs=record, args=args(cut, max_steps=4, save_steps=2),
                          train_dataset=stream(), callbacks=[lambda state, m: state.global_step == 2])
    trainer.train()
    seen.clear()
    GRPOTrainer(model=str(tiny), reward_funcs=record, args=args(cut, max_steps=4), train_dataset=stream()).train(
        resume_from_checkpoint=True)
    assert seen == all_prompts[4:]  # steps 3-4 drew exactly the rows the uninterrupted run drew


def test_callbacks_stop_the_run(tiny, tmp_path):
    calls = []

    class StopAtOne:
        def on_step_end(self, state, metrics):
            calls.append((state.global_step, "reward" in metrics))
            state.should_stop = state.global_step >= 1

    ds = [{"prompt": "What is 1 + 1?", "answer": "2"}] * 4
    result = GRPOTrainer(model=str(tiny), reward_funcs="accuracy", args=args(tmp_path, max_steps=5), train_dataset=ds,
                         callbacks=[StopAtOne()]).train()
    assert result.steps == 1 and calls == [(1, True)]
    assert (tmp_path / "checkpoints" / "checkpoint-1").is_dir()


def test_chat_template_kwargs_reach_the_template(tiny, tmp_path):
    from grpo_fast.config import DataConfig
    from grpo_fast.data import render_prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    tok.chat_template = CHAT + "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
    row = {"prompt": [{"role": "user", "content": "hi"}]}
    assert render_prompt(tok, row, DataConfig()).endswith("<assistant>")
    assert render_prompt(tok, row, DataConfig(chat_template_kwargs={"enable_thinking": False})).endswith("/no_think")


def test_grpo_config_maps_trl_fields_and_names_what_it_refuses():
    a = GRPOConfig(output_dir="x", learning_rate=2e-5, num_generations=4, per_device_train_batch_size=8,
                   gradient_accumulation_steps=2, beta=0.04, scale_rewards=False, bf16=True, lr_scheduler_type="linear",
                   report_to=["wandb"], num_generations_eval=4, use_vllm=False, max_steps=-1, num_train_epochs=2,
                   lora={"r": 8}, **{"data.task": "countdown"})
    assert (a.train.prompts_per_step, a.train.micro_batch_size) == (4, 8)  # 8 x 2 completions / G = 4 prompts
    assert a.learning_rate == a.train.learning_rate == 2e-5 and a.num_generations == 4
    assert a.loss.scale_rewards == "none" and a.model.dtype == "bfloat16" and a.train.lr_scheduler_type == "linear"
    assert a.train.report_to == ["wandb"] and a.eval.num_generations == 4 and a.lora.r == 8
    assert a.data.task == "countdown" and a.train.num_train_epochs == 2
    for bad, match in [(dict(use_vllm=True), "use_vllm: TRL's use_vllm=True is not supported"),
                       (dict(deepspeed="ds.json"), "deepspeed: .*torchrun .*train.fsdp"),
                       (dict(frobnicate=1), "frobnicate: unknown field"),
                       (dict(per_device_train_batch_size=6, num_generations=4), "not a multiple of num_generations"),
                       (dict(generation_batch_size=64), "generation_batch_size")]:
        with pytest.raises(ConfigError, match=match):
            GRPOConfig(**bad)


def test_epochs_set_the_run_length(tiny, tmp_path):
    ds = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    trainer = GRPOTrainer(model=str(tiny), reward_funcs="accuracy",
                          args=args(tmp_path, max_steps=-1, num_train_epochs=1.5, **{"data.eval_size": 0}),
                          train_dataset=ds)
    assert trainer.max_steps == math.ceil(1.5 * 6 / 2)


def test_pass_at_k_against_a_hand_count():
    from grpo_fast.rewards import RewardSet
    from grpo_fast.sampler import Completion, GroupOutput
    from grpo_fast.train.evaluate import evaluate, pass_at_k

    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # C(2,2)/C(4,2) of the pairs miss both

    class Fake:
        """Prompt p answers correctly in the first p of its 4 completions."""

        def generate(self, ids, n, **_):
            return [GroupOutput(x, [Completion([1 if j < x[0] else 0], [0.0], "eos") for j in range(n)]) for x in ids]

    class Tok:
        def decode(self, ids, **_):
            return "yes" if ids[0] else "no"

    class E:
        def __init__(self, k):
            self.ids, self.row = [k], {"prompt": f"p{k}"}

    rs = RewardSet(["right"], [lambda completions, **_: [float(c == "yes") for c in completions]], [1.0])
    m = evaluate(Fake(), Tok(), [E(0), E(1), E(2), E(4)], rs, max_tokens=1, num_generations=4).metrics
    # hand count: c = 0, 1, 2, 4 of n = 4 -> mean@4 = (0 + .25 + .5 + 1) / 4; pass@1 the same
    assert m["eval/right/mean"] == pytest.approx(0.4375) and m["eval/right/pass@1"] == pytest.approx(0.4375)
    # pass@2 = (0 + 0.5 + 5/6 + 1) / 4; pass@4 = (0 + 1 + 1 + 1) / 4
    assert m["eval/right/pass@2"] == pytest.approx((0.5 + 5 / 6 + 1) / 4)
    assert m["eval/right/pass@4"] == pytest.approx(0.75)


def test_push_to_hub_at_the_end(tiny, tmp_path, monkeypatch):
    from grpo_fast.train import hub

    pushed = []
    monkeypatch.setattr(hub, "push_to_hub", lambda folder, repo, **k: pushed.append((folder, repo)) or f"hub/{repo}")
    ds = [{"prompt": "What is 1 + 1?", "answer": "2"}] * 4
    GRPOTrainer(model=str(tiny), reward_funcs="accuracy", train_dataset=ds,
                args=args(tmp_path, max_steps=1, push_to_hub=True, hub_model_id="me/tiny-grpo")).train()
    assert pushed == [(tmp_path / "adapter", "me/tiny-grpo")]
    assert (tmp_path / "adapter" / "README.md").is_file()


def test_loaded_model_with_peft_config(tiny, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny)
    ds = [{"prompt": "What is 1 + 1?", "answer": "2"}] * 4
    trainer = GRPOTrainer(model=model, reward_funcs="accuracy", processing_class=AutoTokenizer.from_pretrained(tiny),
                          peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                          args=args(tmp_path, max_steps=1), train_dataset=ds)
    trainer.train()
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 2 and sorted(adapter_cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_auto_dtype_on_a_cpu_with_native_bf16_says_how_to_run_in_bf16(tiny, tmp_path, monkeypatch):
    """model.dtype auto stays fp32 on the CPU; where the CPU computes bf16 natively, the run says
    that bfloat16 is faster there; never for an explicit dtype, NF4, CUDA or a model passed in."""
    from grpo_fast.config import ModelConfig
    from grpo_fast.train import model as model_mod
    from transformers import AutoModelForCausalLM

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(model_mod, "native_bf16_cpu", lambda native=native: native)
        hint = model_mod.dtype_hint(ModelConfig(), cpu)
        assert (hint is not None) == native
        for other in (model_mod.dtype_hint(ModelConfig(dtype="float32"), cpu),
                      model_mod.dtype_hint(ModelConfig(dtype="bfloat16"), cpu),
                      model_mod.dtype_hint(ModelConfig(load_in_4bit=True), cpu), model_mod.dtype_hint(ModelConfig(), cuda)):
            assert other is None
    monkeypatch.setattr(model_mod, "native_bf16_cpu", lambda: True)
    assert "--model.dtype bfloat16" in model_mod.dtype_hint(ModelConfig(), cpu)
    ds = [{"prompt": "What is 1 + 1?", "answer": "2"}] * 4
    for passed_in in (False, True):
        lines = []
        model = AutoModelForCausalLM.from_pretrained(tiny) if passed_in else str(tiny)
        GRPOTrainer(model=model, reward_funcs="accuracy", args=args(tmp_path / str(passed_in), max_steps=1),
                    train_dataset=ds, echo=lines.append)
        assert any("--model.dtype bfloat16" in x for x in lines) != passed_in, lines
    # the real probe answers for this machine (a bool, whichever it is)
    monkeypatch.undo()
    assert isinstance(model_mod.native_bf16_cpu(), bool)
