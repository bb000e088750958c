"""One rank of the data-parallel tests (tests/test_distributed.py launches it as torchrun would:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment; gloo, one thread).
Also imported by the test itself for the one-process reference (the same functions, world 1).

    python dist_worker.py grads MODEL_DIR OUT.pt      every case of CASES: the step's gradient
    python dist_worker.py resume MODEL_DIR OUT_DIR    3 steps; 2 steps + resume to 3
    python dist_worker.py fsdp MODEL_DIR OUT_DIR [RUNS]   the same, full fine-tuning sharded (FSDP2)
    python dist_worker.py eval MODEL_DIR OUT.json     eval metrics, the prompts split across the ranks
    python dist_worker.py reward_error MODEL_DIR OUT_DIR
    python dist_worker.py oom MODEL_DIR OUT_DIR
    python dist_worker.py tools MODEL_DIR OUT_DIR      one multi-turn step, paged sampler, environments
"""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)

from grpo_fast.loss.options import LOSS_TYPE_NAMES  # noqa: E402
from grpo_fast.sampler import Completion, GroupOutput  # noqa: E402

G, B, C = 3, 4, 5  # completions per prompt, prompts per step, max completion length

# Every loss type, and every option whose statistics span the batch.
CASES = {lt: {"loss.loss_type": lt} for lt in LOSS_TYPE_NAMES}
CASES.update({
    "scale_rewards_batch": {"loss.loss_type": "grpo", "loss.scale_rewards": "batch"},
    "gdpo": {"loss.multi_objective_aggregation": "normalize_then_sum"},
    "beta_and_two_iterations": {"loss.beta": 0.04, "loss.num_iterations": 2},
    "top_entropy_quantile": {"loss.top_entropy_quantile": 0.5, "loss.entropy_coef": 0.01},
    "dynamic_sampling": {"train.dynamic_sampling": True, "train.max_dynamic_rounds": 2},
    "micro_batches": {"train.micro_batch_size": 2, "loss.loss_type": "grpo"},
})


class FakeGenerator:
    """Completions that depend on the prompt only (not on the seed nor on the other prompts of
    the call): a one-rank and a two-rank step then train on exactly the same completions."""

    last_stats: dict = {}

    def generate(self, prompt_ids, *, n, max_tokens, **_):
        out = []
        for p in prompt_ids:
            h = sum(p)
            completions = []
            for c in range(n):
                length = 1 + (h + 3 * c) % max_tokens
                toks = [2 + (h * 7 + c * 13 + k * 5) % 90 for k in range(length)]
                reason = "length" if length == max_tokens else "eos"
                if reason == "eos":
                    toks[-1] = 1  # <eos>
                completions.append(Completion(toks, [-1.5 - 0.1 * k for k in range(length)], reason))
            out.append(GroupOutput(list(p), completions))
        return out


def parity(prompts, completions, completion_ids, **_):
    """0 / 1 on the first token, + a length term; constant within the groups of odd-length
    prompts (dynamic sampling drops those)."""
    return [float(ids[0] % 3 == 0) + 0.1 * len(ids) if len(p) % 2 == 0 else 1.0
            for p, ids in zip(prompts, completion_ids)]


def length_bonus(completion_ids, **_):
    return [float(len(ids) % 2) for ids in completion_ids]


def prompt_rows(n=12):
    return [{"prompt": f"What is {i} + {i % 4}?" + "!" * (i % 3), "answer": str(i + i % 4)} for i in range(n)]


def step_grads(model_dir: str) -> dict[str, list[torch.Tensor]]:
    """The gradient of one step of every case (this process's share under torchrun, then summed
    over ranks by the step itself): {case: [grad of each trainable parameter]}."""
    from grpo_fast import distributed as dist
    from grpo_fast.config import load_config
    from grpo_fast.data import PromptStream, encode_prompts
    from grpo_fast.rewards import build_rewards
    from grpo_fast.train.data_parallel import shard_rollout
    from grpo_fast.train.model import load_policy, policy_modules, trainable_parameters
    from grpo_fast.train import sharding
    from grpo_fast.train.rollout import collect_rollout
    from grpo_fast.train.update import update_policy

    dist.init(60)
    base = {"model.name_or_path": model_dir, "lora.r": 4, "lora.lora_alpha": 8, "lora.lora_dropout": 0.0,
            "train.prompts_per_step": B, "sampling.num_generations": G, "sampling.max_completion_length": C,
            "train.max_grad_norm": 0.0, "train.seed": 3}
    cfg0 = load_config(None, base)
    torch.manual_seed(0)
    model, tok, _ = load_policy(cfg0.model, cfg0.lora, seed=0)
    params = trainable_parameters(model)
    with torch.no_grad():  # LoRA B starts at 0: give it values so every gradient is non-trivial
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    def one_step_grads(model, tok, params, cfg):
        encoded, _ = encode_prompts(prompt_rows(), tok, cfg.data, 64, "train")
        rewards = build_rewards(cfg.rewards, C, funcs=[parity, length_bonus])
        rollout = collect_rollout(model, tok, FakeGenerator(), PromptStream(encoded, 3), rewards, cfg, step=0)
        rec = _Recorder(params)
        update_policy(policy_modules(model), rec, _NoSchedule(), params, shard_rollout(rollout, G), cfg, {},
                      echo=lambda *_: None)
        return rec.grads

    out = {name: one_step_grads(model, tok, params, load_config(None, {**base, **case}))
           for name, case in CASES.items()}
    # full fine-tuning (no adapters): every weight's gradient, the reference a frozen copy
    cfg = load_config(None, {**base, "lora.enabled": False, "loss.beta": 0.04, "loss.num_iterations": 2})
    model, tok, _ = load_policy(cfg.model, cfg.lora, seed=0, keep_reference=True)
    params = trainable_parameters(model)
    with torch.no_grad():  # move off the reference, so that the KL term has a gradient
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out["full_finetuning"] = one_step_grads(model, tok, params, cfg)
    # the same, sharded across the ranks (FSDP2; one process: nothing to shard, the plain step)
    model, tok, _ = load_policy(cfg.model, cfg.lora, seed=0, keep_reference=True)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    assert sharding.shard_policy(model) == (dist.world_size() > 1)
    out["fsdp_full_finetuning"] = one_step_grads(model, tok, trainable_parameters(model), cfg)
    # and with uneven shares (as dynamic sampling can leave them: rank 0 three groups, rank 1
    # one) in micro-batches of one row: 9 passes on rank 0, 3 on rank 1, which FSDP needs equal
    # (sharding.equal_passes: rank 1 adds 6 idle passes), old log-probs and reference included
    import grpo_fast.train.data_parallel as data_parallel

    real_range = data_parallel.dist.shard_range
    data_parallel.dist.shard_range = lambda n: slice(0, n) if dist.world_size() == 1 else \
        (slice(0, n - 1) if dist.rank() == 0 else slice(n - 1, n))
    try:
        out["fsdp_uneven_shares"] = one_step_grads(
            model, tok, trainable_parameters(model),
            load_config(None, {**base, "lora.enabled": False, "loss.beta": 0.04, "loss.num_iterations": 2,
                               "train.micro_batch_size": 1}))
    finally:
        data_parallel.dist.shard_range = real_range
    return out


class _Recorder:
    """An optimizer that keeps the gradient it is asked to apply (and changes nothing)."""

    def __init__(self, params):
        self.params, self.grads = params, None

    def step(self):  # a sharded gradient whole (a collective: every rank steps)
        self.grads = [(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                      for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class _NoSchedule:
    def step(self):
        pass


def trainer_args(out_dir, **extra):
    from grpo_fast import GRPOConfig

    fields = {"output_dir": str(out_dir), "max_steps": 3, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
              "seed": 1, "report_to": "none", "disable_tqdm": True, "logging_steps": 1,
              "train.prompts_per_step": 4, "sampling.num_generations": 3, "sampling.max_completion_length": 6,
              "sampling.backend": "hf", "lora.r": 4, "lora.lora_alpha": 8, "lora.lora_dropout": 0.1,
              "eval_before": False, "data.eval_size": 0}
    return GRPOConfig(**{**fields, **extra})


def run_resume(model_dir, out_dir):
    """An uninterrupted 3-step run (a/) and a 2-step run resumed to step 3 (b/); LoRA dropout is on
    so that each rank's restored RNG matters."""
    from grpo_fast import GRPOTrainer

    rows = prompt_rows(16)
    GRPOTrainer(model=model_dir, reward_funcs=[parity], args=trainer_args(f"{out_dir}/a"), train_dataset=rows).train()
    GRPOTrainer(model=model_dir, reward_funcs=[parity], args=trainer_args(f"{out_dir}/b", max_steps=2),
                train_dataset=rows).train()
    GRPOTrainer(model=model_dir, reward_funcs=[parity], args=trainer_args(f"{out_dir}/b"),
                train_dataset=rows).train(resume_from_checkpoint=True)


FSDP_ARGS = {"lora.enabled": False, "train.fsdp": True, "beta": 0.1, "sampling.backend": "sampler",
             "learning_rate": 1e-3}


def run_fsdp(model_dir, out_dir, runs=("a", "b", "c")):
    """Sharded full fine-tuning (FSDP2), sampled by the paged sampler from the gathered weights:
    3 steps uninterrupted (a/), 2 steps + resume to 3 (b/), 2 steps only (c/, for a resume under
    another world size). One process (runs=("a", "d")): the unsharded run these are held to, and
    2 unsharded steps (d/); "c+" / "d+" resume c/ / d/ to 3 steps."""
    from grpo_fast import GRPOTrainer

    rows = prompt_rows(16)
    for name in ("c", "d"):
        if f"{name}+" in runs:  # resume a 2-step run to 3 steps
            GRPOTrainer(model=model_dir, reward_funcs=[parity], args=trainer_args(f"{out_dir}/{name}", **FSDP_ARGS),
                        train_dataset=rows).train(resume_from_checkpoint=True)
    if "d" in runs:
        GRPOTrainer(model=model_dir, reward_funcs=[parity], args=trainer_args(f"{out_dir}/d", max_steps=2,
                                                                              **FSDP_ARGS), train_dataset=rows).train()
    if "a" not in runs:
        return
    GRPOTrainer(model=model_dir, reward_funcs=[parity], args=trainer_args(f"{out_dir}/a", **FSDP_ARGS),
                train_dataset=rows).train()
    if "c" in runs:
        GRPOTrainer(model=model_dir, reward_funcs=[parity], args=trainer_args(f"{out_dir}/c", max_steps=2,
                                                                              **FSDP_ARGS), train_dataset=rows).train()
    if "b" not in runs:
        return
    GRPOTrainer(model=model_dir, reward_funcs=[parity], args=trainer_args(f"{out_dir}/b", max_steps=2, **FSDP_ARGS),
                train_dataset=rows).train()
    # kept alive to the end, as a script's module-level `trainer = GRPOTrainer(...)` is: its sharded
    # model holds the group at exit, and shutdown() must release it (GLOO_THREADS_AT_EXIT=0)
    global LIVE_TRAINER
    LIVE_TRAINER = GRPOTrainer(model=model_dir, reward_funcs=[parity],
                               args=trainer_args(f"{out_dir}/b", **FSDP_ARGS), train_dataset=rows)
    LIVE_TRAINER.train(resume_from_checkpoint=True)


def report_group_at_exit():
    """Registered (in every mode) before the trainer joins the group, so it runs after every exit
    handler the trainer registered (atexit runs them last-in first-out): prints whether the process group
    is still alive then, and how many gloo threads are left (a group destroyed but still held
    somewhere keeps its worker threads, which can abort the rank while the interpreter
    finalizes)."""
    import atexit

    import torch.distributed as tdist

    def gloo_threads() -> int:
        names = []
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    names.append(f.read().strip())
            except OSError:  # the thread ended while we looked
                pass
        return sum("gloo" in n for n in names)

    atexit.register(lambda: print(f"GROUP_ALIVE_AT_EXIT={tdist.is_initialized()} "
                                  f"GLOO_THREADS_AT_EXIT={gloo_threads()}", flush=True))


def run_eval(model_dir, out_file):
    """Eval metrics (4 sampled completions per prompt, paged sampler) of 10 eval prompts, split
    across the ranks; rank 0 writes them as JSON. The script never leaves the group itself, as a
    user's script under torchrun seldom does (the `eval` mode reports the group at exit)."""
    import json

    from grpo_fast import GRPOTrainer
    from grpo_fast import distributed as dist

    args = trainer_args(os.path.dirname(out_file) + "/eval_run", **{"sampling.backend": "sampler",
                                                                   "eval.num_generations": 4, "data.eval_size": 10})
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[parity, length_bonus], args=args,
                          train_dataset=prompt_rows(8), eval_dataset=prompt_rows(10))
    generate, seen = trainer.generator.generate, []

    def counting(prompt_ids, **kwargs):
        seen.extend(prompt_ids)
        return generate(prompt_ids, **kwargs)

    trainer.generator.generate = counting
    metrics = trainer.evaluate()
    metrics["prompts_per_rank"] = dist.all_gather_object(len(seen))
    if dist.is_main():
        with open(out_file, "w") as f:
            json.dump(metrics, f)


def failing_on_rank_1(completions, **_):
    if os.environ.get("RANK") == "1":
        raise ValueError("reward server unreachable from rank 1")
    return [1.0] * len(completions)


def run_reward_error(model_dir, out_dir):
    from grpo_fast import GRPOTrainer

    GRPOTrainer(model=model_dir, reward_funcs=[failing_on_rank_1], args=trainer_args(out_dir),
                train_dataset=prompt_rows(8)).train()


def run_oom(model_dir, out_dir):
    """Rank 1 runs out of memory in its backward pass: both ranks must stop with that error."""
    from grpo_fast import GRPOTrainer
    from grpo_fast.train import update

    real = update.policy_loss

    def policy_loss(*args, **kwargs):
        if os.environ.get("RANK") == "1":
            raise MemoryError("out of memory on rank 1 (simulated)")
        return real(*args, **kwargs)

    update.policy_loss = policy_loss
    GRPOTrainer(model=model_dir, reward_funcs=[parity], args=trainer_args(out_dir),
                train_dataset=prompt_rows(8)).train()


class EveryTurnCalls:
    """Reads every model turn as a call of `poke` (a random model writes no JSON); turns end at
    frequent characters, so trajectories go through tool turns."""

    stop_strings = (">", "5", "7", "a", "e")

    def parse(self, text):
        from grpo_fast.rollout import ParsedTurn, ToolCall

        return ParsedTurn(text, [ToolCall("poke", {})], None)


class Counter:
    """One per rollout: counts its pokes; get_reward is that count."""

    def __init__(self):
        self.n = 0

    def reset(self, **row):
        return None

    def poke(self) -> str:
        """Poke the counter."""
        self.n += 1
        return str(self.n)

    def get_reward(self):
        return float(self.n)


def run_tools(model_dir, out_dir):
    """One multi-turn step on the paged sampler with an environment per rollout."""
    from grpo_fast import GRPOTrainer

    args = trainer_args(out_dir, max_steps=1, **{"sampling.backend": "sampler", "sampling.max_completion_length": 60,
                                                 "sampling.max_prompt_length": 1024, "lora.lora_dropout": 0.0,
                                                 "tools.tool_call_parser": "dist_worker:EveryTurnCalls",
                                                 "max_tool_calling_iterations": 2})
    GRPOTrainer(model=model_dir, reward_funcs=[parity], args=args, train_dataset=prompt_rows(8),
                environment_factory=Counter).train()


if __name__ == "__main__":
    mode, model_dir, target = sys.argv[1:4]
    report_group_at_exit()
    if mode == "grads":
        grads = step_grads(model_dir)
        from grpo_fast import distributed as dist

        if dist.is_main():
            torch.save(grads, target)
    elif mode == "resume":
        run_resume(model_dir, target)
    elif mode == "fsdp":
        run_fsdp(model_dir, target, *([tuple(sys.argv[4].split(","))] if len(sys.argv) > 4 else []))
    elif mode == "eval":
        run_eval(model_dir, target)
    elif mode == "reward_error":
        run_reward_error(model_dir, target)
    elif mode == "oom":
        run_oom(model_dir, target)
    elif mode == "tools":
        run_tools(model_dir, target)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
