"""Small tensor helpers shared by the mechanism and the methods."""

from __future__ import annotations

import torch


def gather_sequence(values: torch.Tensor, index: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """Gather ``index`` (``(B, S_new)`` slots) along the sequence axis of ``values`` (``(*lead, B', S, *rest)``).

    ``batch_dim`` is the position of ``B'``; the sequence axis follows it. A batch axis of size 1 (position ids or
    rotary tables shared by the batch) is expanded first.
    """
    seq_dim = batch_dim + 1
    batch_size, new_len = index.shape
    shape = list(values.shape)
    shape[batch_dim] = batch_size
    values = values.expand(*shape)
    index_view = [1] * values.dim()
    index_view[batch_dim], index_view[seq_dim] = batch_size, new_len
    expand = list(values.shape)
    expand[seq_dim] = new_len
    return values.gather(seq_dim, index.view(index_view).expand(expand))
