"""The one module that knows the world size: process-group setup, reductions, rank-0 I/O.

Launched by torchrun (`torchrun --nproc-per-node N -m grpo_fast train ...`) each process is one
rank with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment; `init()`
joins the group (NCCL on CUDA, one rank per device, the device being cuda:LOCAL_RANK; gloo on
the CPU). Without those variables (a plain `python` run) nothing is initialized and every helper
is the identity of one process: all_reduce_sum(x) = x, all_gather_object(x) = [x], shard_range(n)
= slice(0, n). The training code calls these helpers unconditionally: one path, world size 1
included.

Collective timeout: every collective waits at most `collective_timeout_s` (train.collective_
timeout_s, default 600 s; the environment variable GRPO_FAST_COLLECTIVE_TIMEOUT_S overrides it)
for the other ranks, then raises (gloo) or aborts the process (NCCL's watchdog). It bounds the
wait for a rank that died without a word; it must exceed the longest stretch one rank can work
alone (a sampling phase, a checkpoint save).

Failures: code that may fail on one rank only (sampling, reward functions, forward / backward)
runs inside `fail_together(what)`. On leaving that block every rank all-reduces an error flag;
when any rank failed, the failing rank re-raises its own exception and every other rank raises
RankFailed naming that rank and its error. So a reward function raising on rank 1 ends every
rank with rank 1's message at the next step boundary, not after a collective timeout. (A block
must hold no collective itself: a rank that failed before it would leave the others waiting.)
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import pickle

import torch
import torch.distributed as tdist

from grpo_fast.errors import TrainingStopped
from grpo_fast.torch_threads import set_torch_threads

__all__ = ["RankFailed", "init", "world_size", "rank", "local_rank", "is_main", "all_reduce_sum",
           "all_gather_object", "broadcast_object", "barrier", "shard_range", "fail_together",
           "all_reduce_grads", "broadcast_tensors", "rank_seed", "seed_rank", "on_main", "shutdown",
           "release_at_shutdown"]

TIMEOUT_ENV = "GRPO_FAST_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
_BUCKET_ELEMENTS = 1 << 24  # gradients all-reduced in flat fp32 buckets of at most 16M elements (64 MiB)


class RankFailed(TrainingStopped):
    """Another rank failed; the message names it and carries its error."""


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if _active() else 1


def rank() -> int:
    return tdist.get_rank() if _active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if _active() else 0


def is_main() -> bool:
    return rank() == 0


def timeout_s(configured: float | None = None) -> float:
    """The collective timeout in seconds: GRPO_FAST_COLLECTIVE_TIMEOUT_S, else `configured`, else 600."""
    env = os.environ.get(TIMEOUT_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}: expected seconds as a number, got {env!r}") from None
        if value <= 0:
            raise ValueError(f"{TIMEOUT_ENV}: must be > 0 seconds, got {env!r}")
        return value
    return float(configured) if configured else DEFAULT_TIMEOUT_S


def init(collective_timeout_s: float | None = None) -> int:
    """Join the process group torchrun describes (idempotent; a group the caller made is kept);
    returns the world size. No WORLD_SIZE in the environment, or WORLD_SIZE=1: one process,
    nothing to join."""
    if _active():
        return world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {var} is not set: launch with torchrun "
                             f"(torchrun --nproc-per-node N -m grpo_fast train ...)")
    timeout = datetime.timedelta(seconds=timeout_s(collective_timeout_s))
    # Import before the group exists: torch.distributed.nn.functional binds `group=group.WORLD`
    # as its functions' default when imported, so importing it after init (torch._dynamo does,
    # which peft, the TRL integration and torch.compile import) holds the default group for the
    # life of the process. destroy_process_group() then leaves it (and its gloo worker threads)
    # alive, and a worker thread still releasing the last collective's tensors while the
    # interpreter finalizes aborts the rank with `terminate called without an active exception`.
    import torch.distributed.nn.functional  # noqa: F401
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one rank per device
        tdist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        tdist.init_process_group("gloo", timeout=timeout)
        pin_cpu_rank()
    # Leave the group we made at exit (which joins its worker threads): a script under torchrun
    # seldom calls shutdown(), and a group alive at interpreter exit aborts it the same way
    # (pytorch#190489).
    atexit.register(shutdown)
    return world_size()


PIN_ENV = "GRPO_FAST_PIN_CPUS"


def pin_cpu_rank() -> list[int] | None:
    """CPU ranks of one node: rank LOCAL_RANK keeps its own contiguous share of the cores this
    process may use (and torch that many threads), so the ranks neither migrate onto each
    other's cores nor oversubscribe them. Only when the cores split evenly across
    LOCAL_WORLD_SIZE; GRPO_FAST_PIN_CPUS=0 turns it off. Returns the cores kept, or None."""
    if os.environ.get(PIN_ENV, "1") == "0" or not hasattr(os, "sched_getaffinity"):
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    cores = sorted(os.sched_getaffinity(0))
    if local < 2 or len(cores) % local:
        return None
    k = len(cores) // local
    mine = cores[local_rank() * k:(local_rank() + 1) * k]
    os.sched_setaffinity(0, mine)
    set_torch_threads(k)
    return mine


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(x):
    """Σ over ranks of a float, an int or a tensor (same type back; a tensor keeps its device and
    dtype, summed in fp64 for floats so that counts stay exact)."""
    if not _active() or world_size() == 1:
        return x
    if isinstance(x, torch.Tensor):
        buf = x.detach().to(_comm_device(), torch.float64 if x.is_floating_point() else torch.int64)
        tdist.all_reduce(buf)
        return buf.to(x.device, x.dtype)
    buf = torch.tensor([x], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(buf)
    return type(x)(buf.item()) if isinstance(x, (int, float)) and not isinstance(x, bool) else buf.item()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled: small objects only)."""
    if not _active() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank src's obj on every rank."""
    if not _active() or world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _active() and world_size() > 1:
        tdist.barrier()


def shard_range(n: int) -> slice:
    """This rank's contiguous share of n items: rank r of W gets [r·n/W, (r+1)·n/W) (the shares
    differ by at most one; a rank may get none when n < W). Rank order = item order, so
    concatenating every rank's share gives the items back in order."""
    W, r = world_size(), rank()
    return slice(r * n // W, (r + 1) * n // W)


def rank_seed(seed: int) -> int:
    """A per-rank seed: `seed` itself on rank 0 (so one process is unchanged), distinct on others."""
    r = rank()
    return seed if r == 0 else (seed + r * 2_654_435_761) % (2**31 - 1)


def seed_rank(seed: int) -> None:
    """Rank r > 0 reseeds python / numpy / torch with rank_seed(seed) (its LoRA dropout masks are
    its own, not rank 0's); rank 0 (one process) keeps its RNG untouched."""
    if rank() == 0:
        return
    import random

    import numpy as np

    random.seed(rank_seed(seed))
    np.random.seed(rank_seed(seed))
    torch.manual_seed(rank_seed(seed))


@contextlib.contextmanager
def fail_together(what: str):
    """Run the block; then every rank learns whether any rank failed in it (see the module
    docstring). One process: exceptions pass through untouched."""
    if not _active() or world_size() == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:  # MemoryError and torch's OOM included; KeyboardInterrupt is torchrun's to handle
        error = exc
    failed = torch.tensor([0.0 if error is None else 1.0], device=_comm_device())
    tdist.all_reduce(failed)
    if failed.item() == 0:
        return
    reports = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    first = next(r for r, msg in enumerate(reports) if msg is not None)
    raise RankFailed(f"rank {first} of {world_size()} failed while {what}: {reports[first]}")


def on_main(what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 only (files, trackers, the hub); its result, or its error,
    reaches every rank (others get RankFailed naming the error)."""
    result = None
    with fail_together(what):
        if is_main():
            result = fn(*args, **kwargs)
    shared = broadcast_object(_picklable(result) if is_main() else None)
    return result if is_main() else shared


def _picklable(x):
    try:
        pickle.dumps(x)
        return x
    except Exception:  # a result only rank 0 needs (a path object is fine, a file handle is not)
        return None


def all_reduce_grads(params) -> None:
    """g ← Σ_ranks g for every parameter, in flat buckets (the loss normalizers are global, so the
    sum is the one-process gradient of the whole batch). A parameter without a gradient on every
    rank keeps grad None; with one on some rank only, the others count zeros. Parameters FSDP
    shards (DTensors, train/sharding.py) are skipped: FSDP reduce-scatters their gradients itself."""
    if not _active() or world_size() == 1:
        return
    params = [p for p in params if p.requires_grad and not hasattr(p, "device_mesh")]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_comm_device())
    tdist.all_reduce(has)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in live:
        bucket.append(p.grad)
        size += p.grad.numel()
        if size >= _BUCKET_ELEMENTS:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1).to(_comm_device(), torch.float32) for g in grads])  # [Σ numel] fp32
    tdist.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def broadcast_tensors(tensors, src: int = 0) -> None:
    """Every tensor ← rank src's values, in place (the trainable weights at setup, so every rank
    starts from the same point whatever it loaded)."""
    if not _active() or world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().to(_comm_device())
            tdist.broadcast(buf, src=src)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)


_RELEASERS: list = []  # weak references to callables that drop what holds the group (release_at_shutdown)


def release_at_shutdown(owner, release) -> None:
    """Call `release(owner)` before shutdown() destroys the group, while `owner` is alive: it drops
    the owner's references that hold the group (an FSDP-sharded model holds it through its mesh,
    its parameters and their optimizer state). Held only weakly: registering keeps nothing alive."""
    import weakref

    _RELEASERS.append((weakref.ref(owner), release))


def _release_group_holders() -> None:
    """Drop every reference to the group that is ours to drop, so that destroying it really ends
    it and joins its worker threads: the registered owners' (release_at_shutdown), DTensor's
    sharding caches (they keep the specs, hence the mesh, of every op an FSDP model ran), then
    the reference cycles that still hold any of these."""
    import gc
    import sys

    while _RELEASERS:
        owner, release = _RELEASERS.pop()
        if (alive := owner()) is not None:
            release(alive)
    if "torch.distributed.tensor" in sys.modules:
        _clear_dtensor_caches()
    gc.collect()


# DTensor's process-wide caches that keep a DeviceMesh (hence its group) alive: (module, the
# function that clears one). Private torch API, so each is looked up and skipped where absent;
# tests/test_distributed.py counts the gloo threads left at exit and fails if one is missed.
_DTENSOR_CACHE_CLEARERS = (
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),  # specs of every op run
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
)


def _clear_dtensor_caches() -> None:
    import importlib

    for module_name, path in _DTENSOR_CACHE_CLEARERS:
        try:
            target = importlib.import_module(module_name)
            for name in path.split("."):
                target = getattr(target, name)
        except (ImportError, AttributeError):
            continue
        target()


def shutdown() -> None:
    """Leave the process group (end of a run; also run at interpreter exit for a group init()
    made, so a script that never calls it still exits cleanly). Idempotent.

    A group that is destroyed but still referenced (by a sharded model, DTensor's caches) keeps
    its gloo worker threads, and one of them releasing the last collective's tensors while the
    interpreter finalizes aborts the process (`terminate called without an active exception`,
    pytorch#179291). So the references that are ours go first (_release_group_holders)."""
    if _active():
        _release_group_holders()
        tdist.destroy_process_group()
