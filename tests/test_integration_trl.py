"""grpo_fast.integrations.trl: TRL 1.16's GRPOTrainer with its loss computed by our fused op gives
TRL's own loss, gradients and logged metrics, on a tiny model, for every loss type and option.

Each case scores one micro-batch that TRL itself generated and scored, with TRL's `_compute_loss`
and with ours, from the same parameters; then a short `train()` of each trainer is compared."""
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from grpo_fast.integrations.trl import FusedGRPOTrainer, fused_compute_loss, use_fused_loss  # noqa: E402
from test_train_loop import make_tiny_model  # noqa: E402


def reward_len(completions, **kwargs):
    return [float(len(c[0]["content"]) % 3) for c in completions]


def make_trainer(path, out, klass=trl.GRPOTrainer, seed=0, **extra):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i} plus {i}"}]} for i in range(16)])
    fields = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                  max_completion_length=6, max_steps=1, learning_rate=1e-2, beta=0.04, use_cpu=True, bf16=False,
                  report_to=[], save_strategy="no", logging_steps=1, seed=seed, temperature=0.9,
                  gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0)
    fields.update(extra)
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    return klass(model=model, reward_funcs=[reward_len], args=trl.GRPOConfig(**fields), train_dataset=ds,
                 processing_class=tok, peft_config=peft_cfg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_trl"))


@pytest.fixture(scope="module")
def scored(tiny, tmp_path_factory):
    """A trainer (LoRA B nonzero, so policy != reference) and one micro-batch TRL generated and
    scored, with old / reference / sampler log-probs near the policy's (ratios near 1, some clipped)."""
    trainer = make_trainer(tiny, tmp_path_factory.mktemp("trl_out"))
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(batch)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, inputs["completion_ids"].size(1))
    g = torch.Generator().manual_seed(0)
    noise = lambda: 0.15 * torch.randn(logps.shape, generator=g)  # noqa: E731
    inputs["old_per_token_logps"] = logps + noise()
    inputs["ref_per_token_logps"] = logps + noise()
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] + noise()
    return trainer, inputs


def trl_importance_ratio(inputs, mode, clip_min, clip_max):
    """TRL's _generate_and_score_completions importance-sampling ratio (vLLM path), transcribed."""
    mask = inputs["completion_mask"]
    diff = torch.nan_to_num((inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]) * mask, nan=0.0)
    diff = diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def run_loss(trainer, inputs, compute):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    trainer._metrics["train"].clear()
    loss = compute(trainer, trainer.model, inputs)
    loss.backward()
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    return loss.detach(), [p.grad.clone() for p in params], metrics


CASES = [dict(loss_type=t) for t in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")] + [
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", delta=1.1, epsilon_high=0.28),
    dict(loss_type="dapo", use_bias_correction_kl=False),
    dict(loss_type="dapo", beta=0.0),
    dict(loss_type="dapo", top_entropy_quantile=0.5),
    dict(loss_type="grpo", entropy_coef=0.05),
    dict(loss_type="bnpo", entropy_coef=0.05, top_entropy_quantile=0.3),
    dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.1, entropy_target=100.0),
    dict(loss_type="dapo", off_policy_mask_threshold=0.01),
    dict(loss_type="dapo", vllm="token_truncate", clip=(None, 1.1)),
    dict(loss_type="sapo", vllm="sequence_mask", clip=(None, 1.5)),
    dict(loss_type="vespo", vllm="token_mask", clip=(0.9, 1.1)),
    dict(loss_type="dr_grpo", sapo_temperature_pos=2.0, vespo_k_pos=1.0),
    dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=1.5, vespo_k_neg=2.0, vespo_lambda_neg=1.0),
    dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
]


def configure(trainer, inputs, case):
    """Set the case's options on the trainer the way GRPOTrainer.__init__ reads them from its config."""
    case = dict(case)
    args = trainer.args
    vllm, clip = case.pop("vllm", None), case.pop("clip", (None, 3.0))
    trainer.loss_type = case.pop("loss_type")
    trainer.beta = args.beta = case.pop("beta", 0.04)
    trainer.importance_sampling_level = case.pop("importance_sampling_level", "token")
    trainer.epsilon_high = case.pop("epsilon_high", 3.0 if trainer.loss_type == "cispo" else 0.2)
    trainer.top_entropy_quantile = case.pop("top_entropy_quantile", 1.0)
    trainer.entropy_coef = case.pop("entropy_coef", 0.0)
    trainer.use_adaptive_entropy = case.pop("use_adaptive_entropy", False)
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy
    trainer._last_world_entropy = 0.0 if trainer.use_adaptive_entropy else float("inf")
    trainer._entropy_window_stats = None
    trainer.off_policy_mask_threshold = case.pop("off_policy_mask_threshold", None)
    defaults = dict(delta=None, use_bias_correction_kl=True, entropy_target=0.2, sapo_temperature_pos=1.0,
                    sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                    vespo_lambda_neg=2.0)
    for name, default in defaults.items():
        setattr(args, name, case.pop(name, default))
    assert not case, case
    trainer.use_vllm = vllm is not None
    trainer.vllm_importance_sampling_correction = vllm is not None
    trainer.vllm_importance_sampling_mode = vllm or "sequence_mask"
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = clip
    inputs = dict(inputs)
    if vllm is not None:
        inputs["importance_sampling_ratio"] = trl_importance_ratio(inputs, vllm, *clip)
    else:  # without vLLM TRL has no sampler log-probs
        inputs.pop("sampling_per_token_logps")
    return inputs


@pytest.mark.filterwarnings("ignore:.*(luspo|vespo|weighs each sequence|epsilon_high)")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_gradients_and_metrics_equal_trl(scored, case):
    trainer, base_inputs = scored
    inputs = configure(trainer, base_inputs, case)
    theirs = run_loss(trainer, inputs, trl.GRPOTrainer._compute_loss)
    state = (trainer.entropy_coef, trainer._last_world_entropy)
    configure(trainer, base_inputs, case)  # the adaptive controller moved: start ours from the same state
    ours = run_loss(trainer, inputs, fused_compute_loss)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert ours[2].keys() == theirs[2].keys()
    for key in theirs[2]:
        assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-5, abs=1e-6), key
    assert (trainer.entropy_coef, trainer._last_world_entropy) == pytest.approx(state)


def test_training_with_the_fused_loss_logs_what_trl_logs(tiny, tmp_path):
    """One optimizer step (2 accumulated micro-batches) of stock TRL and of FusedGRPOTrainer from
    the same seed: same completions, same logged loss and metrics, same updated weights."""
    runs = {}
    for name, klass in (("trl", trl.GRPOTrainer), ("fused", FusedGRPOTrainer)):
        trainer = make_trainer(tiny, tmp_path / name, klass=klass, top_entropy_quantile=0.5, entropy_coef=0.01)
        trainer.train()
        logs = {k: v for k, v in trainer.state.log_history[0].items() if isinstance(v, float)}
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[name] = logs, weights
    (trl_logs, trl_w), (ours_logs, ours_w) = runs["trl"], runs["fused"]
    timing = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    assert set(ours_logs) == set(trl_logs)
    for key in trl_logs:
        if not key.startswith(timing):
            assert ours_logs[key] == pytest.approx(trl_logs[key], rel=1e-4, abs=1e-6), key
    for n in trl_w:  # Adam's update (lr 1e-2) normalizes the gradient: rounding-level gradient differences
        torch.testing.assert_close(ours_w[n], trl_w[n], rtol=1e-4, atol=1e-5)  # move a weight by ~1e-6


def test_use_fused_loss_patches_an_existing_trainer(scored):
    trainer, _ = scored
    other = make_trainer(trainer.model.config._name_or_path, trainer.args.output_dir + "_b")
    assert use_fused_loss(other) is other
    assert other._compute_loss.__func__ is fused_compute_loss
    with pytest.raises(TypeError, match="GRPOTrainer"):
        use_fused_loss(object())
