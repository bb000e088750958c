"""The loss options inside the trainer (issue 18) on the tiny random Llama of test_train_loop:
sampler-vs-trainer log-prob agreement and its correction, old log-probs from the sampler, the
step-global entropy threshold, adaptive entropy control, GDPO, the logits' transform of models
that post-process them, and the defects found in review (each test failed before its fix)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from grpo_fast.config import load_config
from grpo_fast.errors import ConfigError, ModelError
from grpo_fast.train.loop import train
from test_train_loop import make_tiny_model, tiny_config, tiny_rewards  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_loss"))


def policy_with_lora(tiny, seed=0):
    from grpo_fast.config import LoraConfig, ModelConfig
    from grpo_fast.train.model import load_policy

    model, tok, _ = load_policy(ModelConfig(name_or_path=str(tiny)), LoraConfig(r=4, lora_alpha=8), seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, tok


def sampled_batch(model, tok, backend, temperature=0.9):
    """Sample 2 prompts x 3 with the given generation backend; the batch and the sampler's log-probs."""
    from grpo_fast.train.generation import Generator
    from grpo_fast.train.rollout import sampling_logprobs
    from grpo_fast.train.rollout_batch import make_batch

    gen = Generator(model, tok, backend=backend)
    if backend == "sampler" and gen.backend != "sampler":
        pytest.skip("the paged sampler refused the tiny model")
    prompts = [[10, 11, 12, 13], [14, 15]]
    groups = gen.generate(prompts, n=3, temperature=temperature, max_tokens=6, seed=3)
    comps = [c for g in groups for c in g.completions]
    batch = make_batch([p for p in prompts for _ in range(3)], [c.token_ids for c in comps], tok.pad_token_id)
    return batch, sampling_logprobs([c.logprobs for c in comps], batch.targets.shape[1])


@pytest.mark.parametrize("backend", ["sampler", "hf"])
def test_sampler_and_trainer_log_probs_agree_in_fp32(tiny, backend):
    """The sampler runs the training modules themselves: in fp32 on the CPU its log-probs are the
    trainer's to rounding, and the loss op's sampling/* metrics say so."""
    from grpo_fast.train.model import policy_modules
    from grpo_fast.train.policy_loss import policy_loss, score_logprobs

    model, tok = policy_with_lora(tiny)
    batch, sampled = sampled_batch(model, tok, backend)
    policy = policy_modules(model)
    ours = score_logprobs(policy, batch, temperature=0.9)
    assert (ours - sampled).abs().max().item() < 1e-4
    lc = load_config(None, {}).loss
    _, metrics = policy_loss(policy, batch, torch.randn(len(batch)), None, None, loss_cfg=lc, temperature=0.9,
                             max_completion_length=6, num_items_in_batch=float(batch.mask.sum()),
                             num_sequences_in_batch=len(batch), sampling_logprobs=sampled)
    assert metrics["sampling/sampling_logp_difference/max"].item() < 1e-4
    assert metrics["sampling/importance_sampling_ratio/min"].item() == pytest.approx(1.0, abs=1e-4)
    assert metrics["sampling/importance_sampling_ratio/max"].item() == pytest.approx(1.0, abs=1e-4)


def test_hf_generate_ignores_the_checkpoints_generation_config(tiny):
    """A checkpoint's generation_config (here: every token but two suppressed, top_k 1, a
    repetition penalty) must not change what the fallback samples from: the trainer scores
    softmax(logits / T)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_fast.train.generation import hf_generate

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    vocab = model.config.vocab_size
    model.generation_config.suppress_tokens = [t for t in range(vocab) if t not in (1, 40)]
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 5.0
    out = hf_generate(model, tok, [[10, 11, 12]], n=8, temperature=1.0, max_tokens=6, seed=0)
    tokens = {t for c in out[0].completions for t in c.token_ids}
    assert len(tokens - {1, 40}) > 3  # sampled from the whole vocabulary
    assert model.generation_config.top_k == 1  # the model's own config is left as it was
    for c in out[0].completions:  # and the logged log-probs are the unfiltered distribution's
        with torch.no_grad():
            logits = model(torch.tensor([[10, 11, 12] + c.token_ids])).logits[0, 2:-1]
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)


def test_reference_policy_of_a_model_without_adapters_is_an_error(tiny):
    from transformers import AutoModelForCausalLM

    from grpo_fast.train.model import reference_policy

    with pytest.raises(ConfigError, match="no adapters"):
        with reference_policy(AutoModelForCausalLM.from_pretrained(tiny)):
            pass


# ---------------------------------------------------------------- logits post-processed by the model


def tiny_model(kind: str, **extra):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=1.5, query_pre_attn_scalar=8,
                                        **extra)
        return transformers.Gemma2ForCausalLM(cfg).eval()
    if kind == "cohere":
        return transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.25, **extra)).eval()
    if kind == "granite":
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=6.0, **extra)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **extra)).eval()


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_models_that_post_process_their_logits_train_on_the_right_log_probs(kind):
    """Gemma 2's tanh soft cap, Cohere's logit_scale, Granite's logits_scaling: the fused head
    applies them (scoring and loss), matching the model's own logits."""
    from grpo_fast.train.model import policy_modules
    from grpo_fast.train.policy_loss import logit_transform, score_logprobs
    from grpo_fast.train.rollout_batch import make_batch

    model = tiny_model(kind)
    policy = policy_modules(model)
    head = logit_transform(policy, 0.7)
    assert (head.softcap is not None) == (kind == "gemma2") and (head.scale != 1.0) == (kind != "gemma2")
    batch = make_batch([[3, 4, 5], [6, 7]], [[8, 9, 10, 11], [12]], 0)
    got = score_logprobs(policy, batch, temperature=0.7)
    for i, (p, c) in enumerate(([[3, 4, 5], [8, 9, 10, 11]], [[6, 7], [12]])):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / 0.7
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(got[i, :len(c)], want, atol=1e-5, rtol=1e-5)


def test_a_transform_we_do_not_reproduce_is_refused():
    """A config claims a logit scale the model's forward does not apply (or the other way round):
    the check against the forward refuses to train, naming the model."""
    from grpo_fast.train.model import policy_modules
    from grpo_fast.train.policy_loss import logit_transform

    model = tiny_model("llama")
    model.config.logit_scale = 0.25  # Llama ignores it: its logits are not scaled
    with pytest.raises(ModelError, match="LlamaForCausalLM.*wrong log-probs"):
        logit_transform(policy_modules(model), 1.0)


# ---------------------------------------------------------------- rollout: dynamic sampling and metrics


def stub_rollout_inputs(rewards_by_prompt):
    """A generator, stream and tokenizer whose completions get the rewards of `rewards_by_prompt`
    (prompt index -> G rewards, None = abstain)."""
    from grpo_fast.sampler import Completion, GroupOutput

    class Stream:
        taken = 0

        def take(self, n):
            out = [SimpleNamespace(ids=[5, 6 + self.taken + i], row={"prompt": f"p{self.taken + i}"}) for i in range(n)]
            self.taken += n
            return out

    class Gen:
        last_stats = {}

        def generate(self, prompt_ids, n, **kw):
            return [GroupOutput(p, [Completion([7, 8], [-1.0, -2.0], "eos") for _ in range(n)]) for p in prompt_ids]

    def reward(prompts, completions, **kw):
        out, seen = [], {}
        for p in prompts:
            k = seen.get(p, 0)
            seen[p] = k + 1
            out.append(rewards_by_prompt[int(p[1:])][k])
        return out

    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1, decode=lambda ids, **kw: "x" * len(ids))
    return Stream(), Gen(), reward, tok


def test_dynamic_sampling_drops_groups_whose_only_spread_is_an_abstention():
    """[1, 1, abstain, 1] has all advantages 0: it must be dropped (the totals with the abstention
    counted as 0 looked spread), and the logged reward / reward_std leave abstentions out."""
    from grpo_fast.rewards import build_rewards
    from grpo_fast.train.rollout import collect_rollout, rollout_metrics

    stream, gen, reward, tok = stub_rollout_inputs({0: [1.0, 1.0, None, 1.0], 1: [1.0, 0.0, None, 0.0],
                                                    2: [1.0, 1.0, 0.0, 0.0]})
    cfg = load_config(None, {"train.prompts_per_step": 2, "sampling.num_generations": 4, "train.dynamic_sampling": True,
                             "sampling.max_completion_length": 4})
    rewards = build_rewards(cfg.rewards, 4, funcs=[reward])
    r = collect_rollout(torch.nn.Linear(1, 1), tok, gen, stream, rewards, cfg, step=0)
    assert r.prompts[::4] == ["p1", "p2"]  # p0 dropped, p2 drawn in its place
    assert r.stats["zero_std_groups"] == 1 and r.stats["dynamic_rounds"] == 1
    m = rollout_metrics(r, ["reward"], 4)
    scored = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # the abstention is not a 0
    assert m["reward"] == pytest.approx(scored.mean().item())
    assert m["reward_std"] == pytest.approx(scored.std().item())
    assert m["frac_reward_zero_std"] == 0.0
    assert r.sampling_logprobs.tolist() == [[-1.0, -2.0]] * 8


# ---------------------------------------------------------------- update_policy: the step's loss machinery


def rollout_for(model, tok, seed=0):
    from grpo_fast.train.rollout_batch import Rollout, make_batch

    g = torch.Generator().manual_seed(seed)
    prompts = [[int(t) for t in torch.randint(2, 60, (n,), generator=g)] for n in (3, 3, 5, 5)]
    comps = [[int(t) for t in torch.randint(2, 60, (n,), generator=g)] for n in (4, 2, 6, 3)]
    batch = make_batch(prompts, comps, tok.pad_token_id)
    adv = torch.randn(4, generator=g)
    return Rollout(batch, adv, torch.zeros(4, 1), torch.zeros(4), ["p"] * 4, ["c"] * 4, ["eos"] * 4, {})


class CaptureGrads(torch.optim.SGD):
    """An optimizer that records the gradients it is given and does not move the weights."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])


def run_update(model, tok, overrides, rollout=None, state=None, echo=None):
    from grpo_fast.train.model import build_scheduler, policy_modules, trainable_parameters
    from grpo_fast.train.update import update_policy

    cfg = load_config(None, {"sampling.max_completion_length": 8, **overrides})
    params = trainable_parameters(model)
    opt = CaptureGrads(params)
    sched = build_scheduler(opt, cfg.train, 10)
    state = {} if state is None else state
    lines = []
    metrics = update_policy(policy_modules(model), opt, sched, params, rollout or rollout_for(model, tok), cfg, state,
                            echo=echo or lines.append)
    return metrics, opt.seen, state, lines


@pytest.mark.parametrize("options", [
    {"loss.top_entropy_quantile": 0.3},
    {"loss.top_entropy_quantile": 0.5, "loss.entropy_coef": 0.2, "loss.beta": 0.05},
    {"loss.entropy_coef": 0.2, "loss.loss_type": "grpo", "loss.importance_sampling_level": "sequence"},
])
def test_the_step_gradient_does_not_depend_on_the_micro_batches(tiny, options):
    """The entropy threshold is the step's quantile and the bonus's normalizer the step's count, so
    micro-batches of 1 and 3 rows give the whole step's gradient (TRL's per-micro-batch quantile
    would not)."""
    model, tok = policy_with_lora(tiny)
    whole, whole_grads, _, _ = run_update(model, tok, {**options, "train.micro_batch_size": 0})
    for size in (1, 3):
        part, grads, _, _ = run_update(model, tok, {**options, "train.micro_batch_size": size})
        assert part["loss"] == pytest.approx(whole["loss"], rel=1e-5, abs=1e-7)
        for a, b in zip(grads[0], whole_grads[0]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    if "loss.top_entropy_quantile" in options:
        assert whole["time/old_logprobs_s"] > 0  # the step's entropies came from a scoring pass
        assert 0 < whole["num_high_entropy_tokens"] < float(rollout_for(model, tok).batch.mask.sum())


def test_adaptive_entropy_control_across_steps(tiny):
    """Skywork-OR1's controller: the first step applies no bonus (no measurement yet), each step
    moves the coefficient by delta towards the target, and the state lives in loss_state."""
    model, tok = policy_with_lora(tiny)
    opts = {"loss.use_adaptive_entropy": True, "loss.entropy_coef": 0.1, "loss.entropy_target": 100.0,
            "loss.entropy_coef_delta": 0.01}
    m1, _, state, _ = run_update(model, tok, opts)
    assert "policy_loss" not in m1  # coefficient applied in step 1: 0
    assert m1["entropy_coef"] == pytest.approx(0.11) and state["entropy_control"]["coef"] == pytest.approx(0.11)
    m2, _, state, _ = run_update(model, tok, opts, state=state)
    assert m2["loss"] == pytest.approx(m2["policy_loss"] - 0.11 * m2["entropy"], rel=1e-5)
    assert state["entropy_control"]["coef"] == pytest.approx(0.12)
    json.dumps(state)  # a checkpoint can hold it


def test_old_log_probs_from_the_sampler(tiny):
    """num_iterations = 2 with old_logprobs=sampler: no scoring pass; iteration 1 is on-policy and
    measures the agreement, iteration 2 uses the sampler's log-probs. When the measured
    difference exceeds the tolerance, later steps rescore (said once)."""
    from grpo_fast.train.model import policy_modules
    from grpo_fast.train.policy_loss import score_logprobs

    model, tok = policy_with_lora(tiny)
    rollout = rollout_for(model, tok)
    exact = score_logprobs(policy_modules(model), rollout.batch, temperature=1.0)
    opts = {"loss.num_iterations": 2, "loss.old_logprobs": "sampler"}
    rollout.sampling_logprobs = exact
    m, grads, state, lines = run_update(model, tok, opts, rollout=rollout)
    assert m["old_logprobs_from_sampler"] == 1.0 and m["time/old_logprobs_s"] < 1e-3 and not lines
    rescored, rgrads, _, _ = run_update(model, tok, {**opts, "loss.old_logprobs": "rescore"}, rollout=rollout)
    for a, b in zip(grads[1], rgrads[1]):  # the second update: same old log-probs, same gradient
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert "old_logprobs" not in state
    rollout.sampling_logprobs = exact + 0.1 * rollout.batch.mask  # the sampler disagrees by 0.1 nat
    _, _, state, lines = run_update(model, tok, opts, rollout=rollout)
    assert state["old_logprobs"] == "rescore" and "from the next step on" in lines[0]


# ---------------------------------------------------------------- end to end and the config


@pytest.mark.filterwarnings("ignore:.*(luspo|vespo)")
@pytest.mark.parametrize("extra", [
    {"loss.loss_type": "luspo", "loss.importance_sampling_level": "sequence", "loss.beta": 0.05},
    {"loss.loss_type": "vespo", "loss.sampling_correction": "token_mask", "loss.sampling_correction_clip_min": 0.5},
    {"loss.loss_type": "dapo", "loss.top_entropy_quantile": 0.2, "loss.entropy_coef": 0.01,
     "train.micro_batch_size": 2, "loss.multi_objective_aggregation": "normalize_then_sum"},
    {"loss.loss_type": "grpo", "loss.off_policy_mask_threshold": 0.5, "loss.use_adaptive_entropy": True,
     "loss.num_iterations": 2, "loss.old_logprobs": "sampler", "sampling.backend": "auto",
     "loss.sampling_correction": "sequence_truncate"},
])
def test_train_with_the_new_options(tiny, tmp_path, extra):
    cfg = tiny_config(tiny, tmp_path, **{"rewards.funcs": ["accuracy", "tiny_rewards:first_token_even"],
                                         "train.eval_before": False, **extra})
    train(cfg, echo=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["grad_norm"] == r["grad_norm"] and r["nonfinite_updates"] == 0
        assert r["sampling/sampling_logp_difference/max"] < 1e-3  # same modules, fp32
        assert math.isfinite(r["loss"])
    if cfg.loss.use_adaptive_entropy:
        assert "entropy_coef" in rows[-1]
        saved = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
        assert saved["loss_state"]["entropy_control"]["coef"] == pytest.approx(rows[-1]["entropy_coef"])


def test_trl_field_names_reach_the_loss_section():
    from grpo_fast import GRPOConfig
    from grpo_fast.trl_fields import TRL_DEFAULTS

    cfg = GRPOConfig(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5, beta=0.04, use_bias_correction_kl=True,
                     multi_objective_aggregation="normalize_then_sum", top_entropy_quantile=0.2, entropy_coef=0.01,
                     use_adaptive_entropy=True, entropy_target=0.5, off_policy_mask_threshold=0.5,
                     sapo_temperature_neg=1.2, vllm_importance_sampling_mode="token_mask",
                     vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0)
    lc = cfg.loss
    assert (lc.loss_type, lc.vespo_k_pos, lc.vespo_lambda_neg, lc.use_bias_correction_kl) == ("vespo", 1.5, 2.5, True)
    assert (lc.multi_objective_aggregation, lc.top_entropy_quantile, lc.entropy_coef) == ("normalize_then_sum", 0.2, 0.01)
    assert (lc.use_adaptive_entropy, lc.entropy_target, lc.off_policy_mask_threshold) == (True, 0.5, 0.5)
    assert (lc.sampling_correction, lc.sampling_correction_clip_min, lc.sampling_correction_clip_max) == \
        ("token_mask", 0.5, 2.0)
    assert cfg.use_bias_correction_kl is True and cfg.vespo_k_pos == 1.5  # flat reads, as in TRL
    assert GRPOConfig(vllm_importance_sampling_correction=False).loss.sampling_correction == "none"
    assert GRPOConfig(vllm_importance_sampling_correction=True).loss.sampling_correction == "sequence_mask"
    moved = {"use_bias_correction_kl", "top_entropy_quantile", "entropy_coef", "multi_objective_aggregation",
             "off_policy_mask_threshold", "vespo_k_pos", "sapo_temperature_pos", "vllm_importance_sampling_mode"}
    assert not moved & set(TRL_DEFAULTS)
    with pytest.raises(ConfigError, match="loss.sampling_correction"):
        GRPOConfig(loss_type="vespo", vllm_importance_sampling_mode="sequence_mask")
    with pytest.raises(ConfigError, match="loss.top_entropy_quantile"):
        GRPOConfig(top_entropy_quantile=2.0)


def test_cli_overrides_of_the_new_options():
    cfg = load_config(None, ["--loss_type", "luspo", "--top_entropy_quantile", "0.2", "--entropy_coef", "0.01",
                             "--sampling_correction", "token_truncate", "--old_logprobs", "sampler",
                             "--off_policy_mask_threshold", "0.5", "--use_bias_correction_kl", "false"])
    lc = cfg.loss
    assert (lc.loss_type, lc.top_entropy_quantile, lc.entropy_coef, lc.sampling_correction, lc.old_logprobs) == \
        ("luspo", 0.2, 0.01, "token_truncate", "sampler")
    assert lc.off_policy_mask_threshold == 0.5 and lc.use_bias_correction_kl is False
    assert any("luspo" in w for w in lc.warnings())
