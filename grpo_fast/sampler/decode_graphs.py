"""Optional CUDA graphs for the sampler's decode step: ``Sampler(model, cuda_graphs=True)``.

A decode step of a small model on a GPU is dozens of short kernel launches per layer, and the
launch overhead, not the GPU, sets its pace. A CUDA graph records one step's launches once and
replays them with a single launch. The step is recorded per batch-size bucket (1, 2, 4, 8, 16,
then multiples of 16 up to 512): S live sequences run in the smallest bucket >= S, the extra
rows padded (slot -1: nothing written; context length 0: attention output 0; their logits are
dropped). Inputs live in static device buffers, copied in before each replay.

Recorded graphs hold the addresses and the Python control flow of the modules as they were:
weights updated in place are seen by a replay, but an adapter switched on or off, or weights
replaced, are not. So graphs last one generate call (``clear()`` at its end) and are recorded
again, lazily per bucket, in the next. A step that cannot be recorded (a module that reads a value
back to the host, e.g. dynamic RoPE scaling) is run eagerly for the rest of the call, with a
warning. Not run on hardware in this project's sessions (no GPU was lent): the `gpu` tests in
tests/test_decode_graphs.py check replayed steps against eager ones.
"""

from __future__ import annotations

import warnings

import torch

_BUCKETS = (1, 2, 4, 8) + tuple(range(16, 513, 16))


def bucket_for(num_seqs: int) -> int | None:
    """Smallest bucket >= num_seqs, None when num_seqs is above the largest (run eagerly)."""
    for b in _BUCKETS:
        if b >= num_seqs:
            return b
    return None


class DecodeGraphs:
    def __init__(self, runner):
        self.runner = runner
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.failed = False
        self.buffers: dict[str, torch.Tensor] | None = None

    def clear(self) -> None:
        """Drop the recorded graphs and their static buffers (end of a generate call)."""
        self.graphs.clear()
        self.pool = None
        self.failed = False
        self.buffers = None

    def _static_buffers(self) -> dict[str, torch.Tensor]:
        if self.buffers is None:
            dev, n = self.runner.device, _BUCKETS[-1]
            self.buffers = dict(
                input_ids=torch.zeros(n, dtype=torch.int64, device=dev),
                slots=torch.full((n,), -1, dtype=torch.int32, device=dev),
                block_tables=torch.zeros(n, self.runner.num_blocks, dtype=torch.int32, device=dev),
                context_lens=torch.zeros(n, dtype=torch.int32, device=dev),
            )
        return self.buffers

    def run(self, slot_np, tables_np, lens_np, last_tokens: list[int]) -> torch.Tensor | None:
        """Logits [S, V] of one decode step by replay, or None when the caller should run it
        eagerly (not on CUDA, too many sequences, or recording failed in this call)."""
        num = len(last_tokens)
        bucket = bucket_for(num)
        if self.failed or bucket is None or self.runner.device.type != "cuda":
            return None
        buf = self._static_buffers()
        width = tables_np.shape[1]
        dev = self.runner.device
        buf["input_ids"][:num].copy_(torch.as_tensor(last_tokens, dtype=torch.int64))
        buf["slots"][:num].copy_(torch.as_tensor(slot_np).to(torch.int32))
        buf["slots"][num:bucket].fill_(-1)
        buf["context_lens"][:num].copy_(torch.as_tensor(lens_np).to(torch.int32))
        buf["context_lens"][num:bucket].zero_()
        buf["block_tables"][:num, :width].copy_(torch.as_tensor(tables_np).to(torch.int32))
        if bucket not in self.graphs:
            try:
                self._record(bucket)
            except Exception as e:  # noqa: BLE001 (any failure: fall back to eager, say why)
                self.failed = True
                warnings.warn(f"cuda_graphs: recording the decode step failed ({type(e).__name__}: {e}); "
                              f"decoding eagerly for the rest of this generate call", stacklevel=3)
                torch.cuda.synchronize(dev)
                return None
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[:num]

    def _inputs(self, bucket: int):
        b = self.buffers
        return b["input_ids"][:bucket], b["slots"][:bucket], b["block_tables"][:bucket], b["context_lens"][:bucket]

    def _record(self, bucket: int) -> None:
        # One eager run on a side stream first (lazy initializations, cuBLAS workspaces), as
        # torch.cuda.graphs recommends; it computes this very step, so the replay that follows
        # rewrites the same K/V.
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(side):
            self.runner.decode_forward(*self._inputs(bucket))
        torch.cuda.current_stream(self.runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.runner.decode_forward(*self._inputs(bucket))
        self.pool = graph.pool()
        self.graphs[bucket] = (graph, logits)
