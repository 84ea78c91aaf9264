"""LLaVA-1.5 style models (``LlavaForConditionalGeneration``): a fixed number of visual tokens per image.

LLaVA-1.5 is the common layout itself, so its adapter is a data entry (``facts.LLAVA``: the parts
:class:`~piofvlm.adapters.parts.EqualTokensPerImage`, :class:`~piofvlm.adapters.parts.SquarePatchGrid` and
:class:`~piofvlm.adapters.parts.ClipVisionTower`); :data:`LlavaAdapter` is that registered class. This module keeps
the anyres boxes the LLaVA-NeXT family shares.
"""

from __future__ import annotations

import torch

from piofvlm.adapters.boxes import cell_boxes, no_place
from piofvlm.adapters.facts import ADAPTERS_FROM_FACTS

#: The registered ``llava`` adapter, built from the data entry ``facts.LLAVA``.
LlavaAdapter = ADAPTERS_FROM_FACTS["llava"]


def anyres_view_boxes(
    source: dict[str, torch.Tensor], side: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Boxes of an anyres image (LLaVA-NeXT, LLaVA-OneVision) from its :meth:`~LlavaAdapter.visual_token_sources`
    entry: the base view (grid 0, ``side x side``) and the unpadded (possibly downscaled) high-resolution grid (grid 1,
    ``rows x cols`` over the whole picture); ``image_newline`` tokens (``crop == -1``) have no place.

    Returns ``(boxes (N, 4), view (N,), views)``.
    """
    grid, row, col = source["grid"], source["row"], source["col"]
    placed = source["crop"] >= 0
    boxes, view = no_place(len(grid)), torch.full_like(grid, -1)
    base = placed & (grid == 0)
    boxes[base], view[base] = cell_boxes(row[base], col[base], side, side), 0
    high = placed & (grid == 1)
    if not bool(high.any()):
        return boxes, view, ("base",)
    rows, cols = int(row[high].max()) + 1, int(col[high].max()) + 1
    boxes[high], view[high] = cell_boxes(row[high], col[high], rows, cols), 1
    return boxes, view, ("base", "high-res")
