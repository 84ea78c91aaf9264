"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT images plus pooled videos.

Images are laid out as in LLaVA-NeXT (base view, unpadded anyres grid, one ``image_newline`` per row); a video is
one run of ``video_token_id`` placeholders: every frame's patch grid average-pooled by ``spatial_pool_stride``
(``frames * (side // stride)**2`` tokens, no newline). Images and videos may come in any order in a prompt; each is
one item (budget group under ``budget_scope="image"``). 1-D RoPE: ``positions="renumber"`` works as for LLaVA.
"""

from __future__ import annotations

from typing import Any

import torch

from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.llava_next import LlavaNextAdapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT images and pooled videos, in prompt order."""

    model_types = ("llava_next_video",)

    # Images and videos mixed: place the per-item counts in prompt order (the model passes input_ids by keyword).
    image_token_counts = ModelAdapter.image_token_counts

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
