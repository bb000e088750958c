"""The memory plan's arithmetic on hand-computed cases, its fit search, and the CLI's `plan`."""

import pytest
import torch

from grpo_fast import cli, memory
from grpo_fast.config import load_config
from test_train_loop import make_tiny_model, tiny_rewards  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_plan"))


def cfg_for(tiny, **extra):
    base = {"model.name_or_path": str(tiny), "model.device": "cpu", "train.prompts_per_step": 2,
            "sampling.num_generations": 4, "sampling.max_completion_length": 10, "sampling.max_prompt_length": 20,
            "train.micro_batch_size": 4, "lora.r": 2, "lora.lora_alpha": 4, "sampling.kv_budget": "512 tokens"}
    return load_config(None, {**base, **extra})


def test_shape_counts_the_real_model_parameters(tiny):
    from transformers import AutoModelForCausalLM

    shape = memory.read_shape(cfg_for(tiny).model)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert shape.block_linear_params + shape.other_params == sum(p.numel() for p in model.parameters())


def test_components_by_hand(tiny):
    cfg = cfg_for(tiny)
    p = memory.plan(cfg)
    s = memory.read_shape(cfg.model)  # hidden 32, intermediate 64, 2 layers, 4 q heads, 2 kv heads, head_dim 8
    assert (s.hidden, s.intermediate, s.layers, s.q_heads, s.kv_heads, s.head_dim) == (32, 64, 2, 4, 2, 8)
    # LoRA r = 2 on q (32->32), k, v (32->16), o (32->32), gate, up (32->64), down (64->32): per layer
    per_layer = 2 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32))
    assert p.components["lora adapters"] == 2 * per_layer * 4 == p.components["lora gradients"]
    assert p.components["optimizer state"] == 2 * per_layer * 8  # AdamW: two fp32 moments
    assert p.components["weights"] == (s.block_linear_params + s.other_params) * 4
    assert p.components["kv cache"] == 512 * 2 * 2 * 2 * 8 * 4  # tokens x K,V x layers x kv heads x dim x fp32
    # a budget in bytes holds what fits of it (256 bytes a token here)
    assert memory.plan(cfg_for(tiny, **{"sampling.kv_budget": "64KiB"})).components["kv cache"] == 65536
    assert p.peak_bytes == max(p.phases.values()) and p.peak_phase in p.phases
    # the micro-batch: 4 completions of one group = 20 prompt + 4 x 9 = 56 tokens, in the cached
    # layout (its attention saves 3x less than the packed mask's). Per token and layer: norms
    # (4 x 32 + 2), q, K and V repeated to the 4 query heads, the attention output (4 x 32),
    # logsumexp (4), gate, up, down's input (3 x 64), LoRA x A^T (7 x 2). In the cached layout the
    # repeated K/V give way to what its SDPA calls keep, per layer: the prompt pass's K/V at their
    # 2 heads (16 wide), each row's copy of prompt + completion K/V at the 2 heads; and the
    # [4, 1, 9, 29] mask once. CPU heap growth = 0.35 x the saved tensors (no checkpointing; 0.9
    # where PyTorch's ops run the SwiGLU and RMSNorm, without the native core)
    assert "(cached layout)" in p.notes[0]
    per_token_layer = 4 * 32 + 2 + 4 * 32 + 4 + 3 * 64 + 7 * 2
    without_kv = 56 * 2 * (per_token_layer - 2 * 32) * 4
    kv = 2 * (20 * 2 * 16 + 4 * (20 + 9) * 2 * 16) * 4
    assert p.components["attention K/V (cached prompt)"] == kv
    assert p.components["training activations"] == int(without_kv + 4 * 9 * 29 * 4)
    growth = 0.35 if memory._native_core_built() else 0.9
    assert p.components["heap growth (cpu)"] == int(growth * (without_kv + kv))
    # gradient checkpointing: every layer's input plus one layer's saved tensors, packed
    ckpt = memory.plan(cfg_for(tiny, **{"model.gradient_checkpointing": True}))
    assert "(packed layout)" in ckpt.notes[0]
    assert ckpt.components["training activations"] == int(56 * 2 * 32 * 4 + 56 * per_token_layer * 4 + 56 ** 2 * 4)
    short = memory.plan(cfg_for(tiny, **{"sampling.max_completion_length": 2}))  # 20 + 4 x 1 = 24 tokens: packed
    assert "(packed layout)" in short.notes[0] and "attention K/V (cached prompt)" not in short.components
    assert short.components["training activations"] == int(24 * 2 * per_token_layer * 4 + 24 ** 2 * 4)  # + the mask
    assert "scoring" not in p.phases  # beta = 0, num_iterations = 1: no scoring pass
    assert "scoring" in memory.plan(cfg_for(tiny, **{"loss.beta": 0.1})).phases


def test_a_bf16_model_on_the_cpu_keeps_its_attention_tensors_in_fp32(tiny):
    """bf16 on the CPU: activations 2 bytes, but SDPA's saved q, K, V, output and logsumexp 4
    (grpo_fast/train/fp32_attention.py runs it in fp32 there), the cached prompt K/V too; under
    gradient checkpointing attention stays bf16 (the cast is off there); the heap grows as under
    PyTorch's SwiGLU / RMSNorm ops. Same micro-batch as test_components_by_hand."""
    p = memory.plan(cfg_for(tiny, **{"model.dtype": "bfloat16"}))
    attention = 4 * 32 + 4  # q, K, V repeated to the query heads, the output, the logsumexp
    others = 4 * 32 + 2 + 3 * 64 + 7 * 2
    without_kv = 56 * 2 * (others * 2 + (attention - 2 * 32) * 4)
    kv = 2 * (20 * 2 * 16 + 4 * (20 + 9) * 2 * 16) * 4
    assert p.components["attention K/V (cached prompt)"] == kv
    assert p.components["training activations"] == int(without_kv + 4 * 9 * 29 * 2)  # the mask: bf16
    # the one-pass SwiGLU / RMSNorm kernels are fp32 only: PyTorch's ops leave the saved tensors
    # again (1.0); the process's growth outside tensors is counted in every phase
    assert p.components["heap growth (cpu)"] == int(1.0 * (without_kv + kv))
    process = p.components["process growth (cpu)"]
    assert process == memory.CPU_PROCESS_GROWTH["half"] > memory.CPU_PROCESS_GROWTH["fp32"]
    c = p.components
    body = (c["training activations"] + c["attention K/V (cached prompt)"] + c["fused loss"] + c["heap growth (cpu)"]
            + 56 * (2 * 64 + 2 * 32) * 4)  # one layer's gradients in flight
    assert p.phases["training"] == int((c["runtime"] + c["weights"] + c["lora adapters"] + c["lora gradients"]
                                        + c["optimizer state"] + body + process) * 1.1)
    fp32 = memory.plan(cfg_for(tiny))
    f = fp32.components
    assert f["process growth (cpu)"] == memory.CPU_PROCESS_GROWTH["fp32"]
    for plan_, comps in ((p, c), (fp32, f)):
        assert plan_.phases["sampling"] == (comps["runtime"] + comps["weights"] + comps["lora adapters"]
                                            + comps["optimizer state"] + comps["kv cache"] + comps["sampler logits"]
                                            + 8 * (4 * 32 + 2 * 64) * (2 if plan_ is p else 4)
                                            + comps.get("packed weights (bf16 sampling)", 0)  # bf16 only
                                            + comps["process growth (cpu)"])
    ckpt = memory.plan(cfg_for(tiny, **{"model.dtype": "bfloat16", "model.gradient_checkpointing": True}))
    assert ckpt.components["training activations"] == int(56 * 2 * 32 * 2 + 56 * (others + attention) * 2 + 56 ** 2 * 2)
    # under checkpointing bf16's recompute leaves little (0.1 of what the forward saves)
    assert ckpt.components["heap growth (cpu)"] == int(0.1 * (56 * 2 * (others + attention) * 2))


@pytest.mark.parametrize("P,C,G,B,mb", [(20, 10, 4, 2, 4), (20, 2, 4, 2, 4), (300, 10, 4, 2, 2), (3, 10, 4, 2, 2),
                                        (300, 10, 4, 2, 8), (40, 30, 8, 1, 3), (5, 40, 2, 3, 6)])
def test_the_plan_counts_the_layout_the_training_pass_takes(tiny, P, C, G, B, mb):
    """The plan's layout (its note) is the one packed_forward / group_prompts pick for a step of
    full-length rows of those sizes."""
    from grpo_fast.train import packed_forward as pf
    from grpo_fast.train.group_prompts import saves_enough
    from grpo_fast.train.rollout_batch import make_batch

    from transformers import AutoConfig

    cfg = cfg_for(tiny, **{"sampling.max_prompt_length": P, "sampling.max_completion_length": C,
                           "sampling.num_generations": G, "train.prompts_per_step": B, "train.micro_batch_size": mb})
    prompts = [[5 + g] * P for g in range(B) for _ in range(G)]
    batch = make_batch(prompts, [[9] * C] * (B * G), pad_id=0)
    runs = pf.prompt_runs(batch.input_ids[:, :P])
    cuts = [slice(a, min(a + mb, B * G)) for a in range(0, B * G, mb)]
    first = batch.select(cuts[0])
    if len(cuts) > 1 and saves_enough(batch, runs, cuts):
        taken = "group prompts"
    elif pf.cached_pays(AutoConfig.from_pretrained(tiny), first, pf.prompt_runs(first.input_ids[:, :P])):
        taken = "cached"
    else:
        taken = "packed"
    assert f"({taken} layout)" in memory.plan(cfg).notes[0]


def test_the_default_kv_pool_is_a_step_with_each_prompt_once(tiny):
    """kv_budget None / auto: the pool the trainer asks for (memory.shared_pool_tokens), its K/V bytes."""
    per_token = 2 * 2 * 2 * 8 * 4  # K,V x layers x kv heads x dim x fp32
    for prompt in (20, 300):
        p = memory.plan(cfg_for(tiny, **{"sampling.kv_budget": None, "sampling.max_prompt_length": prompt}))
        assert p.components["kv cache"] == memory.shared_pool_tokens(2, 4, prompt, 10) * per_token
    assert p.components["kv cache"] < 2 * 4 * (300 + 10) * per_token / 2  # the prompt once per group, not per row


def test_the_plan_says_how_many_sequences_a_short_pool_holds(tiny):
    five = memory.shared_pool_tokens(1, 4, 20, 10) + memory.shared_pool_tokens(1, 1, 20, 10)  # a group and one more
    notes = " ".join(memory.plan(cfg_for(tiny, **{"sampling.kv_budget": f"{five} tokens"})).notes)
    assert "holds 5 of the step's 8 sequences" in notes
    notes = " ".join(memory.plan(cfg_for(tiny, **{"sampling.kv_budget": f"{five - 16} tokens"})).notes)
    assert "holds 4 of the step's 8 sequences" in notes
    whole = memory.shared_pool_tokens(2, 4, 20, 10)
    assert "preempts" not in " ".join(memory.plan(cfg_for(tiny, **{"sampling.kv_budget": f"{whole} tokens"})).notes)


def test_full_finetuning_counts_every_weights_gradient_and_state_sharded_under_fsdp(tiny, monkeypatch):
    from grpo_fast import distributed

    s = memory.read_shape(cfg_for(tiny).model)
    n = s.block_linear_params + s.other_params
    full = memory.plan(cfg_for(tiny, **{"lora.enabled": False, "loss.beta": 0.1}))
    c = full.components
    assert c["weights"] == c["gradients"] == c["reference copy"] == n * 4 and c["optimizer state"] == n * 8
    assert "lora adapters" not in c and "full fine-tuning" in full.notes[1]
    lora = memory.plan(cfg_for(tiny, **{"loss.beta": 0.1}))
    assert full.phases["training"] > lora.phases["training"]
    # the saved activations hold no LoRA terms: fewer per token than the LoRA run's
    assert c["training activations"] < lora.components["training activations"]
    # FSDP on 2 ranks: 1/2 of each, plus what is gathered (two layers and the root while training,
    # the whole model while sampling)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    half = memory.plan(cfg_for(tiny, **{"lora.enabled": False, "loss.beta": 0.1, "train.fsdp": True}))
    h = half.components
    assert h["weights"] == h["gradients"] == h["reference copy"] == n * 4 // 2 and h["optimizer state"] == n * 8 // 2
    assert h["gathered weights (fsdp sampling)"] == n * 4 - h["weights"]
    layer = s.block_linear_params // s.layers + 2 * s.hidden
    assert h["gathered layers (fsdp)"] == (s.other_params + 2 * layer) * 4
    assert half.phases["training"] < full.phases["training"]
    assert "sharded across 2 ranks" in half.notes[1]
    # without train.fsdp a 2-rank full fine-tuning run replicates: the one-rank figures
    assert memory.plan(cfg_for(tiny, **{"lora.enabled": False, "loss.beta": 0.1})).components["weights"] == n * 4


def test_knobs_move_the_plan_the_right_way(tiny):
    base = memory.plan(cfg_for(tiny))
    longer = memory.plan(cfg_for(tiny, **{"sampling.max_completion_length": 40}))
    assert longer.components["training activations"] > base.components["training activations"]
    ckpt = memory.plan(cfg_for(tiny, **{"model.gradient_checkpointing": True, "sampling.max_completion_length": 40}))
    assert ckpt.components["training activations"] < longer.components["training activations"]
    nf4 = memory.plan(cfg_for(tiny, **{"model.load_in_4bit": True}))
    s = memory.read_shape(cfg_for(tiny).model)
    assert nf4.components["weights"] == pytest.approx(s.block_linear_params * (0.5 + 1 / 64 + 4 / (64 * 256))
                                                      + s.other_params * 4, abs=1)
    eight_bit = memory.plan(cfg_for(tiny, **{"train.optim": "adamw_8bit", "model.device": "cpu"}))
    assert eight_bit.components["optimizer state"] * 4 == base.components["optimizer state"]


def test_fit_returns_the_largest_values_the_plan_accepts(tiny):
    cfg = cfg_for(tiny, **{"sampling.kv_budget": None})
    budget = memory.plan(cfg).peak_bytes + 3 * 2**20
    found = memory.fit(cfg, budget)
    for knob, value in found.items():
        assert value is not None, knob
        section, name = knob.split(".")
        ceiling = dict(memory.KNOBS)[knob]
        for v, should_fit in ((value, True), (value + 1, False)):
            if v > ceiling:  # the search stops at the knob's ceiling
                continue
            trial = cfg_for(tiny, **{"sampling.kv_budget": None, knob: v})
            if name == "micro_batch_size" and v > trial.train.prompts_per_step * trial.sampling.num_generations:
                continue
            assert (memory.plan(trial).peak_bytes <= budget) == should_fit, (knob, v)
    assert any(value < dict(memory.KNOBS)[knob] for knob, value in found.items())  # some knob is bounded by memory
    assert memory.fit(cfg, 2**20)["train.prompts_per_step"] is None  # 1 MiB: nothing fits


def test_cli_plan_prints_the_table_and_the_fit(tiny, capsys):
    assert cli.main(["plan", "--model.name_or_path", str(tiny), "--device", "cpu", "--device-memory", "4GiB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan (cpu): peak" in out and "training activations" in out and "fits in 4.00 GiB" in out
    assert "train.prompts_per_step" in out and "sampling.max_completion_length" in out
    assert memory.parse_size("24GiB") == 24 * 2**30 and memory.parse_size("16GB") == 16 * 10**9
    # one rank of a sharded 2-rank run: half the weights, its half of the step's prompts
    args = ["plan", "--model.name_or_path", str(tiny), "--device", "cpu", "--lora.enabled", "false",
            "--train.fsdp", "true", "--train.prompts_per_step", "4"]
    assert cli.main(args + ["--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("one rank of 2:") and "sharded across 2 ranks" in out and "gathered layers (fsdp)" in out
    assert cli.main(args + ["--nproc", "3"]) == 2
    assert "--nproc 3: train.prompts_per_step (4) must split" in capsys.readouterr().err


def test_micro_batches_by_tokens_pack_groups_and_split_long_ones():
    from grpo_fast.train.micro_batches import micro_batches
    from grpo_fast.train.rollout_batch import make_batch

    p1, p2 = [5] * 10, [6] * 4
    prompts = [p1] * 3 + [p2] * 3
    comps = [[7] * n for n in (21, 11, 6, 3, 3, 3)]  # packed cost: 20, 10, 5 (+10 prompt); 2, 2, 2 (+4)
    batch = make_batch(prompts, comps, 0)
    assert micro_batches(batch, size=4) == [slice(0, 4), slice(4, 6)]
    cuts = micro_batches(batch, tokens=30)
    # group 1 costs 10 + 20 + 10 + 5 = 45 > 30: split at completion boundaries (its prompt counted in
    # each part); group 2 costs 4 + 6 = 10 and would overflow the second part (25 + 10)
    assert cuts == [slice(0, 1), slice(1, 3), slice(3, 6)]
    assert sum(c.stop - c.start for c in cuts) == len(batch)
    assert micro_batches(batch, tokens=5) == [slice(i, i + 1) for i in range(6)]  # a row over budget runs alone
    assert micro_batches(batch, tokens=10**6) == [slice(0, 6)]


@pytest.mark.parametrize("options", [{}, {"loss.beta": 0.05, "loss.top_entropy_quantile": 0.5}, {"loss.beta": 0.05}, {"loss.top_entropy_quantile": 0.5}])
def test_micro_batches_by_tokens_give_the_whole_steps_gradient(tiny, options, monkeypatch):
    """train.micro_batch_tokens splits every pass (scoring and update) by packed tokens; the
    normalizers are the step's, so the gradient is the whole batch's for any budget."""
    from test_loss_training import CaptureGrads, policy_with_lora, rollout_for

    from grpo_fast.train import packed_forward, policy_loss as policy_loss_module
    from grpo_fast.train.micro_batches import micro_batches
    from grpo_fast.train.model import build_scheduler, policy_modules, trainable_parameters
    from grpo_fast.train.update import update_policy

    model, tok = policy_with_lora(tiny)
    rollout = rollout_for(model, tok)
    cfg = load_config(None, {"sampling.max_completion_length": 8, **options})
    runs, forwards = {}, []
    real = packed_forward.completion_hidden

    def counting(decoder, part, *a, **k):
        forwards.append(len(part))
        return real(decoder, part, *a, **k)

    monkeypatch.setattr(policy_loss_module, "completion_hidden", counting)
    passes = 1 + ("loss.beta" in options) + ("loss.top_entropy_quantile" in options)  # update, ref, entropies
    for tokens in (None, 11, 4):  # whole step; rows (0, 1), 2, 3 (costs 6, 4, 10, 7); one row each
        params = trainable_parameters(model)
        opt = CaptureGrads(params)
        metrics = update_policy(policy_modules(model), opt, build_scheduler(opt, cfg.train, 10), params, rollout, cfg,
                                {}, echo=lambda *_: None, micro_batch_tokens=tokens)
        runs[tokens] = (metrics["loss"], opt.seen[0])
        expected = [len(range(4)[c]) for c in micro_batches(rollout.batch, tokens=tokens)]
        assert forwards == expected * passes, tokens  # every pass ran the token-budget micro-batches
        forwards.clear()
    assert len(micro_batches(rollout.batch, tokens=11)) == 3 and len(micro_batches(rollout.batch, tokens=4)) == 4
    for tokens in (11, 4):
        assert runs[tokens][0] == pytest.approx(runs[None][0], rel=1e-5, abs=1e-7)
        for a, b in zip(runs[tokens][1], runs[None][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_a_plan_larger_than_the_device_stops_before_the_model_loads(tiny, tmp_path, monkeypatch):
    """Capacity below the plan's peak: MemoryPlanError naming the peak and settings that fit, and
    the weights were never loaded."""
    from test_train_loop import tiny_config

    from grpo_fast import trainer

    # a small KV pool: training is the peak (the knobs the advice turns act on it)
    cfg = tiny_config(tiny, tmp_path / "run", **{"model.device": "cpu", "data.eval_size": 0,
                                                  "sampling.kv_budget": "64KiB"})
    assert memory.plan(cfg).peak_phase == "training"
    need = memory.plan(cfg).peak_bytes
    monkeypatch.setattr(memory, "device_capacity", lambda device: need - 2**20)
    monkeypatch.setattr(trainer, "load_policy", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(memory.MemoryPlanError, match=r"the plan needs .* settings that fit .*prompts_per_step=1"):
        trainer.GRPOTrainer(args=cfg, echo=lambda *_: None)
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_an_oom_mid_run_ends_it_with_the_phase_and_the_checkpoint_intact(tiny, tmp_path, monkeypatch, tiny_rewards):
    """A CPU allocator failure in step 2's update: OutOfMemory (a one-line user error) naming the
    phase, the step, the plan and what to change; checkpoint-1 still verifies."""
    from test_train_loop import tiny_config

    from grpo_fast import trainer
    from grpo_fast.train.checkpoint import find_resumable

    cfg = tiny_config(tiny, tmp_path / "run", **{"model.device": "cpu", "train.max_steps": 3, "train.save_steps": 1,
                                                  "data.eval_size": 0})
    real, calls = trainer.update_policy, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9999999999 bytes.")
        return real(*a, **k)

    monkeypatch.setattr(trainer, "update_policy", failing)
    t = trainer.GRPOTrainer(args=cfg, echo=lambda *_: None)
    with pytest.raises(memory.OutOfMemory, match=r"out of memory while training at step 2 .*micro_batch_tokens: auto"
                                                 r".*checkpoint-1 is intact"):
        t.train()
    found = find_resumable(tmp_path / "run" / "checkpoints")
    assert found is not None and found.step == 1
    # any other RuntimeError is not dressed up as an OOM
    assert not memory.is_out_of_memory(RuntimeError("shape mismatch"))


def test_auto_token_budget_is_the_largest_micro_batch_the_plan_accepts(tiny):
    """micro_batch_tokens: auto = the packed tokens of the most full-length completions whose
    training peak fits; one more completion would not; too little memory is a clear error."""
    cfg = cfg_for(tiny, **{"train.micro_batch_size": 0, "sampling.max_completion_length": 40})
    shape = memory.read_shape(cfg.model)
    rows = cfg.train.prompts_per_step * cfg.sampling.num_generations

    def peak(n):  # the training phase's (the process's fixed growth makes sampling the peak of so tiny a model)
        return memory.plan(cfg_for(tiny, **{"train.micro_batch_size": n, "sampling.max_completion_length": 40}),
                           shape=shape).phases["training"]

    capacity = (peak(3) + peak(4)) // 2  # 3 completions fit, 4 do not
    budget = memory.token_budget(cfg, capacity, shape=shape)
    assert budget == 1 * 20 + 3 * 39  # one group's prompt + 3 completions of 40 - 1 packed tokens
    assert memory.token_budget(cfg, None, shape=shape) == 2 * 20 + rows * 39  # unknown capacity: the whole step
    with pytest.raises(memory.MemoryPlanError, match="not even one completion"):
        memory.token_budget(cfg, peak(1) - 1, shape=shape)


def test_a_4bit_model_on_the_cpu_lets_go_of_its_checkpoint_file(tmp_path):
    """The unquantized tensors are copied off the checkpoint's memory map: otherwise they keep
    the whole mapping, and every page the quantizer read, in the resident set. (A model folder of
    its own: fp32 models of other tests keep their files mapped, by design.)"""
    from grpo_fast.config import LoraConfig, ModelConfig
    from grpo_fast.train.model import load_policy

    tiny = make_tiny_model(tmp_path / "tiny_4bit")
    model, _, _ = load_policy(ModelConfig(name_or_path=str(tiny), load_in_4bit=True, device="cpu"),
                              LoraConfig(r=2, lora_alpha=4), seed=0)
    maps = open("/proc/self/maps").read()
    assert str(tiny / "model.safetensors") not in maps
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())  # it is the 4-bit model


def test_heap_growth_follows_whether_the_native_core_is_built(tiny, monkeypatch):
    """The one-pass SwiGLU / RMSNorm kernels leave fewer temporaries in the heap: 0.35 of the saved
    tensors (0.2 checkpointed) with the core, PyTorch's ops 0.9 (0.6) without it."""
    for ckpt, (lean, torch_ops) in ((False, (0.35, 0.9)), (True, (0.2, 0.6))):
        cfg = cfg_for(tiny, **{"model.gradient_checkpointing": ckpt})
        monkeypatch.setattr(memory, "_native_core_built", lambda: True)
        with_core = memory.plan(cfg).components["heap growth (cpu)"]
        monkeypatch.setattr(memory, "_native_core_built", lambda: False)
        without = memory.plan(cfg).components["heap growth (cpu)"]
        assert with_core > 0 and abs(with_core / without - lean / torch_ops) < 1e-4  # int() of each


def test_releasing_memory_once_a_step_counts_the_holes_the_micro_batches_leave(tiny):
    """train.release_memory = step keeps the micro-batches' freed pages: the training peak grows by
    CPU_HEAP_GROWTH_STEP_RELEASE of one micro-batch's saved tensors; sampling is unchanged."""
    lean = memory.plan(cfg_for(tiny))
    kept = memory.plan(cfg_for(tiny, **{"train.release_memory": "step"}))
    grown = kept.components["heap growth (cpu)"] - lean.components["heap growth (cpu)"]
    basis = lean.components["heap growth (cpu)"] / (memory.CPU_HEAP_GROWTH if memory._native_core_built()
                                                     else memory.CPU_HEAP_GROWTH_TORCH_OPS)[False]
    assert grown == pytest.approx(memory.CPU_HEAP_GROWTH_STEP_RELEASE * basis, rel=1e-3, abs=2)
    # the phase's peak is its components plus the allocator's slack share
    assert kept.phases["training"] - lean.phases["training"] == pytest.approx(grown * (1 + memory.SLACK["cpu"]), abs=2)
    assert kept.phases["sampling"] == lean.phases["sampling"]


def test_a_bf16_cpu_sampler_counts_its_packed_copy_of_the_block_linears(tiny):
    """The bf16 decode reorders every block linear and the LM head for oneDNN (decode_fast_paths)
    for the length of a generate call: the sampling phase holds that copy, 2 bytes a weight; not
    fp32, NF4 or HF generate, and not the training phase."""
    name = "packed weights (bf16 sampling)"
    bf16 = memory.plan(cfg_for(tiny, **{"model.dtype": "bfloat16"}))
    s = memory.read_shape(cfg_for(tiny).model)
    assert bf16.components[name] == (s.block_linear_params + s.vocab * s.hidden) * 2  # + the LM head
    for other in ({}, {"model.dtype": "bfloat16", "sampling.backend": "hf"},
                  {"model.dtype": "bfloat16", "model.load_in_4bit": True}):
        assert name not in memory.plan(cfg_for(tiny, **other)).components, other
    hf = memory.plan(cfg_for(tiny, **{"model.dtype": "bfloat16", "sampling.backend": "hf"}))
    assert bf16.phases["sampling"] - hf.phases["sampling"] == bf16.components[name]
    assert bf16.phases["training"] == hf.phases["training"]
