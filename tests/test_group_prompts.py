"""A group's prompt run once for the micro-batches that split the group (grpo_fast.train.group_prompts):
the same hidden states, gradients, scored log-probs and step gradient as the whole group in one
pass, with each prompt run exactly once."""

import pytest
import torch

from grpo_fast.train import group_prompts as gp
from grpo_fast.train.packed_forward import completion_hidden
from grpo_fast.train.rollout_batch import Rollout, make_batch
from test_loss_training import policy_with_lora, run_update
from test_train_loop import make_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:.*(luspo|vespo|weighs each sequence|epsilon_high)")

RUNS = [3, 5, 2]  # three groups of uneven sizes
SPLIT = [slice(0, 2), slice(2, 4), slice(4, 7), slice(7, 10)]  # each cut ends mid-group but the last


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_group_prompts"))


def grouped_batch(tok, prompt_lens=(9, 4, 12), seed=0):
    """RUNS[i] rows of prompt i (left-padded to the longest), completions of uneven lengths (one empty)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[int(t) for t in torch.randint(2, 60, (n,), generator=g)] for n in prompt_lens]
    rows = [p for p, n in zip(prompts, RUNS) for _ in range(n)]
    comps = [[int(t) for t in torch.randint(2, 60, (n,), generator=g)] for n in (5, 1, 7, 3, 6, 0, 4, 7, 2, 5)]
    return make_batch(rows, comps, tok.pad_token_id)


@pytest.fixture
def prompt_calls(monkeypatch):
    """The number of prompts each run_prompts call ran."""
    calls = []
    real = gp.run_prompts

    def counting(decoder, batch, rows):
        calls.append(len(rows))
        return real(decoder, batch, rows)

    monkeypatch.setattr(gp, "run_prompts", counting)
    return calls


def test_split_groups_give_the_whole_pass_hidden_and_gradients(tiny, prompt_calls):
    """Micro-batches that split every group (and one that holds two groups' rows): the hidden
    states and the LoRA gradients summed over them equal one pass over the whole batch (each
    row in full, no sharing), while each group's prompt runs once."""
    from grpo_fast.train.model import policy_modules, trainable_parameters

    model, tok = policy_with_lora(tiny)
    model.train()
    decoder = policy_modules(model).decoder
    batch = grouped_batch(tok)
    params = trainable_parameters(model)
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(batch.targets.shape + (32,), generator=g)  # [N, C, H]
    mask = batch.mask.unsqueeze(-1)

    hidden = completion_hidden(decoder, batch, share_prompts=False)
    (hidden * weights * mask).sum().backward()
    whole_h, whole_g = hidden.detach() * mask, [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    prompts = gp.GroupPrompts.for_pass(decoder, batch, SPLIT)
    assert prompts is not None
    parts = []
    for rows in SPLIT:
        part = batch.select(rows)
        h = completion_hidden(decoder, part, prefix=prompts.prefix(rows))
        (h * weights[rows] * mask[rows]).sum().backward()
        prompts.finish(rows)
        parts.append(h.detach() * mask[rows])
    assert prompt_calls == [1, 1, 1]  # each group's prompt once, when first seen
    torch.testing.assert_close(torch.cat(parts), whole_h, atol=1e-5, rtol=1e-5)
    for p, want in zip(params, whole_g):
        torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-4)


def test_a_group_left_unfinished_is_never_backpropagated(tiny):
    """The prompt's backward waits for the group's last micro-batch: after the first two cuts
    only group 0 (rows 0-2) is done, so the gradient holds group 0's rows in full and row 3's
    completion alone (its prompt's share comes after group 1's last row)."""
    from grpo_fast.train.model import policy_modules, trainable_parameters

    model, tok = policy_with_lora(tiny)
    decoder = policy_modules(model).decoder
    batch = grouped_batch(tok)
    mask = batch.mask.unsqueeze(-1)
    params = trainable_parameters(model)
    prompts = gp.GroupPrompts.for_pass(decoder, batch, SPLIT)
    for rows in SPLIT[:2]:
        (completion_hidden(decoder, batch.select(rows), prefix=prompts.prefix(rows)) * mask[rows]).sum().backward()
        prompts.finish(rows)
    partial = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    (completion_hidden(decoder, batch.select(slice(0, 3)), share_prompts=False) * mask[0:3]).sum().backward()
    detached = gp.run_prompts(decoder, batch, torch.tensor([3])).map(lambda t: t.detach())
    (completion_hidden(decoder, batch.select(slice(3, 4)), prefix=detached) * mask[3:4]).sum().backward()
    for got, p in zip(partial, params):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4)


def test_scoring_split_groups_gives_the_whole_pass_log_probs(tiny, prompt_calls):
    from grpo_fast.train.model import policy_modules
    from grpo_fast.train.policy_loss import score_logprobs

    model, tok = policy_with_lora(tiny)
    batch = grouped_batch(tok)
    policy = policy_modules(model)
    whole = score_logprobs(policy, batch, temperature=0.9, cuts=[slice(0, len(batch))])
    assert prompt_calls == []  # whole groups: completion_hidden's own layouts
    split = score_logprobs(policy, batch, temperature=0.9, cuts=SPLIT, return_entropy=True)
    assert sum(prompt_calls) == len(RUNS)
    torch.testing.assert_close(split[0], whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_the_step_gradient_with_split_groups_equals_whole_groups(tiny, prompt_calls, size):
    """update_policy with micro-batches smaller than a group (β > 0: the reference scoring pass
    splits them too) gives the gradient and loss of micro-batches that hold whole groups."""
    model, tok = policy_with_lora(tiny)
    batch = grouped_batch(tok)
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(2))
    rollout = Rollout(batch, adv, torch.zeros(len(batch), 1), torch.zeros(len(batch)), ["p"] * len(batch),
                      ["c"] * len(batch), ["eos"] * len(batch), {})
    options = {"loss.beta": 0.05, "loss.loss_type": "dapo"}
    whole, whole_grads, _, _ = run_update(model, tok, {**options, "train.micro_batch_size": 0}, rollout=rollout)
    assert prompt_calls == []
    part, grads, _, _ = run_update(model, tok, {**options, "train.micro_batch_size": size}, rollout=rollout)
    assert sum(prompt_calls) == 2 * len(RUNS)  # reference scoring pass + the update, each prompt once
    assert part["loss"] == pytest.approx(whole["loss"], rel=1e-5, abs=1e-7)
    assert part["kl"] == pytest.approx(whole["kl"], rel=1e-4, abs=1e-7)
    for a, b in zip(grads[0], whole_grads[0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_only_split_groups_with_prompts_worth_sharing_run_once(tiny):
    """None (each micro-batch runs whole) when the cuts keep groups whole, when the prompts are
    too short against the completions to pay for the cached layout, under gradient
    checkpointing (HF drops caches) and on FSDP's collective decoder."""
    from grpo_fast.config import LoraConfig, ModelConfig
    from grpo_fast.train.model import load_policy, policy_modules

    model, tok = policy_with_lora(tiny)
    decoder = policy_modules(model).decoder
    batch = grouped_batch(tok)
    assert gp.GroupPrompts.for_pass(decoder, batch, [slice(0, 3), slice(3, 8), slice(8, 10)]) is None
    assert gp.GroupPrompts.for_pass(decoder, batch, [slice(0, 8), None, slice(8, 10)]) is None
    short = make_batch([[5]] * 3 + [[6]] * 5 + [[7]] * 2, [[9] * 40] * 10, tok.pad_token_id)  # 1-token prompts
    assert not gp.saves_enough(short, RUNS, SPLIT) and gp.saves_enough(batch, RUNS, SPLIT)
    assert gp.GroupPrompts.for_pass(decoder, short, SPLIT) is None
    decoder.collective = True
    try:
        assert gp.GroupPrompts.for_pass(decoder, batch, SPLIT) is None
    finally:
        del decoder.collective
    checkpointed, _, _ = load_policy(ModelConfig(name_or_path=str(tiny), gradient_checkpointing=True),
                                     LoraConfig(r=4, lora_alpha=8), seed=0)
    checkpointed.train()
    assert gp.GroupPrompts.for_pass(policy_modules(checkpointed).decoder, batch, SPLIT) is None


FAMILIES = {  # model_type -> (config class, causal LM class, config fields beyond the shared ones)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),  # q/k norms
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 64}),  # hybrid cache layers
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_give_the_whole_pass_hidden_states(family):
    """The prompt's cache handed from one decoder call to the next holds for other architectures'
    caches too (q/k norms, sliding-window layers within their window, Gemma's hybrid layers)."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, **extra)
    decoder = getattr(transformers, model_cls)(config).eval().model

    class Tok:
        pad_token_id = 0

    batch = grouped_batch(Tok)
    mask = batch.mask.unsqueeze(-1)
    with torch.no_grad():
        whole = completion_hidden(decoder, batch, share_prompts=False) * mask
        prompts = gp.GroupPrompts.for_pass(decoder, batch, SPLIT)
        assert prompts is not None
        parts = []
        for rows in SPLIT:
            parts.append(completion_hidden(decoder, batch.select(rows), prefix=prompts.prefix(rows)) * mask[rows])
            prompts.finish(rows)
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=1e-5)
