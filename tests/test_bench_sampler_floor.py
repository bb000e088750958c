"""The sampler benchmark's GEMM floor counts each shared prompt prefix once: its prefix-tree
token count against a brute-force count of distinct prefixes."""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_sampler import distinct_prefix_tokens  # noqa: E402


def brute_force(prompts):
    return len({tuple(p[: i + 1]) for p in prompts for i in range(len(p))})


def test_distinct_prefix_tokens_counts_the_prefix_tree():
    rng = random.Random(0)
    system = [rng.randrange(5) for _ in range(40)]
    cases = [
        [[1, 2, 3]],
        [[1, 2, 3], [1, 2, 3]],  # the same prompt twice: once
        [[1, 2, 3], [1, 2], [4]],  # one a prefix of another
        [system + [rng.randrange(3) for _ in range(rng.randrange(1, 9))] for _ in range(6)],  # few-shot head
        [[rng.randrange(2) for _ in range(rng.randrange(1, 12))] for _ in range(20)],  # many collisions
    ]
    for prompts in cases:
        assert distinct_prefix_tokens(prompts) == brute_force(prompts), prompts
    assert distinct_prefix_tokens([system + [7], system + [8]]) == len(system) + 2
