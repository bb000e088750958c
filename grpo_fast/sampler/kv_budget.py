"""Parse a KV-cache budget ("2GiB", "65536 tokens", an int of bytes) into a number of blocks."""

from __future__ import annotations

import re

from grpo_fast.errors import ConfigError
from grpo_fast.intmath import ceil_div

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}
_TOKEN_UNITS = ("tokens", "token", "tok")
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")

# Used when kv_budget is None: a modest share of host memory on CPU, of free memory on CUDA.
DEFAULT_CPU_BYTES = 512 * 2**20
DEFAULT_CUDA_FREE_FRACTION = 0.4


def check_kv_budget(kv_budget) -> None:
    """That kv_budget is well-formed (its size against a model is checked when the sampler is built)."""
    if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, str)):
        raise ConfigError(f"sampling.kv_budget: must be bytes (an int) or a string like '2GiB' or '65536 tokens', "
                          f"got {kv_budget!r}")
    if isinstance(kv_budget, str):
        match = _PATTERN.match(kv_budget)
        unit = match.group(2).lower() if match else None
        if match is None or (unit not in _UNITS and unit not in _TOKEN_UNITS):
            raise ConfigError(f"sampling.kv_budget: {kv_budget!r} is not understood; use e.g. '2GiB', '512MB' or "
                              f"'65536 tokens'")


def num_blocks_for_budget(kv_budget, *, bytes_per_block: int, block_size: int, device) -> int:
    """Blocks that fit the budget. ``kv_budget``: int = bytes; str = "<number><unit>" with unit
    B/KB/MB/GB/KiB/MiB/GiB or "tokens"; None = default (DEFAULT_CPU_BYTES on CPU, 40% of free
    memory on CUDA)."""
    if kv_budget is None:
        if getattr(device, "type", str(device)) == "cuda":
            import torch

            free, _ = torch.cuda.mem_get_info(device)
            kv_budget = int(free * DEFAULT_CUDA_FREE_FRACTION)
        else:
            kv_budget = DEFAULT_CPU_BYTES
    if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, str)):
        raise ConfigError(f"kv_budget must be an int (bytes), a str like '2GiB' or '65536 tokens', or None; got {kv_budget!r}")
    if isinstance(kv_budget, int):
        num_bytes = kv_budget
    else:
        match = _PATTERN.match(kv_budget)
        unit = match.group(2).lower() if match else None
        if unit in _TOKEN_UNITS:
            blocks = ceil_div(int(float(match.group(1))), block_size)
            if blocks < 1:
                raise ConfigError(f"kv_budget {kv_budget!r} holds no KV block")
            return blocks
        if match is None or unit not in _UNITS:
            raise ConfigError(f"kv_budget {kv_budget!r} is not understood; use e.g. '2GiB', '512MB' or '65536 tokens'")
        num_bytes = int(float(match.group(1)) * _UNITS[unit])
    blocks = num_bytes // bytes_per_block
    if blocks < 1:
        raise ConfigError(f"kv_budget {kv_budget!r} is smaller than one KV block ({bytes_per_block} bytes)")
    return blocks
