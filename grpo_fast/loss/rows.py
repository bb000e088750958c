"""Rows of hidden states picked by flat index, for the ops that gather them a chunk at a time."""
from __future__ import annotations

import torch
from torch import Tensor


def gather_rows(hidden: Tensor, rows: Tensor) -> Tensor:
    """hidden [*lead, H] at the flat positions `rows` [K] of its leading dims (row-major, as
    boolean indexing orders them) -> [K, H]. Works on any strides (a [B, T, H] slice of a longer
    sequence included) without copying more than the K rows."""
    if hidden.dim() == 2:
        return hidden.index_select(0, rows)
    if hidden.is_contiguous():
        return hidden.view(-1, hidden.shape[-1]).index_select(0, rows)
    return hidden[torch.unravel_index(rows, hidden.shape[:-1])]
