"""Full fine-tuning (lora.enabled: false): every weight trains, the reference policy for β > 0 is
a frozen copy of the starting weights, the checkpoint holds the whole model and resumes exactly.
(The 2-rank gradient of a full fine-tuning step: tests/test_distributed.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from grpo_fast import GRPOTrainer
from grpo_fast.errors import ConfigError
from test_train_loop import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_full"))


def first_token_even(completion_ids, **_):
    return [float(ids[0] % 2 == 0) + 0.1 * len(ids) for ids in completion_ids]


ROWS = [{"prompt": f"What is {i} + {i % 3}?", "answer": str(i + i % 3)} for i in range(12)]


def args(out, **extra):
    from grpo_fast import GRPOConfig

    fields = {"output_dir": str(out), "max_steps": 3, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
              "seed": 2, "report_to": "none", "disable_tqdm": True, "beta": 0.1, "train.prompts_per_step": 2,
              "sampling.num_generations": 3, "sampling.max_completion_length": 5, "sampling.backend": "hf",
              "lora.enabled": False, "eval_before": False, "data.eval_size": 0}
    return GRPOConfig(**{**fields, **extra})


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_full_finetuning_trains_every_weight_and_resumes_exactly(tiny, tmp_path):
    GRPOTrainer(model=str(tiny), reward_funcs=[first_token_even], args=args(tmp_path / "a"), train_dataset=ROWS).train()
    GRPOTrainer(model=str(tiny), reward_funcs=[first_token_even], args=args(tmp_path / "b", max_steps=2),
                train_dataset=ROWS).train()
    GRPOTrainer(model=str(tiny), reward_funcs=[first_token_even], args=args(tmp_path / "b"),
                train_dataset=ROWS).train(resume_from_checkpoint=True)
    start, a, b = _weights(tiny), _weights(tmp_path / "a" / "adapter"), _weights(tmp_path / "b" / "adapter")
    assert set(a) == set(b) == set(start)  # the whole model, not an adapter
    moved = [k for k in start if not torch.equal(a[k], start[k])]
    assert len(moved) == len(start), set(start) - set(moved)  # every weight trained (embeddings, norms, head)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # resumed bit-exactly
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # step 1: the policy is the reference
    assert rows[-1]["kl"] > 0  # later: measured against the frozen starting weights


def test_reference_policy_is_the_frozen_starting_weights(tiny):
    from transformers import AutoModelForCausalLM

    from grpo_fast.train.model import full_finetuning, reference_policy

    model = full_finetuning(AutoModelForCausalLM.from_pretrained(tiny), keep_reference=True)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with reference_policy(model):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    assert all(torch.equal(p, s + 1.0) for p, s in zip(model.parameters(), start))
    assert all(p.requires_grad for p in model.parameters())


def test_reference_log_probs_are_the_starting_models_head_included(tiny):
    """The reference log-probs of a full fine-tuning run come from the starting weights, LM head
    included (they once took the reference's hidden states through the trained head)."""
    from transformers import AutoModelForCausalLM

    from grpo_fast.train.model import full_finetuning, policy_modules
    from grpo_fast.train.policy_loss import score_logprobs
    from grpo_fast.train.rollout_batch import make_batch

    start = AutoModelForCausalLM.from_pretrained(tiny)
    model = full_finetuning(AutoModelForCausalLM.from_pretrained(tiny), keep_reference=True)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.5)  # the head (tied: the embedding too) moved
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 11, 12, 13]])  # [2, P + C], P = 3
    batch = make_batch([r[:3] for r in ids.tolist()], [r[3:] for r in ids.tolist()], pad_id=0)
    with torch.no_grad():
        logits = start(input_ids=ids).logits[:, 2:5].float()  # positions that predict tokens 3..5
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 3:, None]).squeeze(-1)  # [2, 3]
    got = score_logprobs(policy_modules(model), batch, temperature=1.0, reference=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score_logprobs(policy_modules(model), batch, temperature=1.0), want, atol=1e-3)


def test_full_finetuning_refuses_a_4bit_base_and_merge(tiny, tmp_path):
    with pytest.raises(ConfigError, match="lora.enabled: false .* model.load_in_4bit"):
        GRPOTrainer(model=str(tiny), reward_funcs=[first_token_even], train_dataset=ROWS,
                    args=args(tmp_path / "q", **{"model.load_in_4bit": True}))
    with pytest.raises(ConfigError, match="train.merge"):
        GRPOTrainer(model=str(tiny), reward_funcs=[first_token_even], train_dataset=ROWS,
                    args=args(tmp_path / "m", **{"train.merge": True}))


def test_fsdp_refuses_adapters_and_maps_trls_option(tiny, tmp_path):
    from grpo_fast import GRPOConfig

    with pytest.raises(ConfigError, match="train.fsdp: true shards full fine-tuning"):
        GRPOTrainer(model=str(tiny), reward_funcs=[first_token_even], train_dataset=ROWS,
                    args=args(tmp_path / "f", **{"lora.enabled": True, "train.fsdp": True}))
    assert GRPOConfig(output_dir=str(tmp_path), fsdp="full_shard auto_wrap").train.fsdp is True
    assert GRPOConfig(output_dir=str(tmp_path), fsdp="").train.fsdp is False
    with pytest.raises(ConfigError, match="fsdp: cannot use 'hybrid_shard' .*FSDP2's full_shard"):
        GRPOConfig(output_dir=str(tmp_path), fsdp="hybrid_shard")


def test_fsdp_in_one_process_trains_unsharded_and_says_so(tiny, tmp_path):
    said = []
    trainer = GRPOTrainer(model=str(tiny), reward_funcs=[first_token_even], train_dataset=ROWS, echo=said.append,
                          args=args(tmp_path / "one", max_steps=1, **{"train.fsdp": True}))
    assert trainer.sharded is False
    assert any("one process, nothing to shard" in line for line in said)
    trainer.train()
    assert (tmp_path / "one" / "adapter" / "model.safetensors").is_file()
