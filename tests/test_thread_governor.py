"""ThreadGovernor: the thread count follows the cores other processes left free, measured from
/proc/stat (fed here as text, so no test depends on this machine's load, except the last, which
makes a real load)."""

import os
import subprocess
import sys
import time

import pytest
import torch

from grpo_fast.config import load_config
from grpo_fast.thread_governor import LoadMeter, ThreadGovernor, busy_seconds, paced
from test_loss_training import CaptureGrads, policy_with_lora, rollout_for, run_update
from test_train_loop import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_threads"))


def stat_text(per_cpu: list[tuple[int, int, int]]) -> str:
    """/proc/stat with (user, nice, idle) ticks per core; system, irq, ... fixed small values."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {u} {n} 5 {idle} 7 1 2 3 0 0" for i, (u, n, idle) in enumerate(per_cpu)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 99"]) + "\n"


def test_busy_seconds_counts_busy_fields_of_the_allowed_cores_only():
    text = stat_text([(100, 50, 900), (300, 0, 10), (1000, 1000, 0)])
    # busy = user + nice + system(5) + irq(1) + softirq(2) + steal(3); idle and iowait(7) excluded
    assert busy_seconds(text, {0, 1}, 100.0) == pytest.approx((161 + 311) / 100)
    assert busy_seconds(text, {2}, 100.0) == pytest.approx(2011 / 100)


class FakeMachine:
    """A clock, per-core busy ticks and this process's CPU time, advanced by hand."""

    def __init__(self, cores: int):
        self.now, self.own, self.ticks = 0.0, 0.0, [0] * cores

    def run(self, seconds: float, own_cores: float, others_cores: float):
        self.now += seconds
        self.own += own_cores * seconds
        per_core = (own_cores + others_cores) * seconds * 100 / len(self.ticks)
        self.ticks = [t + round(per_core) for t in self.ticks]

    def meter(self) -> LoadMeter:
        m = LoadMeter(read=lambda: stat_text([(t, 0, 0) for t in self.ticks]), clock=lambda: self.now,
                      own_cpu_s=lambda: self.own)
        m.cpus, m.ticks_per_s = set(range(len(self.ticks))), 100.0
        return m


def blocks(gov: ThreadGovernor, machine: FakeMachine, others: list[float], seconds: float = 3.0) -> list[int]:
    used = []
    for load in others:
        with gov.measure():
            used.append(torch.get_num_threads())
            machine.run(seconds, own_cores=used[-1], others_cores=load)
    return used


def test_follows_a_load_that_comes_and_goes():
    before = torch.get_num_threads()
    machine = FakeMachine(2)
    gov = ThreadGovernor(2, meter=machine.meter())
    used = blocks(gov, machine, [0.0, 0.0, 1.0, 1.0, 1.0, 0.05, 0.0])
    # idle: 2 threads; a busy process starts during block 2: block 3 on 1 thread; it ends during
    # block 5 (0.05 cores left: noise): back to 2
    assert used == [2, 2, 2, 1, 1, 1, 2]
    assert gov.describe()["blocks_per_thread_count"] == {1: 3, 2: 4}
    assert torch.get_num_threads() == before


def test_more_cores_keep_the_free_ones():
    machine = FakeMachine(16)
    gov = ThreadGovernor(16, meter=machine.meter())
    assert blocks(gov, machine, [3.0, 3.0, 0.5, 15.9]) == [16, 13, 13, 15]
    assert gov.choice == 1  # others took every core: one thread, never zero
    assert ThreadGovernor(4, meter=machine.meter()).threads_for(0.0) == 4  # never above torch's count


def test_blocks_too_short_to_measure_keep_the_choice():
    machine = FakeMachine(2)
    gov = ThreadGovernor(2, meter=machine.meter())
    blocks(gov, machine, [1.0])
    assert gov.choice == 1
    blocks(gov, machine, [0.0], seconds=0.05)  # 5 ticks: not enough to tell
    assert gov.choice == 1


def test_restores_torch_threads_when_the_block_raises():
    before = torch.get_num_threads()
    machine = FakeMachine(2)
    gov = ThreadGovernor(2, meter=machine.meter())
    gov.choice = 1
    with pytest.raises(RuntimeError):
        with gov.measure():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_off_without_proc_stat_or_with_one_thread():
    assert not ThreadGovernor(2, meter=LoadMeter(read=lambda: None)).enabled
    assert not ThreadGovernor(1).enabled
    with paced(None):
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_measures_a_real_busy_process():
    meter = LoadMeter()
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)  # its start-up
        meter.start()
        time.sleep(0.8)  # this process idle: what is measured is the other one
        others = meter.stop()
    finally:
        proc.wait()
    assert others is not None and others >= 0.5  # the spinning process held most of a core


def test_a_load_seen_between_blocks_sets_the_next_block():
    machine = FakeMachine(2)
    gov = ThreadGovernor(2, meter=machine.meter())
    machine.run(10.0, own_cores=2.0, others_cores=1.0)  # the first sampling phase, beside a busy process
    assert blocks(gov, machine, [1.0]) == [1]  # the governor was made before it: its first block knows
    machine.run(0.1, own_cores=0.0, others_cores=0.0)
    assert blocks(gov, machine, [0.0]) == [1]
    machine.run(10.0, own_cores=2.0, others_cores=1.0)  # a sampling phase beside a busy process
    assert blocks(gov, machine, [1.0]) == [1]  # the first training block already avoids the collapse
    machine.run(0.01, own_cores=0.0, others_cores=0.0)  # a gap too short to measure: keeps the block's
    assert blocks(gov, machine, [0.0]) == [1]
    assert gov.choice == 2


def test_a_phase_of_short_steps_follows_the_load_window_by_window():
    """The sampler's use: steps of 1/16 s, each too short to measure; tick() between them
    re-decides once a window of >= MIN_WALL_S (4 steps here) has passed. A load that starts at
    step 10 is seen by the window of steps 8-11 (half of it busy: 0.6 cores), so steps 12-23 run
    on 1 thread; it ends at step 20, the window of steps 20-23 sees it, and the rest run on 2.
    Torch's count is restored after the phase, and a tick outside a phase changes nothing."""
    before = torch.get_num_threads()
    machine = FakeMachine(2)
    gov = ThreadGovernor(2, meter=machine.meter())
    used = []
    with gov.phase():
        for load in [0.0] * 10 + [1.0] * 10 + [0.0] * 10:
            gov.tick()
            used.append(torch.get_num_threads())
            machine.run(0.0625, own_cores=used[-1], others_cores=load)
    assert used == [2] * 12 + [1] * 12 + [2] * 6
    assert torch.get_num_threads() == before
    gov.choice = 1
    machine.run(1.0, own_cores=0.0, others_cores=0.0)
    gov.tick()
    assert torch.get_num_threads() == before and gov.choice == 1


def test_the_sampler_steps_on_the_governor_s_threads():
    """Sampler(threads=governor): beside a load (here faked) its decode steps run on the cores
    left free, its output is the same as on torch's count, and torch's count is back after;
    threads=True makes a governor of its own on the CPU, False none."""
    from test_sampler import random_prompts, tiny_model

    from grpo_fast.sampler import SamplingParams
    from grpo_fast.torch_threads import set_torch_threads

    model = tiny_model("llama", seed=3)
    prompts = random_prompts((12, 17), seed=1)
    params = SamplingParams(n=3, max_tokens=6, temperature=0)
    ambient = torch.get_num_threads()  # whatever the tests before left (CI's run had 1 here)
    set_torch_threads(2)  # two for the governor to choose from, on any machine
    try:
        _sampler_beside_a_faked_load(model, prompts, params)
    finally:
        set_torch_threads(ambient)


def _sampler_beside_a_faked_load(model, prompts, params):
    from grpo_fast.sampler import Sampler

    before = torch.get_num_threads()
    machine = FakeMachine(2)
    machine.run(5.0, own_cores=1.0, others_cores=1.0)  # a busy process since the governor's creation
    gov = ThreadGovernor(2, meter=machine.meter())
    machine.run(5.0, own_cores=1.0, others_cores=1.0)
    sampler = Sampler(model, None, threads=gov)
    seen = []
    real = sampler.runner.decode
    sampler.runner.decode = lambda *a: seen.append(torch.get_num_threads()) or real(*a)
    busy = sampler.generate(prompts, params)
    assert seen and set(seen) == {1} and torch.get_num_threads() == before
    assert Sampler(model, None).threads is not None and Sampler(model, None, threads=False).threads is None
    plain = Sampler(model, None, threads=False).generate(prompts, params)
    assert [[c.token_ids for c in g.completions] for g in busy] == [[c.token_ids for c in g.completions] for g in plain]
    with pytest.raises(ValueError, match="threads must be"):
        Sampler(model, None, threads=2)


def test_update_follows_the_thread_governor(tiny, monkeypatch):
    """With a busy neighbour measured (one core of two taken), every scoring and training pass runs
    on one torch thread, the gradient is the same as on torch's count, the step logs the load, and
    torch's thread count is back afterwards."""
    import grpo_fast.train.policy_loss as policy_loss_module
    import grpo_fast.train.update as update_module
    from grpo_fast.train.model import build_scheduler, policy_modules, trainable_parameters

    class BusyNeighbour:  # a LoadMeter that always measures one core taken by others
        cpus, available = {0, 1}, True

        def start(self):
            return 1.0

        def stop(self):
            return 1.0

    seen = []
    for name, module in (("policy_loss", update_module), ("completion_hidden", policy_loss_module)):
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            seen.append(torch.get_num_threads())
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    model, tok = policy_with_lora(tiny)
    rollout = rollout_for(model, tok)
    before = torch.get_num_threads()
    _, plain, _, _ = run_update(model, tok, {"loss.beta": 0.05}, rollout=rollout)
    assert seen and all(n == before for n in seen)
    seen.clear()
    cfg = load_config(None, {"sampling.max_completion_length": 8, "loss.beta": 0.05})
    params = trainable_parameters(model)
    opt = CaptureGrads(params)
    governor = ThreadGovernor(2, meter=BusyNeighbour())
    m = update_module.update_policy(policy_modules(model), opt, build_scheduler(opt, cfg.train, 10), params, rollout,
                                    cfg, {}, echo=lambda _: None, threads=governor)
    assert len(seen) >= 2 and all(n == 1 for n in seen)  # the reference scoring pass and the update
    assert m["cpu/threads"] == 1.0 and m["cpu/others_cores"] == 1.0
    assert torch.get_num_threads() == before
    for a, b in zip(plain[0], opt.seen[0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
