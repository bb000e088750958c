"""Which training-forward layout a micro-batch takes, as arithmetic on lengths (no torch): the
training pass (packed_forward.py, group_prompts.py) decides with it on each batch, and the memory
plan (grpo_fast/memory.py) with the same functions on a step of full-length completions, so the
plan counts the memory of the layout that will run.

    packed         each group one sequence with a block mask (packed_forward._packed_forward)
    cached         each group's prompt once with a cache, its K/V repeated for its rows
    group prompts  a group split across micro-batches: its prompt once for all of them
"""

from __future__ import annotations

import itertools

# The cached layout's own cost (two decoder calls, the repeated prompt K/V, smaller products),
# as a share of the linear layers' work. Measured on the CPU, SmolLM2 + LoRA r = 16, one group of
# G = 8 per micro-batch (benchmarks/RESULTS.md "Training forward layouts"), with the share of the
# linear work the packed mask adds: P = 40, C = 16 (0.035): packed 3.4 s vs cached 4.1; P = 40,
# C = 64 (0.146): cached 8.3 vs 9.1; P = 512, C = 64 (0.153): equal; P = 40, C = 128: cached 18.2
# vs 27.5. The threshold sits between the first two.
CACHED_OVERHEAD = 0.08


def run_starts(runs: list[int]) -> list[int]:
    """The first row of each run of rows sharing a prompt."""
    return [0, *itertools.accumulate(runs)][:-1]


def cached_pays(*, hidden: int, q_heads: int, head_dim: int, kv_heads: int, intermediate: int, prompt_width: int,
                completion_width: int, runs: list[tuple[int, int, int]]) -> bool:
    """Whether the cached layout beats the packed one, by attention work. runs: per run of rows
    sharing a prompt, (its prompt's tokens, its rows, the tokens its completions run:
    Σ max(c - 1, 0), the last token predicts nothing); prompt_width and completion_width: the
    batch's padded P and C.

        packed  R x T^2 query-key pairs (T the longest run: prompt + its completions, dense mask)
        cached  R x P^2 + N x (C - 1) x (P + C - 1) pairs (prompt once, completions over it)

    each pair costs 4 H flops a layer; the linear layers cost 2 x (their parameters) per token
    and layer, over the same tokens either way. cached when the pairs it saves cost more than
    CACHED_OVERHEAD of the linear work."""
    h, P, C = hidden, prompt_width, completion_width
    linear = 2 * h * q_heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * intermediate  # q, o, k, v, MLP
    longest = max(prompt + completions for prompt, _, completions in runs)
    tokens = sum(prompt + completions for prompt, _, completions in runs)
    rows = sum(n for _, n, _ in runs)
    packed_pairs = len(runs) * longest ** 2
    cached_pairs = len(runs) * P ** 2 + rows * (C - 1) * (P + C - 1)
    return (packed_pairs - cached_pairs) * 4 * h > CACHED_OVERHEAD * tokens * 2 * linear


def group_prompts_pay(groups: list[tuple[int, int, int]]) -> bool:
    """Whether running each split group's prompt once (group_prompts.py) saves enough. groups:
    (prompt tokens, the tokens its completions run: Σ max(c - 1, 0), micro-batches touching it).
    The prompt tokens the split passes would repeat, Σ over groups (micro-batches touching it - 1)
    x its prompt, must exceed CACHED_OVERHEAD of the tokens those passes run."""
    saved = sum((touched - 1) * prompt for prompt, _, touched in groups)
    total = sum(touched * prompt + completions for prompt, completions, touched in groups)
    return saved > 0 and saved > CACHED_OVERHEAD * total


def training_layout(*, hidden: int, q_heads: int, head_dim: int, kv_heads: int, intermediate: int, prompt: int,
                    completion: int, generations: int, rows: int, micro_batch: int,
                    shares_prompts: bool = True) -> str:
    """The layout the training pass takes on a step of `rows` full-length rows (groups of
    `generations`, every prompt `prompt` tokens, every completion `completion`) in micro-batches
    of `micro_batch` rows: "group prompts", "cached" or "packed" (the memory plan's question).
    shares_prompts False (gradient checkpointing, FSDP's collective calls): "packed". Arithmetic
    in the number of groups (the plan's fit search calls it often)."""
    if not shares_prompts or generations < 2:
        return "packed"
    G, m, run = generations, min(micro_batch, rows), max(completion - 1, 0)
    groups = []
    for first in range(0, rows, G):
        last = min(first + G, rows) - 1
        groups.append((prompt, (last - first + 1) * run, last // m - first // m + 1))  # micro-batches of m rows
    if m < rows and group_prompts_pay(groups):
        return "group prompts"
    runs = [(prompt, min(G, m - first), min(G, m - first) * run) for first in range(0, m, G)]  # the first micro-batch
    if len(runs) == m:  # one row per prompt: nothing shared (the plain pass, as packed in memory)
        return "packed"
    pays = cached_pays(hidden=hidden, q_heads=q_heads, head_dim=head_dim, kv_heads=kv_heads, intermediate=intermediate,
                       prompt_width=prompt, completion_width=completion, runs=runs)
    return "cached" if pays else "packed"
