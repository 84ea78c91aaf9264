"""Spatial average pooling: the "downsample the image" baseline (VTC-Bench, arXiv 2510.07143).

Benchmarks found plain downsampling hard to beat on standard tasks; this is its token-level form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from piofvlm.core.context import Selection, StageContext
from piofvlm.core.handle import PruningHandle
from piofvlm.methods.base import TokenPruner
from piofvlm.methods.shared.capture import VisionInputs
from piofvlm.registry import register_method


def pool_cells(height: int, width: int, k: int, row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Split a ``height x width`` grid into exactly ``k`` rectangular cells: ``r`` row bands, ``k // r`` or
    ``k // r + 1`` column segments per band (``r`` keeps the cells close to square).

    Returns:
        ``(cell, center_row, center_col)``: the cell of each ``(row, col)`` and, per cell, its centre token.
    """
    bands = max(math.ceil(k / width), min(height, k, max(1, round(math.sqrt(k * height / width)))))
    per_band = [k // bands + (1 if i < k % bands else 0) for i in range(bands)]
    band = (row * bands) // height  # row in [ceil(i*h/r), ceil((i+1)*h/r)) <=> floor(row*r/h) == i
    cell_offset = torch.tensor([0, *per_band]).cumsum(0)
    segments = torch.tensor(per_band)[band]
    segment = (col * segments) // width  # col in [j*w/c, (j+1)*w/c) <=> floor(col*c/w) == j
    cell = cell_offset[band] + segment
    centers_r, centers_c = [], []
    for i, count in enumerate(per_band):
        top, bottom = math.ceil(i * height / bands), math.ceil((i + 1) * height / bands)
        for j in range(count):
            left, right = math.ceil(j * width / count), math.ceil((j + 1) * width / count)
            centers_r.append(top + (bottom - top - 1) // 2)
            centers_c.append(left + (right - left - 1) // 2)
    return cell, torch.tensor(centers_r), torch.tensor(centers_c)


@register_method
@dataclass
class Pool(TokenPruner):
    """Average-pool each image's token grid down to the budget.

    Budget: visual tokens per image (see :class:`TokenPruner`), met exactly. Each grid of an image (LLaVA: the
    ``side x side`` patch grid; LLaVA-NeXT: the base view, the unpadded high-resolution grid, and its column of
    ``image_newline`` tokens as a ``rows x 1`` grid) gets a share of the budget proportional to its size (largest
    remainder) and is cut into that many near-square cells of row bands x column segments. The cell's mean hidden
    state is written into the cell's centre token, which keeps its position. With ``budget_scope="sample"`` the
    shares are taken over all grids of the sample. One prune point only (default: before the first layer).
    """

    name: ClassVar[str] = "pool"

    layers: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(f"pool has a single prune point (it needs complete grids), got layers={self.layers!r}")

    def attach(self, handle: PruningHandle) -> None:
        self._vision = VisionInputs(handle, layers=[])

    def select(self, ctx: StageContext) -> Selection:
        vmap = self._vision.visual_map(ctx)
        image, grid, row, col = (vmap.at(n, ctx) for n in ("image", "grid", "row", "col"))
        separator = vmap.at("crop", ctx) < 0
        bucket = torch.where(ctx.groups >= 0, (image * 100_003 + grid) * 2 + separator.long(), -1)
        keep = torch.zeros_like(ctx.groups, dtype=torch.bool)
        hidden = ctx.hidden_states.clone()
        for b in range(ctx.groups.shape[0]):
            for g in range(ctx.budgets.shape[1]):
                slots = (ctx.groups[b] == g).nonzero()[:, 0]
                if len(slots) == 0:
                    continue
                keys, sizes = bucket[b, slots].unique(return_counts=True)
                shares = _largest_remainder(int(ctx.budgets[b, g]), sizes.tolist())
                for key, share in zip(keys.tolist(), shares, strict=True):
                    if share:
                        self._pool_bucket(ctx, b, slots[bucket[b, slots] == key], row[b], col[b], share, keep, hidden)
        return Selection(keep=keep, hidden_states=hidden)

    @staticmethod
    def _pool_bucket(ctx, b, slots, row, col, k, keep, hidden) -> None:
        r, c = row[slots].cpu(), col[slots].cpu()
        r, c = r - r.min(), c - c.min()
        height, width = int(r.max()) + 1, int(c.max()) + 1
        if height * width != len(slots):
            raise ValueError("pool needs complete token grids; use it as the first (or only) stage")
        cell, center_r, center_c = pool_cells(height, width, k, r, c)
        cell = cell.to(slots.device)
        feats = ctx.hidden_states[b, slots]
        feats = feats.to(torch.promote_types(feats.dtype, torch.float32))  # at least fp32; fp64 models keep fp64
        sums = torch.zeros(k, feats.shape[-1], dtype=feats.dtype, device=feats.device).index_add_(0, cell, feats)
        counts = torch.bincount(cell, minlength=k).clamp(min=1)[:, None]
        lookup = torch.full((height, width), -1, dtype=torch.long)
        lookup[r, c] = torch.arange(len(slots))
        centers = slots[lookup[center_r, center_c].to(slots.device)]
        keep[b, centers] = True
        hidden[b, centers] = (sums / counts).to(hidden.dtype)


def _largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over buckets in proportion to ``sizes`` (Hamilton's method; ties to the earlier bucket)."""
    whole = sum(sizes)
    quotas = [total * s / whole for s in sizes]
    shares = [min(math.floor(q), s) for q, s in zip(quotas, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in order:
        if sum(shares) == total:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
    return shares
