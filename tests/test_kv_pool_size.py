"""The KV pool the trainer asks for (grpo_fast.memory.shared_pool_tokens): each group's prompt
counted once, as the paged sampler holds it. Checked against the block manager's own count, and
end to end: a sampler with exactly that pool runs a whole step without a preemption."""

import inspect

import pytest
import torch

from grpo_fast import memory
from grpo_fast.kv import NativeBlockManager, PyBlockManager
from grpo_fast.kv.block_manager import _Native
from grpo_fast.sampler import Sampler, SamplingParams
from test_sampler import tiny_model

MANAGERS = [PyBlockManager] + ([NativeBlockManager] if _Native is not None else [])


def simulated_peak(cls, prompt: int, completion: int, generations: int, block_size: int) -> int:
    """Blocks in use at the peak when one group is prefilled, forked and decoded as the sampler
    does: the parent dropped after the fork, then one token per sequence per step."""
    bm = cls(4096, block_size)
    bm.allocate(0, list(range(prompt)))
    children = list(range(1, generations + 1))
    bm.fork(0, children)
    bm.free(0)
    peak = 4096 - bm.num_free_blocks
    for _ in range(completion):
        for c in children:
            bm.append_token(c)
        peak = max(peak, 4096 - bm.num_free_blocks)
    return peak


@pytest.mark.parametrize("cls", MANAGERS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_group_blocks_is_what_the_block_manager_holds(cls, block_size):
    for generations in (1, 3, 8):
        for completion in (1, 5, block_size, 2 * block_size + 3):
            peaks = []
            for prompt in range(1, 3 * block_size + 2):
                peak = simulated_peak(cls, prompt, completion, generations, block_size)
                assert memory.group_blocks(prompt, completion, generations, block_size) == peak, \
                    (prompt, completion, generations)
                peaks.append(peak)
                # the worst over every prompt length up to this one (prompts in a step differ)
                assert memory.group_peak_blocks(prompt, completion, generations, block_size) == max(peaks)


def test_the_plan_and_the_sampler_agree_on_the_block_size():
    assert inspect.signature(Sampler).parameters["block_size"].default == memory.SAMPLER_BLOCK_SIZE


def test_long_prompts_need_a_quarter_of_the_unshared_pool():
    shared = memory.shared_pool_tokens(4, 8, 1088, 128)  # the p1024 benchmark's step
    unshared = 4 * 8 * (1088 + 128)
    assert shared < unshared / 4
    assert shared >= 4 * 1088 + 4 * 8 * 128  # every prompt once and every completion token


def test_a_pool_of_that_size_runs_a_step_without_preempting():
    """Three groups of different prompt lengths, every completion forced to full length: the
    computed pool is enough (no preemption), and a pool short of it by a group's completions is not."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    prompts = [torch.randint(3, 120, (n,)).tolist() for n in (37, 20, 50)]
    groups, G, C, bs = len(prompts), 4, 23, 8
    tokens = memory.shared_pool_tokens(groups, G, max(map(len, prompts)), C, block_size=bs)
    params = SamplingParams(n=G, max_tokens=C, ignore_eos=True, temperature=1.0, seed=3)
    enough = Sampler(model, None, block_size=bs, kv_budget=f"{tokens} tokens")
    out = enough.generate(prompts, params)
    assert enough.stats.preemptions == 0
    assert all(len(c.token_ids) == C for g in out for c in g.completions)
    short = Sampler(model, None, block_size=bs, kv_budget=f"{tokens - groups * G * C} tokens")
    again = short.generate(prompts, params)
    assert short.stats.preemptions > 0  # the sampler does count them: the check above could fail
    assert [[c.token_ids for c in g.completions] for g in again] == [[c.token_ids for c in g.completions] for g in out]


def test_the_trainer_asks_for_the_shared_pool(tmp_path):
    """GRPOTrainer sizes its sampler's pool by the step (or an eval batch, when larger) with each
    group's prompt once: the longest known prompt, this run's B x G and completion lengths."""
    datasets = pytest.importorskip("datasets")
    from grpo_fast import GRPOConfig, GRPOTrainer
    from test_train_loop import make_tiny_model

    tiny = make_tiny_model(tmp_path / "tiny")
    rows = [{"prompt": "x" * n, "answer": "1"} for n in (30, 45, 12, 8)]
    cfg = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, num_generations=4, per_device_train_batch_size=8,
                     max_completion_length=24, report_to="none", disable_tqdm=True,
                     **{"sampling.backend": "sampler", "lora.r": 2, "lora.lora_alpha": 4, "eval_before": False})

    def reward(completions, **kwargs):
        return [0.0] * len(completions)

    def pool_tokens(trainer):
        return trainer.generator.sampler.num_blocks * trainer.generator.sampler.block_size

    trainer = GRPOTrainer(model=str(tiny), reward_funcs=[reward], args=cfg, train_dataset=datasets.Dataset.from_list(rows))
    longest = max(len(e.ids) for e in trainer.stream.items)
    assert pool_tokens(trainer) == memory.shared_pool_tokens(2, 4, longest, 24)
    # an eval batch of many single completions needs more than the step: the pool follows it
    eval_rows = [{"prompt": "y" * 5, "answer": "1"}] * 40
    cfg.eval.num_generations = 1
    trainer = GRPOTrainer(model=str(tiny), reward_funcs=[reward], args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                          eval_dataset=datasets.Dataset.from_list(eval_rows))
    assert pool_tokens(trainer) == memory.shared_pool_tokens(40, 1, longest, 24)
    assert pool_tokens(trainer) > memory.shared_pool_tokens(2, 4, longest, 24)
