"""Data-parallel GRPO (grpo_fast.distributed, train/data_parallel.py): the helpers are the
identity in one process; two gloo ranks on the CPU give the one-process gradient of the whole
batch for every loss type and batch statistic; a 2-rank run resumes exactly; a reward error on
rank 1 ends both ranks with that error, quickly. Each multi-process test launches the ranks as
torchrun would (environment variables) with a hard timeout, so a hang fails instead of blocking."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_fast import distributed as dist
from test_train_loop import make_tiny_model

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_dist"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], *, nproc: int = 2, timeout: float = 150.0, collective_timeout: float = 60.0):
    """Run dist_worker.py as `nproc` ranks; -> [(returncode, stdout + stderr)] per rank, after at
    most `timeout` seconds (then every rank is killed and the test fails). Once more on another
    port if the one picked was taken in between (another process on the machine)."""
    results = _launch_once(args, nproc, timeout, collective_timeout)
    if any(rc != 0 and "address already in use" in out.lower() for rc, out in results):
        results = _launch_once(args, nproc, timeout, collective_timeout)
    for _, out in results:  # every rank, a failing one included, left no group behind
        assert CLEAN_EXIT in out and "terminate called" not in out, out[-3000:]
    return results


# What dist_worker.report_group_at_exit prints when the group is gone and its gloo threads joined
# by the time the interpreter finalizes. A group destroyed but still referenced (DTensor's caches,
# a sharded model still alive) keeps its threads, and one of them releasing the last collective's
# tensors during finalization sometimes aborts the rank with `terminate called without an active
# exception` (pytorch#179291); counting the threads catches the leak on every run, not only the
# rare run that aborts.
CLEAN_EXIT = "GROUP_ALIVE_AT_EXIT=False GLOO_THREADS_AT_EXIT=0"


def _launch_once(args, nproc, timeout, collective_timeout):
    port = _free_port()
    procs = []
    for r in range(nproc):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", dist.TIMEOUT_ENV: str(collective_timeout)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env, cwd=HERE,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0][-2000:] for p in procs]
        pytest.fail(f"ranks still running after {timeout:.0f}s (a hang):\n" + "\n----\n".join(logs))
    return results


# ---------------------------------------------------------------- one process: the identity


def test_helpers_are_the_identity_in_one_process():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.all_reduce_sum(2.5) == 2.5 and dist.all_reduce_sum(7) == 7
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t) is t
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object("x") == "x"
    assert dist.shard_range(5) == slice(0, 5)
    assert dist.rank_seed(123) == 123
    assert dist.on_main("testing", lambda a, b: a + b, 2, b=3) == 5
    with pytest.raises(KeyError, match="raw"):  # one process: the error passes through untouched
        with dist.fail_together("testing"):
            raise KeyError("raw")
    assert dist.init() == 1  # no torchrun environment: nothing to join


def test_release_at_shutdown_calls_live_owners_once_and_keeps_none_alive():
    """Owners are held weakly (registering a trainer must not keep it, and its model, alive) and
    each live owner's release runs once, before the group goes (shutdown() calls this first)."""
    import gc

    class Owner:
        pass

    released = []
    live, gone = Owner(), Owner()
    dist.release_at_shutdown(live, lambda o: released.append(("live", o)))
    dist.release_at_shutdown(gone, lambda o: released.append(("gone", o)))
    del gone
    gc.collect()
    dist._release_group_holders()
    dist._release_group_holders()  # idempotent: shutdown() may run twice (explicit, then atexit)
    assert released == [("live", live)]


def test_cpu_ranks_each_keep_their_share_of_the_cores(monkeypatch):
    import os

    kept = {}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: kept.update(cores=list(cores)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: kept.update(threads=n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)  # torch's count before the split
    monkeypatch.setattr(dist, "local_rank", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert dist.pin_cpu_rank() == [2, 3] and kept == {"cores": [2, 3], "threads": 2}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 6 cores do not split into 4: left alone
    kept.clear()
    assert dist.pin_cpu_rank() is None and kept == {}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv(dist.PIN_ENV, "0")
    assert dist.pin_cpu_rank() is None and kept == {}


def test_collective_timeout_env_override(monkeypatch):
    monkeypatch.delenv(dist.TIMEOUT_ENV, raising=False)
    assert dist.timeout_s(None) == dist.DEFAULT_TIMEOUT_S and dist.timeout_s(30) == 30
    monkeypatch.setenv(dist.TIMEOUT_ENV, "12.5")
    assert dist.timeout_s(30) == 12.5
    monkeypatch.setenv(dist.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=dist.TIMEOUT_ENV):
        dist.timeout_s(30)


def test_collective_timeout_config_field_and_trl_name():
    from grpo_fast import GRPOConfig
    from grpo_fast.errors import ConfigError

    assert GRPOConfig(output_dir="x").train.collective_timeout_s == dist.DEFAULT_TIMEOUT_S
    assert GRPOConfig(output_dir="x", ddp_timeout=1234).train.collective_timeout_s == 1234.0  # TRL's name
    with pytest.raises(ConfigError, match="train.collective_timeout_s"):
        GRPOConfig(output_dir="x", **{"train.collective_timeout_s": 0})


def test_prompts_per_step_must_split_into_whole_groups(monkeypatch):
    from grpo_fast.errors import ConfigError
    from grpo_fast.train import data_parallel

    monkeypatch.setattr(dist, "world_size", lambda: 4)
    with pytest.raises(ConfigError, match=r"train.prompts_per_step: 6 prompts .* 4 ranks"):
        data_parallel.check_divisible(6)
    data_parallel.check_divisible(8)


def test_shard_ranges_cover_the_items_in_order(monkeypatch):
    for W in (1, 2, 3, 4):
        for n in (0, 1, 3, 7, 8):
            monkeypatch.setattr(dist, "world_size", lambda W=W: W)
            cuts = []
            for r in range(W):
                monkeypatch.setattr(dist, "rank", lambda r=r: r)
                cuts.extend(range(n)[dist.shard_range(n)])
            assert cuts == list(range(n))


# ---------------------------------------------------------------- two gloo ranks


def test_two_rank_gradient_equals_the_one_process_gradient(tiny, tmp_path):
    """Same completions (a generator that depends on the prompt only), rewards scored on each
    rank: the 2-rank step's gradient (its rows' share, all-reduced) is the one-process gradient
    of the whole batch, for every loss type and every batch statistic (scale_rewards batch, GDPO,
    top-entropy threshold, dynamic sampling, β with a reference pass, micro-batches)."""
    import dist_worker

    results = launch(["grads", tiny, tmp_path / "grads.pt"])
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    two = torch.load(tmp_path / "grads.pt")
    one = dist_worker.step_grads(str(tiny))
    assert set(two) == set(one) == set(dist_worker.CASES) | {"full_finetuning", "fsdp_full_finetuning", "fsdp_uneven_shares"}
    for case in one:
        assert any(float(g.abs().max()) > 0 for g in one[case]), case  # a real gradient, not zeros
        for g1, g2 in zip(one[case], two[case]):
            torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7, msg=lambda m, c=case: f"{c}: {m}")


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_two_rank_run_resumes_exactly(tiny, tmp_path):
    """3 steps uninterrupted vs 2 steps, checkpoint, resume to 3 (LoRA dropout on: each rank's
    RNG must be restored): the same adapter and the same step-3 metrics."""
    results = launch(["resume", tiny, tmp_path])
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3]  # rank 0 alone wrote the logs
    for key in ("loss", "reward", "grad_norm", "num_tokens"):
        assert ma[-1][key] == mb[-1][key], key
    assert (tmp_path / "b" / "checkpoints").is_dir()


def _model(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "model.safetensors"))


def test_fsdp_sharded_full_finetuning_equals_one_process_and_resumes_exactly(tiny, tmp_path):
    """Full fine-tuning sharded across 2 ranks (FSDP2; β > 0: the reference is a sharded frozen
    copy), sampled by the paged sampler from the gathered weights: 3 steps give the one-process
    unsharded run's model to fp32 rounding, 2 steps + a checkpoint + resume give the
    uninterrupted 2-rank run's model exactly, and one process resumes the 2-rank checkpoint
    (and 2 sharded ranks the one-process checkpoint) to the same model.
    The saved model is whole (every weight)."""
    import dist_worker

    results = launch(["fsdp", tiny, tmp_path / "two"], timeout=240)
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    assert "sharded across 2 ranks (FSDP2)" in results[0][1]
    dist_worker.run_fsdp(str(tiny), tmp_path / "one", runs=("a", "d"))
    one, a, b = _model(tmp_path / "one" / "a"), _model(tmp_path / "two" / "a"), _model(tmp_path / "two" / "b")
    start = _model_file(tiny)
    assert set(one) == set(a) == set(b) == set(start)
    assert all(not torch.equal(a[k], start[k]) for k in start)  # every weight trained
    for k in one:
        torch.testing.assert_close(a[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
        assert torch.equal(b[k], a[k]), k
    ma, m1 = _metrics(tmp_path / "two" / "a"), _metrics(tmp_path / "one" / "a")
    assert [m["step"] for m in ma] == [1, 2, 3]
    assert ma[-1]["kl"] == pytest.approx(m1[-1]["kl"], rel=1e-3) and ma[-1]["kl"] > 0
    # the 2-rank sharded checkpoint of step 2, resumed by one process (whole weights, optimizer
    # state by parameter name): step 3 ends where the uninterrupted runs do
    dist_worker.run_fsdp(str(tiny), tmp_path / "two", runs=("c+",))
    # and the other way: one process's (unsharded, optimizer state by index) checkpoint of step
    # 2, resumed by 2 sharded ranks
    results = launch(["fsdp", tiny, tmp_path / "one", "d+"], timeout=120)
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    for resumed in (_model(tmp_path / "two" / "c"), _model(tmp_path / "one" / "d")):
        for k in one:
            torch.testing.assert_close(resumed[k], one[k], rtol=1e-4, atol=1e-6, msg=k)


def _model_file(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_two_rank_eval_splits_the_prompts_and_gives_the_one_process_metrics(tiny, tmp_path):
    """10 eval prompts x 4 sampled completions: each rank evaluates its 5 and the metrics
    gathered are one process's (each prompt's completions are seeded by its index in the set).
    The worker never calls shutdown(): the group init() made is left at exit all the same, and
    its gloo threads end with it (launch checks every rank's exit; a group alive at exit, or
    destroyed but still held, sometimes ends a gloo rank with SIGABRT). The trainer imports
    torch._dynamo after init(), which used to hold the group through
    torch.distributed.nn.functional's defaults."""
    import dist_worker

    results = launch(["eval", tiny, tmp_path / "two.json"])
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    dist_worker.run_eval(str(tiny), str(tmp_path / "one.json"))
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert "eval/accuracy/pass@4" in one and "eval/completions/mean_length" in one
    assert two.pop("prompts_per_rank") == [5, 5] and one.pop("prompts_per_rank") == [10]
    assert two.keys() == one.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-9), key


def test_reward_error_on_rank_1_ends_both_ranks_with_its_message(tiny, tmp_path):
    t0 = time.monotonic()
    results = launch(["reward_error", tiny, tmp_path / "run"], timeout=90, collective_timeout=300)
    took = time.monotonic() - t0
    (rc0, out0), (rc1, out1) = results
    assert rc0 != 0 and rc1 != 0
    assert "reward server unreachable from rank 1" in out1
    assert "rank 1 of 2 failed while sampling and scoring its groups" in out0
    assert "reward server unreachable from rank 1" in out0
    assert took < 90  # not the 300 s collective timeout: the error flag ended rank 0


def test_torchrun_launches_the_cli(tiny, tmp_path):
    """`torchrun --nproc-per-node 2 -m grpo_fast train ...`: both ranks train, rank 0 alone writes
    the logs, the adapter and the console's last line."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "grpo_fast",
           "train", "--model.name_or_path", str(tiny), "--output_dir", str(out), "--max_steps", "2",
           "--prompts_per_step", "2", "--num_generations", "2", "--max_completion_length", "4", "--eval_size", "3",
           "--train_size", "10", "--backend", "hf", "--progress", "false", "--lora.r", "2", "--report_to", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", dist.TIMEOUT_ENV: "60"}
    try:
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun still running after 150 s: {str(exc.stdout)[-2000:]} {str(exc.stderr)[-2000:]}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("eval accuracy: before") == 1  # rank 0 speaks for the run
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_out_of_memory_on_rank_1_ends_both_ranks(tiny, tmp_path):
    results = launch(["oom", tiny, tmp_path / "run"], timeout=90, collective_timeout=300)
    (rc0, out0), (rc1, out1) = results
    assert rc0 != 0 and rc1 != 0
    assert "out of memory" in out1.lower()  # rank 1: the trainer's out-of-memory report
    assert "rank 1 of 2 failed while computing its loss and gradient: MemoryError: out of memory on rank 1" in out0


def test_two_rank_tool_rollouts_sample_what_one_process_samples(tiny, tmp_path):
    """Multi-turn under torchrun: each rank runs its groups' tools and environments; the sampler
    seeds each completion by its group's index in the whole step, so the first step's rollouts
    (rewards, tool calls, environment rewards, lengths) are one process's exactly."""
    one = launch(["tools", tiny, tmp_path / "one"], nproc=1)
    two = launch(["tools", tiny, tmp_path / "two"])
    assert all(rc == 0 for rc, _ in one + two), (one + two)[0][1][-3000:] + two[-1][1][-3000:]
    m1, m2 = _metrics(tmp_path / "one")[0], _metrics(tmp_path / "two")[0]
    assert m1["tools/call_frequency"] > 0 and m1["tools/turns_mean"] > 1
    for key in ("reward", "rewards/Counter/mean", "rewards/parity/mean", "tools/call_frequency", "tools/turns_mean",
                "completions/mean_length", "completion_tokens"):
        assert m2[key] == m1[key], key


def test_the_memory_plan_counts_one_ranks_share(monkeypatch):
    """Under torchrun each rank samples and trains B / N prompts: its plan is that share's."""
    from grpo_fast import memory
    from grpo_fast.config import load_config
    from grpo_fast.train.data_parallel import rank_config

    cfg = load_config(None, {"train.prompts_per_step": 8, "sampling.num_generations": 4})
    shape = memory.ModelShape(layers=2, hidden=64, intermediate=128, q_heads=4, kv_heads=2, head_dim=16, vocab=100,
                              tied=True)
    one = memory.plan(rank_config(cfg), shape=shape)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    share = rank_config(cfg)
    assert share.train.prompts_per_step == 4 and cfg.train.prompts_per_step == 8  # a copy
    two = memory.plan(share, shape=shape)
    assert two.phases["sampling"] < one.phases["sampling"] and two.phases["training"] < one.phases["training"]
    assert two.phases["training"] == memory.plan(load_config(None, {"train.prompts_per_step": 4,
                                                                    "sampling.num_generations": 4}),
                                                 shape=shape).phases["training"]
