"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT images plus pooled videos.

Images are laid out as in LLaVA-NeXT (base view, unpadded anyres grid, one ``image_newline`` per row); a video is
one run of ``video_token_id`` placeholders: every frame's patch grid average-pooled by ``spatial_pool_stride``
(``frames * (side // stride)**2`` tokens, no newline). Images and videos may come in any order in a prompt; each is
one item (budget group under ``budget_scope="image"``). 1-D RoPE: ``positions="renumber"`` works as for LLaVA.

It stays code (not a data entry): its image counts and sources run LLaVA-NeXT's anyres packing, and images and
videos are placed in prompt order from two kinds of counts (pooled frames for videos).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from piofvlm.adapters.base import prompt_items
from piofvlm.adapters.boxes import TokenBoxes, frame_names, raster_boxes, split_by_sample
from piofvlm.adapters.contract.tokens import VisualTokens
from piofvlm.adapters.llava import anyres_view_boxes
from piofvlm.adapters.llava_next import LlavaNextAdapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT images and pooled videos, in prompt order."""

    model_types = ("llava_next_video",)

    # Images and videos mixed: place the per-item counts in prompt order (the model passes input_ids by keyword).
    image_token_counts = VisualTokens.image_token_counts

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        if modality == "image":
            return super().item_token_counts(model_kwargs, "image")
        encoded = self.counts_from_encoder_outputs(model_kwargs, "video")
        if encoded is not None:
            return encoded
        features = self._encoded_videos(model_kwargs)
        if features is not None:  # generate(): (videos, tokens, d)
            return [int(features.shape[1])] * int(features.shape[0])
        videos = model_kwargs.get("pixel_values_videos")
        if videos is None:
            return []
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        per_frame = (side // config.spatial_pool_stride) ** 2
        return [int(videos.shape[1]) * per_frame] * int(videos.shape[0])

    @staticmethod
    def _encoded_videos(model_kwargs: dict[str, Any]) -> torch.Tensor | None:
        from piofvlm import transformers_compat

        features = transformers_compat.encoded_features(model_kwargs, "video")
        return features if isinstance(features, torch.Tensor) else None

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        has_video = (
            model_kwargs.get("pixel_values_videos") is not None or self._encoded_videos(model_kwargs) is not None
        )
        if has_video:
            raise ValueError(
                "encoder-side methods (pool, visionzip, vscan, chain) are not supported on llava_next_video prompts "
                "with a video: its pooled frame tokens have no per-patch vision-tower map here; use an in-LLM method "
                "(pio, random, fastv, ...) or images only"
            )
        return super().visual_token_sources(model_kwargs)

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Images as LLaVA-NeXT's; a video one view per frame: its ``spatial_pool_stride``-pooled grid in raster
        order (no newline). Items in prompt order."""
        has_images = model_kwargs.get("pixel_values") is not None
        images = LlavaNextAdapter.visual_token_sources(self, model_kwargs) if has_images else []
        videos = model_kwargs.get("pixel_values_videos")
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        pooled = side // config.spatial_pool_stride
        frames = 0 if videos is None else int(videos.shape[1])
        num_videos = 0 if videos is None else int(videos.shape[0])
        modality = (
            self.visual_modality(model_kwargs["input_ids"]).cpu().masked_fill(~self.visual_slots(model_kwargs), -1)
        )
        sizes = {0: [len(source["crop"]) for source in images], 1: [frames * pooled**2] * num_videos}
        order = prompt_items(modality, sizes)
        if order is None:
            raise ValueError(f"llava_next_video: the images / videos {sizes} do not match the visual tokens")
        visual = self.visual_slots(model_kwargs)
        items = []
        for (sample, tokens), (kind, index, _) in zip(
            split_by_sample(visual, [count for _, _, count in order]), order, strict=True
        ):
            if kind == 0:
                boxes, view, views = anyres_view_boxes(images[index], side)
                items.append(TokenBoxes(sample, "image", tokens, boxes, view, views))
            else:
                boxes = raster_boxes(pooled, pooled).repeat(frames, 1)
                view = torch.arange(frames).repeat_interleave(pooled**2)
                items.append(TokenBoxes(sample, "video", tokens, boxes, view, frame_names(frames)))
        return items
