"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): anyres images plus pooled video, 1-D RoPE.

The same mechanism as LLaVA-NeXT fits: a Llama-style (Qwen2) language model with ordinary 1-D positions, so kept
tokens keep their positions (or are renumbered, ``positions="renumber"``). Visual tokens are the image placeholders
*and* the video placeholders; an image's count includes its base view, its unpadded (possibly downscaled,
``anyres_max_N``) high-resolution grid and its ``image_newline`` tokens; a video's count is
``frames * ceil(side / 2)**2 + 1`` (pooled frames, then one newline).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.models.llava_onevision import modeling_llava_onevision as mlo

from piofvlm.adapters.base import items_in_prompt_order
from piofvlm.adapters.llava import LlavaAdapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class LlavaOnevisionAdapter(LlavaAdapter):
    """Images and videos in any order; each image and each video is one budget group (``budget_scope="image"``)."""

    model_types = ("llava_onevision",)

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def visual_modality(self, input_ids: torch.Tensor) -> torch.Tensor:
        modality = torch.full_like(input_ids, -1, dtype=torch.long)
        modality = modality.masked_fill(input_ids == self.image_token_id, 0)
        return modality.masked_fill(input_ids == self.video_token_id, 1)

    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None:
            return None
        sizes = {0: self._image_sizes(model_kwargs), 1: self._video_sizes(model_kwargs)}
        return items_in_prompt_order(self.visual_modality(input_ids), sizes)

    # ---------------------------------------------------------------------------------------------- counting
    @property
    def _side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _image_sizes(self, model_kwargs: dict[str, Any]) -> list[int]:
        """Tokens per image, the shape arithmetic of ``LlavaOnevisionModel.pack_image_features``."""
        encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:  # generate() encodes the images first and passes per-image features
            return [int(features.shape[0]) for features in encoded.pooler_output]
        image_sizes = model_kwargs.get("image_sizes")
        if image_sizes is None or model_kwargs.get("pixel_values") is None:
            return []
        config = self.model.config
        side = self._side
        side_tokens = side * side  # one view (the model checks this for the base view)
        aspect = model_kwargs.get("vision_aspect_ratio") or config.vision_aspect_ratio
        max_num_patches = int(aspect.removeprefix("anyres_max_"))
        batch_num_images = model_kwargs.get("batch_num_images")
        if batch_num_images is None:
            patched = [True] * len(image_sizes)
        else:
            patched = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        counts = []
        for size, should_patch in zip(torch.as_tensor(image_sizes).tolist(), patched, strict=True):
            tiles = (
                mlo.image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                if should_patch
                else 1
            )
            if tiles <= 1:
                counts.append(side_tokens + 1)  # one view + one newline
                continue
            rows, cols = mlo.get_anyres_image_grid_shape(
                size, config.image_grid_pinpoints, config.vision_config.image_size
            )
            grid = mlo.unpad_image(torch.empty(0, rows * side, cols * side), torch.as_tensor(size))
            height, width = grid.shape[1], grid.shape[2]
            ratio = math.sqrt(height * width / (max_num_patches * side**2))
            if ratio > 1.1:
                height, width = int(height // ratio), int(width // ratio)
            counts.append(side_tokens + height * (width + 1))
        return counts

    def _video_sizes(self, model_kwargs: dict[str, Any]) -> list[int]:
        encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("video")
        if encoded is not None:
            return [int(encoded.pooler_output.shape[1])] * int(encoded.pooler_output.shape[0])
        videos = model_kwargs.get("pixel_values_videos")
        if videos is None:
            return []
        pooled = math.ceil(self._side / 2) ** 2
        return [int(videos.shape[1]) * pooled + 1] * int(videos.shape[0])
