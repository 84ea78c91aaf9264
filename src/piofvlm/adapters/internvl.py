"""InternVL (``InternVLForConditionalGeneration``, InternVL 2.5 / 3 in the transformers layout).

Layout facts (``InternVLProcessor.replace_image_token``): an image is ``<img>`` + ``image_seq_length * tiles``
``<IMG_CONTEXT>`` tokens + ``</img>``: one contiguous run, its tiles (the dynamic-resolution crops, then the
thumbnail) back to back, ``image_seq_length`` tokens each (the vision tower's patch grid after a 2x2 pixel shuffle).
The model sees no per-image tile count (``pixel_values`` is one tensor of tiles), so each run is one image: the base
class's default. A video is written frame by frame as images (``Frame1: <img> ... </img>``) with the image token, so
each frame is an item of its own (``budget_scope="sample"`` pools them). 1-D RoPE (a Qwen2/Qwen3 or Llama text
model), so ``positions="renumber"`` works as for LLaVA.

The adapter is a data entry (``adapters/facts.py``: LLaVA's module tree,
:class:`~piofvlm.adapters.parts.RunsAreItems`); this module keeps the one part that is code, the tile geometry
(:class:`InternVLTiles`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from piofvlm.adapters.boxes import TokenBoxes, tiled_image_boxes


class InternVLTiles:
    """The part of InternVL's adapter that is code: an image (or video frame) is one contiguous run of
    ``<IMG_CONTEXT>`` tokens, its tiles back to back, each a square token grid (``pool``'s sources, overlays)."""

    @property
    def tile_side(self) -> int:
        """Side of one tile's token grid: patches per side times the pixel-shuffle ratio."""
        vision = self.model.config.vision_config
        patches = vision.image_size[0] // vision.patch_size[0]
        return int(patches * self.model.config.downsample_ratio)

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image (run) in prompt order: ``crop`` = its tile in ``pixel_values``, ``patch`` = token within the tile
        (after the pixel shuffle), ``grid`` = tile within the image, ``row``/``col`` in the tile's square grid."""
        side = self.tile_side
        per_tile = side * side
        visual = self.visual_token_mask(model_kwargs["input_ids"])
        if model_kwargs.get("attention_mask") is not None:
            visual = visual & model_kwargs["attention_mask"].bool()
        images, first_tile = [], 0
        for row in visual:
            starts = (row & ~torch.nn.functional.pad(row, (1, 0))[:-1]).nonzero()[:, 0].tolist()
            ends = (row & ~torch.nn.functional.pad(row, (0, 1))[1:]).nonzero()[:, 0].tolist()
            for start, end in zip(starts, ends, strict=True):
                count = end - start + 1
                if count % per_tile:
                    raise RuntimeError(
                        f"an image run of {count} tokens is not a whole number of {per_tile}-token tiles"
                    )
                token = torch.arange(count)
                tile = token // per_tile
                images.append(
                    {
                        "crop": first_tile + tile,
                        "patch": token % per_tile,
                        "grid": tile,
                        "row": token % per_tile // side,
                        "col": token % side,
                    }
                )
                first_tile += math.ceil(count / per_tile)
        return images

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Per image (run, so a video frame is an image): one tile (a square grid over the whole picture), or
        ``n`` tiles laid out ``rows x cols`` over the picture (view ``"tiles"``) plus the thumbnail (view
        ``"thumbnail"``, the whole picture). The grid is the processor's choice for the picture's aspect among the
        grids of ``n`` tiles, so ``source_sizes`` are needed for images of several tiles."""
        tile_pixels = int(self.model.config.vision_config.image_size[0])
        return tiled_image_boxes(
            "internvl",
            self.visual_slots(model_kwargs),
            self.visual_token_sources(model_kwargs),
            self.tile_side,
            tile_pixels,
            source_sizes,
        )
