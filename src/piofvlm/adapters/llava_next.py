"""LLaVA-NeXT (1.6) models: anyres tiling, so each image has its own number of visual tokens.

It stays code (not a data entry of ``adapters/facts.py``): an image's count and token sources come from the model's
own anyres packing (``pack_image_features`` run on (crop, patch) labels). Its vision tower is LLaVA's, composed from
:class:`~piofvlm.adapters.parts.ClipVisionTower`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from piofvlm import transformers_compat
from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.boxes import TokenBoxes, split_by_sample
from piofvlm.adapters.llava import anyres_view_boxes
from piofvlm.adapters.parts import ClipVisionTower
from piofvlm.adapters.registry import register_adapter


def _anyres():
    """``modeling_llava_next``'s anyres helpers (through the compat module)."""
    return transformers_compat.anyres_helpers("llava_next")


@register_adapter
class LlavaNextAdapter(ClipVisionTower, ModelAdapter):
    """Per image: the base view, then the unpadded high-resolution grid with one ``image_newline`` token per row.

    All of these are placeholder tokens of the image, so all of them are visual tokens and count towards a budget.
    """

    model_types = ("llava_next",)

    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        # Images only, so model order is prompt order (LLaVA-NeXT passes input_ids positionally: not in kwargs).
        return self.item_token_counts(model_kwargs, "image")

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        """Images: base view (+1 with ``"full"``), unpadded high-resolution grid and one newline per grid row."""
        from_encoder = self.counts_from_encoder_outputs(model_kwargs, modality)
        if from_encoder is not None or modality != "image":
            return from_encoder
        image_sizes = model_kwargs.get("image_sizes")
        if image_sizes is None or model_kwargs.get("pixel_values") is None:
            return None
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        strategy = model_kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        base = side * side + (1 if strategy == "full" else 0)
        counts = []
        for size in torch.as_tensor(image_sizes).tolist():
            num_tiles = _anyres().image_size_to_num_patches(
                size, config.image_grid_pinpoints, config.vision_config.image_size
            )
            if num_tiles <= 1:
                counts.append(base + 1)  # base view + one newline
                continue
            rows, cols = _anyres().get_anyres_image_grid_shape(
                size, config.image_grid_pinpoints, config.vision_config.image_size
            )
            # Same unpadding as the model, applied to an empty tensor to read off the shape only.
            grid = _anyres().unpad_image(torch.empty(0, rows * side, cols * side), torch.as_tensor(size))
            height, width = grid.shape[1], grid.shape[2]
            counts.append(base + height * (width + 1))
        return counts

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Two views per image: the base view (``side x side`` over the whole picture) and the unpadded
        high-resolution grid (its tiles' patches over the whole picture; padding removed as the model does); the
        ``image_newline`` closing each grid row has no place. An image of one tile has the base view only."""
        sources = self.visual_token_sources(model_kwargs)
        side = self._check_patch_tokens()
        items = []
        for (sample, tokens), source in zip(
            split_by_sample(self.visual_slots(model_kwargs), [len(s["crop"]) for s in sources]), sources, strict=True
        ):
            boxes, view, views = anyres_view_boxes(source, side)
            items.append(TokenBoxes(sample, "image", tokens, boxes, view, views))
        return items

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Base view first (grid 0, ``side x side``), then the unpadded high-resolution grid with its trailing
        ``image_newline`` column (grid 1). The model's own packing is run on (crop, patch) labels to get the order.
        """
        side = self._check_patch_tokens()
        config = self.model.config
        image_sizes = torch.as_tensor(model_kwargs["image_sizes"])
        labels, start = [], 0
        for size in image_sizes.tolist():
            num_crops = _anyres().image_size_to_num_patches(
                size, config.image_grid_pinpoints, config.vision_config.image_size
            )
            crop = torch.arange(start, start + num_crops)[:, None].expand(-1, side * side)
            patch = torch.arange(side * side)[None].expand(num_crops, -1)
            labels.append(torch.stack([crop, patch], dim=-1).double())  # (num_crops, side*side, 2)
            start += num_crops
        newline = torch.tensor([-1.0, -1.0], dtype=torch.float64)
        packed, _ = self.multimodal_model.pack_image_features(
            labels, image_sizes, self._select_strategy(), image_newline=newline
        )
        images = []
        for tokens in packed:
            crop, patch = tokens[:, 0].long(), tokens[:, 1].long()
            index = torch.arange(crop.shape[0])
            base = index < side * side
            rest = index - side * side
            newlines = (crop < 0).nonzero()
            width = int(newlines[0, 0]) - side * side + 1 if len(newlines) else 1
            images.append(
                {
                    "crop": crop,
                    "patch": patch,
                    "grid": torch.where(base, 0, 1),
                    "row": torch.where(base, index // side, rest // width),
                    "col": torch.where(base, index % side, rest % width),
                }
            )
        return images
