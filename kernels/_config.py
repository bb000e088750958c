"""Launch configurations of the log-prob kernels, per GPU architecture.

Every config a launcher can pick is listed in `CONFIGS` (kind -> smem class -> element size ->
tuple), so the compile test can build each of them for each architecture and check its shared
memory. `select_config` only ever returns an element of `configs_for(...)`.

The tables are starting points chosen from the tiling arithmetic (shared memory per pipeline
stage = (BLOCK_N + BLOCK_V) * BLOCK_K * element size, registers for a [BLOCK_N, BLOCK_V] fp32
tile); they were compile-checked for every architecture on a machine without a GPU but NOT
timed on one. They are the knobs to tune with benchmarks/bench_loss.py on a real device.
"""
from dataclasses import dataclass

from grpo_fast.intmath import ceil_div

KINDS = ("fwd", "fwd_grad", "bwd_dh", "bwd_dw")

# Opt-in shared memory per block (bytes): the CUDA programming guide's compute capability table.
SMEM_LIMIT_BYTES = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024,
                    90: 227 * 1024, 120: 99 * 1024}

# Below this many rows, a 16-row block (the smallest tl.dot M) plus more V splits wastes less.
SMALL_N = 32


@dataclass(frozen=True)
class TileConfig:
    block_n: int  # rows (tokens) per tile
    block_v: int  # vocab entries per tile
    block_k: int  # hidden-dim chunk of each tl.dot
    num_warps: int
    num_stages: int  # software pipelining depth of the K loop (shared memory scales with it)


def smem_class(cap: int) -> str:
    """'small' (64 KiB: Turing), 'mid' (99 KiB: GA10x, Ada, consumer Blackwell), 'big' (>= 163)."""
    if cap < 80:
        return "small"
    if cap in (86, 89) or cap >= 120:
        return "mid"
    return "big"  # 80, 87, 90, 100, 103, ...


_C = TileConfig
# CONFIGS[kind][smem class][element bytes] = (small-N config, large-N config) or (one config,)
CONFIGS = {
    "fwd": {
        "big": {2: (_C(16, 128, 64, 4, 4), _C(64, 128, 64, 8, 4)), 4: (_C(64, 128, 32, 8, 4),)},
        "mid": {2: (_C(16, 128, 64, 4, 3), _C(64, 128, 64, 8, 3)), 4: (_C(64, 128, 32, 8, 3),)},
        "small": {2: (_C(16, 128, 64, 4, 2), _C(64, 128, 32, 8, 2)), 4: (_C(64, 64, 32, 8, 2),)},
    },
    # fwd_grad: the forward with INPUT_GRAD (frozen head); its inner loop is bwd_dh's.
    "fwd_grad": {
        "big": {2: (_C(16, 128, 64, 4, 3), _C(64, 128, 64, 8, 3)), 4: (_C(64, 128, 32, 8, 3),)},
        "mid": {2: (_C(16, 128, 64, 4, 3), _C(64, 128, 64, 8, 3)), 4: (_C(64, 128, 32, 8, 2),)},
        "small": {2: (_C(16, 128, 32, 4, 2), _C(64, 128, 32, 8, 2)), 4: (_C(64, 64, 32, 8, 2),)},
    },
    "bwd_dh": {
        "big": {2: (_C(16, 128, 64, 4, 3), _C(64, 128, 64, 8, 3)), 4: (_C(64, 128, 32, 8, 3),)},
        "mid": {2: (_C(16, 128, 64, 4, 3), _C(64, 128, 64, 8, 3)), 4: (_C(64, 128, 32, 8, 2),)},
        "small": {2: (_C(16, 128, 32, 4, 2), _C(64, 128, 32, 8, 2)), 4: (_C(64, 64, 32, 8, 2),)},
    },
    # bwd_dw: block_v is the M of dz^T @ h, block_n its reduction dim; one config for all N.
    "bwd_dw": {
        "big": {2: (_C(64, 128, 64, 8, 3),), 4: (_C(64, 128, 32, 8, 3),)},
        "mid": {2: (_C(64, 128, 64, 8, 3),), 4: (_C(64, 128, 32, 8, 2),)},
        "small": {2: (_C(64, 128, 32, 8, 2),), 4: (_C(32, 64, 32, 8, 2),)},
    },
}
# fp32 operands (rare on a GPU: models train the head in bf16) get one config per kind, so the
# compile check stays affordable. Largest shared memory per kind, measured with
# tests/test_triton_compile.py (heaviest flags, H divisible by 16), KiB used / limit:
#   sm_75   fwd 32, fwd_grad 48, bwd_dh 48, bwd_dw 48 / 64
#   sm_80   fwd 72, fwd_grad 72, bwd_dh 72, bwd_dw 64 / 163
#   sm_86, sm_89, sm_120   fwd 48, fwd_grad 64, bwd_dh 64, bwd_dw 64 / 99
#   sm_90   fwd 96, fwd_grad 88, bwd_dh 88, bwd_dw 72 / 227
# so deeper pipelines or BLOCK_V = 256 fit on sm_80/90 if a benchmark says they pay.

# Under TRITON_INTERPRET the config only has to be legal (dot dims >= 16); larger blocks mean
# fewer Python-level program instances.
INTERPRET_CONFIG = TileConfig(32, 64, 32, 4, 1)


def configs_for(kind: str, cap: int, elem_bytes: int) -> tuple:
    """All configs `select_config` may return for this kernel kind, arch and operand size."""
    return CONFIGS[kind][smem_class(cap)][elem_bytes]


def select_config(kind: str, cap: int, elem_bytes: int, n_rows: int) -> TileConfig:
    table = configs_for(kind, cap, elem_bytes)
    if len(table) == 1:
        return table[0]
    return table[0] if n_rows <= SMALL_N else table[1]


def num_v_splits(n_row_blocks: int, n_v_tiles: int, num_sms: int, max_splits: int = 64) -> int:
    """V splits so that row blocks x splits >= 2 programs per SM, each split >= 1 tile.

    Each extra split costs one [N] partial per statistic (forward) or one [N, H] fp32 partial
    (backward dh), so stop at the occupancy target rather than splitting further.
    """
    want = ceil_div(2 * num_sms, max(n_row_blocks, 1))
    return max(1, min(want, n_v_tiles, max_splits))
