"""Where each visual token of an image (or video) lies on it: what overlays draw from.

An adapter's :meth:`~piofvlm.adapters.base.ModelAdapter.token_boxes` returns one :class:`TokenBoxes` per image or
video of a call. Boxes are normalized ``(x0, y0, x1, y1)`` in ``[0, 1]`` coordinates of the picture the processor
was given (a video: of its frames). A picture can be seen through several *views* (LLaVA-NeXT's base view and its
high-resolution grid; InternVL's tiles and thumbnail; SmolVLM's tiles and global view; a video's frames): every view
covers the whole picture, its boxes tile it without overlap, and the views overlap each other. Visual tokens with no
place on the picture (LLaVA-NeXT / OneVision ``image_newline`` tokens, which are placeholders and count towards
budgets) have NaN boxes and view -1. Text between an item's tokens (Mistral 3's ``[IMG_BREAK]``) is not a visual
token, so it is not there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenBoxes:
    """The visual tokens of one image or video of a call and where they lie on it."""

    #: Batch row of the prompt holding the item.
    sample: int
    #: ``"image"`` or ``"video"`` (InternVL and SmolVLM write video frames as images: their frames are images here).
    modality: str
    #: ``(N,)`` long: the item's tokens as indices among its sample's visual tokens in prompt order (the numbering of
    #: :class:`~piofvlm.core.context.StageRecord` ``kept``).
    tokens: torch.Tensor
    #: ``(N, 4)`` float32: ``(x0, y0, x1, y1)`` of each token in ``[0, 1]`` picture coordinates; NaN: no place.
    boxes: torch.Tensor
    #: ``(N,)`` long: the view of each token (an index into :attr:`views`), -1 for tokens with no place.
    view: torch.Tensor
    #: The views' names, e.g. ``("image",)``, ``("base", "high-res")``, ``("tiles", "thumbnail")``, ``("frame 1",
    #: ...)``; a video's view ``v`` of ``V`` shows its source frames from ``v * F // V`` on.
    views: tuple[str, ...]

    def __repr__(self) -> str:
        return (
            f"TokenBoxes(sample={self.sample}, {self.modality}, {len(self.tokens)} tokens, views={list(self.views)})"
        )


def cell_boxes(row: torch.Tensor, col: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(N, 4)`` boxes of cells ``(row, col)`` (``(N,)`` each) of a ``rows x cols`` grid over the unit square."""
    row, col = row.to(torch.float32), col.to(torch.float32)
    return torch.stack([col / cols, row / rows, (col + 1) / cols, (row + 1) / rows], dim=-1)


def raster_boxes(rows: int, cols: int) -> torch.Tensor:
    """``(rows * cols, 4)`` boxes of a ``rows x cols`` grid in raster order (row-major)."""
    token = torch.arange(rows * cols)
    return cell_boxes(token // cols, token % cols, rows, cols)


def in_region(boxes: torch.Tensor, region: tuple[float, float, float, float]) -> torch.Tensor:
    """``boxes`` ``(N, 4)`` of the unit square mapped into ``region`` ``(x0, y0, x1, y1)`` (a tile of a picture)."""
    x0, y0, x1, y1 = region
    scale = torch.tensor([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=boxes.dtype)
    return boxes * scale + torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)


def no_place(count: int) -> torch.Tensor:
    """``(count, 4)`` NaN boxes: tokens with no place on the picture."""
    return torch.full((count, 4), float("nan"))


def split_by_sample(visual: torch.Tensor, counts: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
    """Assign items of ``counts`` tokens (flat, sample-major prompt order) to samples.

    Args:
        visual: ``(B, S)`` bool, the visual tokens of the batch.
        counts: tokens of each item, in flat prompt order.

    Returns:
        Per item ``(sample, tokens)``: ``tokens`` ``(N,)`` long indices among that sample's visual tokens.
    """
    per_sample = visual.sum(1).tolist()
    items: list[tuple[int, torch.Tensor]] = []
    sample, used = 0, 0
    for count in counts:
        while sample < len(per_sample) and used == per_sample[sample]:
            sample, used = sample + 1, 0
        if sample == len(per_sample) or used + count > per_sample[sample]:
            raise ValueError(
                f"the items' token counts {list(counts)} do not match the visual tokens of the samples {per_sample}"
            )
        items.append((sample, torch.arange(used, used + count)))
        used += count
    if sum(per_sample) != sum(counts):  # nothing overflowed a sample, so every token is then assigned
        raise ValueError(
            f"the items' token counts {list(counts)} do not match the visual tokens of the samples {per_sample}"
        )
    return items


def tiled_image_boxes(
    model_type: str,
    visual: torch.Tensor,
    sources: list[dict[str, torch.Tensor]],
    side: int,
    tile_pixels: int,
    source_sizes: Sequence[tuple[int, int]] | None,
) -> list[TokenBoxes]:
    """Boxes of images seen as square tiles (InternVL, GOT-OCR 2.0): per image (``sources``: its tokens' tile
    ``grid`` and ``row``/``col`` in a ``side x side`` tile grid, in prompt order over the ``visual`` ``(B, S)`` slots),
    one tile over the whole picture, or ``n`` tiles laid out ``rows x cols`` over the picture as the processor chose
    for its aspect (view ``"tiles"``, needs ``source_sizes``: ``(width, height)`` per image) and the thumbnail, the
    last tile (view ``"thumbnail"``)."""
    from piofvlm import transformers_compat

    placed = split_by_sample(visual, [len(source["grid"]) for source in sources])
    items = []
    for index, ((sample, tokens), source) in enumerate(zip(placed, sources, strict=True)):
        tile = source["grid"]
        tiles = int(tile.max()) + 1
        boxes = cell_boxes(source["row"], source["col"], side, side)  # within its tile
        if tiles == 1:
            items.append(TokenBoxes(sample, "image", tokens, boxes, torch.zeros_like(tile), ("image",)))
            continue
        if source_sizes is None or index >= len(source_sizes):
            raise ValueError(
                f"{model_type}: image {index} has {tiles - 1} tiles + a thumbnail, laid out according to the "
                "picture's size: pass source_sizes=[(width, height), ...] of the images in prompt order"
            )
        width, height = source_sizes[index]
        cols, rows = transformers_compat.tiled_canvas(height, width, tile_pixels, tiles - 1)
        for t in range(tiles - 1):
            region = ((t % cols) / cols, (t // cols) / rows, (t % cols + 1) / cols, (t // cols + 1) / rows)
            boxes[tile == t] = in_region(boxes[tile == t], region)
        view = (tile == tiles - 1).long()  # 0: the tiles, 1: the thumbnail
        items.append(TokenBoxes(sample, "image", tokens, boxes, view, ("tiles", "thumbnail")))
    return items


def closest_grid(tiles: int, width: int, height: int) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows * cols == tiles`` whose aspect ``cols / rows`` is closest to ``width / height``
    (in log scale; ties: the wider grid for a wide picture, else the taller)."""
    aspect = math.log(width / height)
    grids = [(r, tiles // r) for r in range(1, tiles + 1) if tiles % r == 0]
    return min(
        grids, key=lambda grid: (abs(math.log(grid[1] / grid[0]) - aspect), -grid[1] if aspect >= 0 else grid[1])
    )


def frame_names(frames: int) -> tuple[str, ...]:
    """The views of a video: ``("frame 1", ..., "frame F")`` (frames as the model groups them)."""
    return tuple(f"frame {t + 1}" for t in range(frames))
