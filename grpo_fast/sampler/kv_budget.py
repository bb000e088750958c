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
    if isinstance(kv_budget, str) and _parse(kv_budget) is None:
        raise ConfigError(f"sampling.kv_budget: {kv_budget!r} is not understood; use e.g. '2GiB', '512MB' or "
                          f"'65536 tokens'")


def _parse(text: str) -> tuple[str, float] | None:
    """("tokens", n) or ("bytes", n) for a budget string; None when it is not one."""
    match = _PATTERN.match(text)
    unit = match.group(2).lower() if match else None
    if unit in _TOKEN_UNITS:
        return "tokens", float(match.group(1))
    if unit in _UNITS:
        return "bytes", float(match.group(1)) * _UNITS[unit]
    return None


def budget_tokens(kv_budget, *, bytes_per_token: int) -> int:
    """Tokens of KV a well-formed budget (int bytes or a string) holds, for the memory plan."""
    if isinstance(kv_budget, int):
        return kv_budget // bytes_per_token
    kind, n = _parse(kv_budget)
    return int(n) if kind == "tokens" else int(n) // bytes_per_token


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
        parsed = _parse(kv_budget)
        if parsed is None:
            raise ConfigError(f"kv_budget {kv_budget!r} is not understood; use e.g. '2GiB', '512MB' or '65536 tokens'")
        kind, n = parsed
        if kind == "tokens":
            blocks = ceil_div(int(n), block_size)
            if blocks < 1:
                raise ConfigError(f"kv_budget {kv_budget!r} holds no KV block")
            return blocks
        num_bytes = int(n)
    blocks = num_bytes // bytes_per_block
    if blocks < 1:
        raise ConfigError(f"kv_budget {kv_budget!r} is smaller than one KV block ({bytes_per_block} bytes)")
    return blocks
