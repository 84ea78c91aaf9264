"""Draw which visual tokens a method kept, per stage, over the image (PIL only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from piofvlm.core.context import StageRecord


def grid_side(num_tokens: int) -> int:
    """Side of the square patch grid holding ``num_tokens`` visual tokens (raster order, LLaVA-1.5 style)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{num_tokens} visual tokens do not form a square patch grid; overlays support one image per prompt "
            "with LLaVA-1.5-style raster tokens"
        )
    return side


def overlay_panels(
    image: Image.Image,
    records: Sequence[StageRecord],
    num_tokens: int,
    sample: int = 0,
    boxes: Sequence[tuple[int, int, int, int]] = (),
    panel_size: int = 336,
) -> Image.Image:
    """One panel per stage (plus the original image): dropped patches dimmed, kept patches outlined.

    Args:
        image: the input image (resized to ``panel_size`` for display; patches are mapped on the resized image).
        records: ``method.last_selection`` after a forward on this image.
        num_tokens: visual tokens of the image before pruning (a square grid).
        sample: which sample of the batch the records refer to.
        boxes: optional pixel boxes (in ``image`` coordinates) drawn in every panel, e.g. the objects a question
            is about.
        panel_size: width and height of each panel in pixels.
    """
    side = grid_side(num_tokens)
    scale_x, scale_y = panel_size / image.width, panel_size / image.height
    base = image.convert("RGB").resize((panel_size, panel_size))
    cell = panel_size / side
    panels = [_with_boxes(base.copy(), boxes, scale_x, scale_y, "original")]
    for record in records:
        kept = set(torch.as_tensor(record.kept[sample]).tolist())
        dim = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.75)
        panel = dim.copy()
        draw = ImageDraw.Draw(panel)
        for index in kept:
            row, col = divmod(index, side)
            box = (round(col * cell), round(row * cell), round((col + 1) * cell), round((row + 1) * cell))
            panel.paste(base.crop(box), box[:2])
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 255))
        label = f"after {record.layer} layers: {len(kept)}/{num_tokens} kept"
        panels.append(_with_boxes(panel, boxes, scale_x, scale_y, label))
    canvas = Image.new("RGB", (panel_size * len(panels), panel_size + 18), (255, 255, 255))
    for i, (panel, label) in enumerate(panels):
        canvas.paste(panel, (i * panel_size, 18))
        ImageDraw.Draw(canvas).text((i * panel_size + 4, 3), label, fill=(0, 0, 0))
    return canvas


def _with_boxes(panel: Image.Image, boxes, scale_x: float, scale_y: float, label: str) -> tuple[Image.Image, str]:
    draw = ImageDraw.Draw(panel)
    for x0, y0, x1, y1 in boxes:
        box = (x0 * scale_x, y0 * scale_y, x1 * scale_x - 1, y1 * scale_y - 1)
        draw.rectangle(box, outline=(255, 60, 60), width=2)
    return panel, label
