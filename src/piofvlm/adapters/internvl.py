"""InternVL (``InternVLForConditionalGeneration``, InternVL 2.5 / 3 in the transformers layout).

Layout facts (``InternVLProcessor.replace_image_token``): an image is ``<img>`` + ``image_seq_length * tiles``
``<IMG_CONTEXT>`` tokens + ``</img>``: one contiguous run, its tiles (the dynamic-resolution crops, then the
thumbnail) back to back, ``image_seq_length`` tokens each (the vision tower's patch grid after a 2x2 pixel shuffle).
The model sees no per-image tile count (``pixel_values`` is one tensor of tiles), so each run is one image: the base
class's default. A video is written frame by frame as images (``Frame1: <img> ... </img>``) with the image token, so
each frame is an item of its own (``budget_scope="sample"`` pools them). 1-D RoPE (a Qwen2/Qwen3 or Llama text
model), so ``positions="renumber"`` works as for LLaVA.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class InternVLAdapter(ModelAdapter):
    """One contiguous run of ``<IMG_CONTEXT>`` tokens per image (or video frame); tiles are square token grids."""

    model_types = ("internvl",)

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        return None  # pooled features are per tile, not per image: each run of image tokens is one image

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
