"""Draw which visual tokens a method kept, per stage, over the images (and video frames) of a call (PIL only).

:func:`draw_overlay` works for every family whose adapter says where its tokens lie
(:meth:`~piofvlm.adapters.base.ModelAdapter.token_boxes`): one row of panels per image or video, the original
first, then for each stage one panel per *view* of the picture (LLaVA-NeXT: base view and high-resolution grid;
InternVL: tiles and thumbnail; SmolVLM: tiles and global view; a video: its first frames). Views are drawn as panels
of their own because they overlap on the picture: combined, a kept base-view token would hide a dropped tile token
under it. Dropped tokens are dimmed, kept tokens show the picture's pixels (outlined). A legend names the method,
its budget and, per stage, the layer it ran after and the tokens kept (kept / total and %) per sample.

:func:`overlay_panels` is the older single-image form for a square raster grid (LLaVA-1.5).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw

from piofvlm.adapters.boxes import TokenBoxes, raster_boxes
from piofvlm.adapters.registry import get_adapter
from piofvlm.core.context import StageRecord

logger = logging.getLogger(__name__)

#: A picture given to the processor: an image, or a video's frames.
Picture = Image.Image | Sequence[Image.Image]
#: Height of a text line (PIL's default font) and of the caption strip above panels.
LINE = 14
#: Share of black blended into dropped tokens (0.75: they keep a quarter of their brightness).
DIM = 0.75


def grid_side(num_tokens: int) -> int:
    """Side of the square patch grid holding ``num_tokens`` visual tokens (raster order, LLaVA-1.5 style)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{num_tokens} visual tokens do not form a square patch grid; overlay_panels draws one image with "
            "LLaVA-1.5-style raster tokens: use piofvlm.overlay.draw_overlay for other layouts"
        )
    return side


def pixel_box(box: torch.Tensor, width: int, height: int) -> tuple[int, int, int, int]:
    """A normalized ``(x0, y0, x1, y1)`` box in pixels of a ``width x height`` panel (neighbours share edges)."""
    x0, y0, x1, y1 = box.tolist()
    return round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)


def stage_panel(base: Image.Image, boxes: torch.Tensor, kept: torch.Tensor, outline: bool = True) -> Image.Image:
    """``base`` dimmed except under the kept boxes.

    Args:
        base: the view's picture at panel size (RGB).
        boxes: ``(N, 4)`` normalized boxes of the view's tokens.
        kept: ``(N,)`` bool, which of them are kept.
        outline: outline kept boxes (white, 1 px, inside the box) where they are at least 4 px wide and high.
    """
    panel = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), DIM)
    draw = ImageDraw.Draw(panel)
    for box in boxes[kept]:
        x0, y0, x1, y1 = pixel_box(box, *base.size)
        if x1 <= x0 or y1 <= y0:
            continue
        panel.paste(base.crop((x0, y0, x1, y1)), (x0, y0))
        if outline and x1 - x0 >= 4 and y1 - y0 >= 4:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255))
    return panel


def method_label(method: Any) -> str:
    """``"pio  keep=0.111  layers=[2]"`` for a method (its name and budget fields), or ``str(method)``."""
    if method is None or isinstance(method, str):
        return method or "(method not given)"
    fields = method.to_dict() if hasattr(method, "to_dict") else {}
    name = fields.pop("method", None) or getattr(method, "name", type(method).__name__)
    budget = [f"{key}={fields[key]}" for key in ("keep", "layers", "budget_scope") if key in fields]
    return "  ".join([name, *budget])


def overlay_legend(
    records: Sequence[StageRecord], method: Any, items: Sequence[TokenBoxes], samples: Sequence[int]
) -> list[str]:
    """The legend's lines: the method and budget, then per stage the layer it ran after and, per sample, the
    visual tokens kept of the sample's total (all its images and videos, placeholder newlines included)."""
    totals = {b: sum(len(item.tokens) for item in items if item.sample == b) for b in samples}
    lines = [f"method: {method_label(method)}"]
    if not records:
        lines.append("no stage ran: every visual token kept")
    for record in records:
        counts = []
        for b in samples:
            kept, total = len(record.kept[b]), totals[b]
            counts.append(f"sample {b}: {kept}/{total} kept ({100 * kept / max(total, 1):.1f}%)")
        lines.append(f"stage {record.stage + 1} (after {record.layer} decoder layers): " + "; ".join(counts))
    return lines


def draw_overlay(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    records: Sequence[StageRecord],
    pictures: Sequence[Picture],
    method: Any = None,
    samples: Sequence[int] | None = None,
    marks: Sequence[Sequence[tuple[int, int, int, int]]] | None = None,
    panel_height: int = 160,
    max_frames: int = 4,
    outline: bool = True,
    note: str | None = None,
) -> Image.Image:
    """The tokens ``records`` kept, drawn over the pictures of a call (any family with token boxes).

    Args:
        model: the model the call ran on (its adapter lays out the tokens).
        inputs: the processor's outputs for the call (as given to the model).
        records: ``method.last_selection`` after the call (empty: the unpruned model; originals only).
        pictures: what the processor was given, per image or video in flat (sample-major) prompt order: an image,
            or a video's frames (a list). A processor that center-crops (LLaVA-1.5's CLIP) shows the tower the
            central square: give that crop (:func:`processor_view`).
        method: the method (its name and budget go into the legend) or a label.
        samples: which batch rows to draw (default: all).
        marks: per picture, pixel boxes (in its coordinates) outlined in red in every panel (e.g. the objects a
            question is about).
        panel_height: height of every panel in pixels (widths follow each picture's aspect).
        max_frames: a video shows its first ``max_frames`` frames (views); each token frame is drawn over the first
            source frame it covers.
        outline: outline kept tokens.
        note: a first legend line, drawn in red (e.g. that the model has random weights).

    Returns:
        The canvas; ``canvas.info["legend"]`` holds the legend's text (save it with :func:`save_overlay` to keep it
        as PNG text).
    """
    try:
        items = get_adapter(model).token_boxes(inputs, source_sizes=[_first(picture).size for picture in pictures])
    except ValueError as error:
        if "source_sizes" not in str(error):
            raise
        raise ValueError(
            f"{error}. ({len(pictures)} pictures given: give one per image or video, in prompt order)"
        ) from error
    if len(pictures) != len(items):
        kinds = ", ".join(f"{item.modality} (sample {item.sample})" for item in items)
        raise ValueError(
            f"{len(pictures)} pictures given for the {len(items)} images / videos of the prompts ({kinds}): give one "
            "per image or video, in prompt order (a video as its list of frames)"
        )
    batch = int(inputs["input_ids"].shape[0])
    for record in records:
        if len(record.kept) != batch:
            raise ValueError(f"stage {record.stage} has {len(record.kept)} samples for a batch of {batch}")
    samples = list(range(batch)) if samples is None else list(samples)
    if any(b not in range(batch) for b in samples):
        raise ValueError(f"samples={samples}: the batch has samples 0 .. {batch - 1}")
    rows, labels = [], []
    for index, (item, picture) in enumerate(zip(items, pictures, strict=True)):
        if item.sample not in samples:
            continue
        frames = list(picture) if isinstance(picture, (list, tuple)) else [picture]
        if item.modality == "image" and len(frames) != 1:
            raise ValueError(f"picture {index} is an image in the prompt: give one image, not {len(frames)} frames")
        item_marks = marks[index] if marks is not None else ()
        rows.append(item_panels(item, frames, records, item_marks, panel_height, max_frames, outline))
        labels.append(_item_label(item, index, records))
    legend = overlay_legend(records, method, items, samples)
    if note:
        legend.insert(0, note)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    columns = [
        [max(panel.width, math.ceil(measure.textlength(caption)) + 4) for panel, caption in row] for row in rows
    ]
    text = [math.ceil(measure.textlength(line)) + 8 for line in [*legend, *labels]]
    width = max([sum(widths) + 4 * (len(widths) - 1) for widths in columns] + text)
    row_height = LINE + LINE + panel_height + 6
    canvas = Image.new("RGB", (width, LINE * len(legend) + 6 + row_height * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(legend):
        draw.text((4, 2 + LINE * i), line, fill=(200, 0, 0) if note and i == 0 else (0, 0, 0))
    top = LINE * len(legend) + 6
    for row, widths, label in zip(rows, columns, labels, strict=True):
        draw.text((4, top + 1), label, fill=(0, 0, 160))
        left = 0
        for (panel, caption), column in zip(row, widths, strict=True):
            draw.text((left + 2, top + LINE + 1), caption, fill=(0, 0, 0))
            canvas.paste(panel, (left, top + 2 * LINE))
            left += column + 4
        top += row_height
    canvas.info["legend"] = "\n".join(legend)
    return canvas


def save_overlay(canvas: Image.Image, path: Any) -> None:
    """Save an overlay as PNG with its legend as a ``legend`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("legend", canvas.info.get("legend", ""))
    canvas.save(path, format="PNG", pnginfo=info)


def processor_view(image: Image.Image, image_processor: Any) -> Image.Image:
    """The part of ``image`` a center-cropping image processor (CLIP's: shortest edge resized, then a central
    ``crop_size`` crop) shows the vision tower; ``image`` itself for every other processor."""
    if not getattr(image_processor, "do_center_crop", False):
        return image
    shortest = _size_field(getattr(image_processor, "size", None), "shortest_edge")
    crop = getattr(image_processor, "crop_size", None)
    crop_height, crop_width = _size_field(crop, "height"), _size_field(crop, "width")
    if not shortest or not crop_height or not crop_width:
        return image
    scale = shortest / min(image.size)
    crop_w, crop_h = min(crop_width / scale, image.width), min(crop_height / scale, image.height)
    left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
    box = (round(left), round(top), round(left + crop_w), round(top + crop_h))
    return image if box == (0, 0, image.width, image.height) else image.crop(box)


def _size_field(size: Any, key: str) -> int | None:
    """``size[key]`` of an image processor's size (a dict or a ``SizeDict``), or None."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _first(picture: Picture) -> Image.Image:
    return picture[0] if isinstance(picture, (list, tuple)) else picture


def _item_label(item: TokenBoxes, index: int, records: Sequence[StageRecord]) -> str:
    total = len(item.tokens)
    label = f"{item.modality} {index + 1} (sample {item.sample}): {total} visual tokens"
    unplaced = int((item.view < 0).sum())
    if unplaced:
        label += f" ({unplaced} newline tokens with no place)"
    for record in records:
        kept = int(torch.isin(item.tokens, torch.as_tensor(record.kept[item.sample]).cpu()).sum())
        label += f"; stage {record.stage + 1}: {kept}/{total} ({100 * kept / max(total, 1):.1f}%)"
    return label


def item_panels(
    item: TokenBoxes,
    frames: Sequence[Image.Image],
    records: Sequence[StageRecord],
    marks: Sequence[tuple[int, int, int, int]] = (),
    panel_height: int = 160,
    max_frames: int = 4,
    outline: bool = True,
) -> list[tuple[Image.Image, str]]:
    """``(panel, caption)`` of one image or video (one row of :func:`draw_overlay`): the original, then per stage
    one panel per view (a video: per frame, the first ``max_frames``). ``frames``: the image (one), or the video's
    frames; the other arguments as :func:`draw_overlay`'s."""
    views = list(range(len(item.views)))
    if item.modality == "video":
        views = views[:max_frames]

    def picture(view: int) -> Image.Image:  # a video's token frame -> the first source frame it covers
        frame = frames[view * len(frames) // len(item.views)] if item.modality == "video" else frames[0]
        width = max(1, round(panel_height * frame.width / frame.height))
        return frame.convert("RGB").resize((width, panel_height))

    def marked(panel: Image.Image, source: Image.Image) -> Image.Image:
        draw = ImageDraw.Draw(panel)
        sx, sy = panel.width / source.width, panel.height / source.height
        for x0, y0, x1, y1 in marks:
            draw.rectangle((x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1), outline=(255, 60, 60), width=2)
        return panel

    row = [(marked(picture(0), frames[0]), "original")]
    for record in records:
        kept = torch.isin(item.tokens, torch.as_tensor(record.kept[item.sample]).cpu())  # (N,)
        for view in views:
            in_view = item.view == view
            panel = stage_panel(picture(view), item.boxes[in_view], kept[in_view], outline)
            count = f"{int(kept[in_view].sum())}/{int(in_view.sum())}"
            caption = f"stage {record.stage + 1}, {item.views[view]}: {count}"
            row.append((marked(panel, frames[0]), caption))
    return row


def overlay_panels(
    image: Image.Image,
    records: Sequence[StageRecord],
    num_tokens: int,
    sample: int = 0,
    boxes: Sequence[tuple[int, int, int, int]] = (),
    panel_size: int = 336,
) -> Image.Image:
    """One panel per stage (plus the original image): dropped patches dimmed, kept patches outlined.

    The single-image form for a square raster grid (LLaVA-1.5); :func:`draw_overlay` draws any family.

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
    cells = raster_boxes(side, side)  # (side**2, 4)
    panels = [_with_boxes(base.copy(), boxes, scale_x, scale_y, "original")]
    for record in records:
        kept = torch.zeros(num_tokens, dtype=torch.bool)
        kept[torch.as_tensor(record.kept[sample]).cpu()] = True
        panel = stage_panel(base, cells, kept)
        label = f"after {record.layer} layers: {int(kept.sum())}/{num_tokens} kept"
        panels.append(_with_boxes(panel, boxes, scale_x, scale_y, label))
    canvas = Image.new("RGB", (panel_size * len(panels), panel_size + 18), (255, 255, 255))
    for i, (panel, label) in enumerate(panels):
        canvas.paste(panel, (i * panel_size, 18))
        ImageDraw.Draw(canvas).text((i * panel_size + 4, 3), label, fill=(0, 0, 0))
    return canvas


def _with_boxes(panel, boxes, scale_x: float, scale_y: float, label: str) -> tuple[Image.Image, str]:
    draw = ImageDraw.Draw(panel)
    for x0, y0, x1, y1 in boxes:
        box = (x0 * scale_x, y0 * scale_y, x1 * scale_x - 1, y1 * scale_y - 1)
        draw.rectangle(box, outline=(255, 60, 60), width=2)
    return panel, label
