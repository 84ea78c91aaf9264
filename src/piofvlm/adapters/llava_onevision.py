"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): anyres images plus pooled video, 1-D RoPE.

The same mechanism as LLaVA-NeXT fits: a Llama-style (Qwen2) language model with ordinary 1-D positions, so kept
tokens keep their positions (or are renumbered, ``positions="renumber"``). Visual tokens are the image placeholders
*and* the video placeholders; an image's count includes its base view, its unpadded (possibly downscaled,
``anyres_max_N``) high-resolution grid and its ``image_newline`` tokens; a video's count is
``frames * ceil(side / 2)**2 + 1`` (pooled frames, then one newline).

It stays code (not a data entry of ``adapters/facts.py``): counts, sources and vision scores follow the model's own
anyres packing and video pooling. Its vision tower is LLaVA's, composed from
:class:`~piofvlm.adapters.parts.ClipVisionTower`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from piofvlm import transformers_compat
from piofvlm.adapters.base import ModelAdapter, items_in_prompt_order, prompt_items
from piofvlm.adapters.boxes import TokenBoxes, cell_boxes, frame_names, no_place, split_by_sample
from piofvlm.adapters.llava import anyres_view_boxes
from piofvlm.adapters.parts import ClipVisionTower
from piofvlm.adapters.registry import register_adapter


def _anyres():
    """``modeling_llava_onevision``'s anyres helpers (through the compat module)."""
    return transformers_compat.anyres_helpers("llava_onevision")


@register_adapter
class LlavaOnevisionAdapter(ClipVisionTower, ModelAdapter):
    """Images and videos in any order; each image and each video is one budget group (``budget_scope="image"``)."""

    model_types = ("llava_onevision",)

    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None:
            return None
        sizes = {0: self._image_sizes(model_kwargs), 1: self._video_sizes(model_kwargs)}
        return items_in_prompt_order(self.visual_modality(input_ids), sizes)

    # ------------------------------------------------------------------------------------------ vision tower
    # SigLIP has no [CLS] token and the "full" strategy feeds every patch to the projector, so every patch is a visual
    # token and scores are the mean attention received (VisionZip's rule for encoders without [CLS]). Image tokens
    # (base view, unpadded and possibly downscaled high-resolution grid, newlines) and video tokens (2x2-pooled
    # frames, one newline) are laid out by the model's own packing / pooling; per-patch scores and keys go through
    # the same packing / pooling (VisPruner's rule), so a downscaled or pooled token gets the interpolated score of the
    # patches it comes from.
    def _pack(self, per_crop: list[torch.Tensor], image_sizes: torch.Tensor, inputs: dict[str, Any]) -> list:
        """The model's ``pack_image_features`` on ``(crops, side**2, f)`` tensors; newlines are rows of NaN."""
        aspect = inputs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        newline = torch.full((per_crop[0].shape[-1],), float("nan"), dtype=per_crop[0].dtype)
        packed, _ = self.multimodal_model.pack_image_features(
            per_crop, image_sizes, image_newline=newline, vision_aspect_ratio=aspect
        )
        return packed

    def _crops_per_image(self, inputs: dict[str, Any]) -> list[int]:
        config = self.model.config
        batch_num_images = inputs.get("batch_num_images")
        sizes = torch.as_tensor(inputs["image_sizes"]).tolist()
        patched = (
            [True] * len(sizes)
            if batch_num_images is None
            else [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        )
        return [
            _anyres().image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            if p
            else 1
            for size, p in zip(sizes, patched, strict=True)
        ]

    def _item_tables(self, per_patch: dict[str, torch.Tensor], inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Per image, then per video: ``(tokens, f)`` rows in the model's token order (NaN rows for newlines)."""
        items = []
        if "image" in per_patch:
            crops = self._crops_per_image(inputs)
            items += self._pack(list(per_patch["image"].split(crops)), torch.as_tensor(inputs["image_sizes"]), inputs)
        if "video" in per_patch:
            videos = inputs["pixel_values_videos"]
            pooled = self.multimodal_model.apply_pooling(per_patch["video"])  # (B * F, pooled, f)
            pooled = pooled.reshape(videos.shape[0], -1, pooled.shape[-1])
            newline = torch.full_like(pooled[:, :1], float("nan"))
            items += list(torch.cat([pooled, newline], dim=1))
        return items

    def vision_token_scores(self, layer_index: int, vision: Any, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One row per image, then per video (model order); one column per visual token (see the section note)."""
        inputs = vision.image_kwargs
        per_patch = {}
        for modality in ("image", "video"):
            if (modality, layer_index % len(self.vision_layers)) not in vision.hidden:
                continue
            if modality == "image" and inputs.get("pixel_values") is None:
                continue
            if modality == "video" and inputs.get("pixel_values_videos") is None:
                continue
            probs, keys = self.vision_attention(layer_index, vision.layer_input(layer_index, modality))
            offset = 1 if self.vision_has_cls else 0
            scores = probs[:, :, 0, offset:].mean(1) if mode == "cls" else probs.mean(1).mean(1)[:, offset:]
            per_patch[modality] = torch.cat([scores[..., None], keys[:, offset:].float()], dim=-1)
        items = self._item_tables(per_patch, inputs)
        width = max(len(item) for item in items)
        table = torch.stack([torch.nn.functional.pad(item, (0, 0, 0, width - len(item))) for item in items])
        return table[..., 0], table[..., 1:]

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image or video in prompt order: ``crop`` = its row in :meth:`vision_token_scores` (images first),
        ``patch`` = its token; images: grid 0 = base view, 1 = high-resolution grid (its newline column included);
        videos: grid = frame, then the newline. ``crop``/``patch`` are -1 for newlines."""
        self._check_patch_tokens()
        side = self._side
        per_patch = {}
        if model_kwargs.get("pixel_values") is not None:
            per_patch["image"] = torch.zeros(sum(self._crops_per_image(model_kwargs)), side * side, 1)
        if model_kwargs.get("pixel_values_videos") is not None:
            videos = model_kwargs["pixel_values_videos"]
            per_patch["video"] = torch.zeros(videos.shape[0] * videos.shape[1], side * side, 1)
        tables = self._item_tables(per_patch, model_kwargs)
        num_images = len(self._crops_per_image(model_kwargs)) if "image" in per_patch else 0
        input_ids = model_kwargs["input_ids"]
        modality = self.visual_modality(input_ids)
        if model_kwargs.get("attention_mask") is not None:
            modality = modality.masked_fill(~model_kwargs["attention_mask"].bool(), -1)
        sizes = {0: [len(t) for t in tables[:num_images]], 1: [len(t) for t in tables[num_images:]]}
        items = prompt_items(modality, sizes)
        if items is None:
            raise RuntimeError("the image / video inputs do not match the visual tokens of the prompt")
        pooled_side = math.ceil(side / 2)
        sources = []
        for kind, index, count in items:
            row_index = num_images * kind + index
            newline = torch.isnan(tables[row_index][:, 0])
            token = torch.arange(count)
            if kind == 1:  # video: frames of pooled_side x pooled_side, then one newline
                frame = token // pooled_side**2
                grid, row, col = frame, token % pooled_side**2 // pooled_side, token % pooled_side
            else:
                base = token < side * side
                rest = token - side * side
                newlines = newline.nonzero()
                width = int(newlines[0, 0]) - side * side + 1 if len(newlines) else 1
                grid = torch.where(base, 0, 1)
                row = torch.where(base, token // side, rest // width)
                col = torch.where(base, token % side, rest % width)
            sources.append(
                {
                    "crop": torch.where(newline, -1, row_index),
                    "patch": torch.where(newline, -1, token),
                    "grid": grid,
                    "row": row,
                    "col": col,
                }
            )
        return sources

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Images as LLaVA-NeXT's (base view + unpadded, possibly downscaled, high-resolution grid; an image of a
        multi-image prompt has the base view only); videos one view per frame (its 2x2-pooled grid), the trailing
        newline without a place. Items in prompt order."""
        sources = self.visual_token_sources(model_kwargs)
        num_images = len(self._crops_per_image(model_kwargs)) if model_kwargs.get("pixel_values") is not None else 0
        counts = [len(source["crop"]) for source in sources]
        side, pooled = self._side, math.ceil(self._side / 2)
        items = []
        for (sample, tokens), source in zip(
            split_by_sample(self.visual_slots(model_kwargs), counts), sources, strict=True
        ):
            if int(source["crop"].max()) < num_images:
                boxes, view, views = anyres_view_boxes(source, side)
                items.append(TokenBoxes(sample, "image", tokens, boxes, view, views))
                continue
            placed = source["crop"] >= 0
            frames = int(source["grid"][placed].max()) + 1
            boxes, view = no_place(len(tokens)), torch.where(placed, source["grid"], -1)
            boxes[placed] = cell_boxes(source["row"][placed], source["col"][placed], pooled, pooled)
            items.append(TokenBoxes(sample, "video", tokens, boxes, view, frame_names(frames)))
        return items

    # ---------------------------------------------------------------------------------------------- counting
    @property
    def _side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _image_sizes(self, model_kwargs: dict[str, Any]) -> list[int]:
        """Tokens per image, the shape arithmetic of ``LlavaOnevisionModel.pack_image_features``."""
        encoded = transformers_compat.encoded_features(model_kwargs, "image")
        if encoded is not None:  # generate() encodes the images first and passes per-image features
            return [int(features.shape[0]) for features in encoded]
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
                _anyres().image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                if should_patch
                else 1
            )
            if tiles <= 1:
                counts.append(side_tokens + 1)  # one view + one newline
                continue
            rows, cols = _anyres().get_anyres_image_grid_shape(
                size, config.image_grid_pinpoints, config.vision_config.image_size
            )
            grid = _anyres().unpad_image(torch.empty(0, rows * side, cols * side), torch.as_tensor(size))
            height, width = grid.shape[1], grid.shape[2]
            ratio = math.sqrt(height * width / (max_num_patches * side**2))
            if ratio > 1.1:
                height, width = int(height // ratio), int(width // ratio)
            counts.append(side_tokens + height * (width + 1))
        return counts

    def _video_sizes(self, model_kwargs: dict[str, Any]) -> list[int]:
        encoded = transformers_compat.encoded_features(model_kwargs, "video")
        if encoded is not None:
            return [int(encoded.shape[1])] * int(encoded.shape[0])
        videos = model_kwargs.get("pixel_values_videos")
        if videos is None:
            return []
        pooled = math.ceil(self._side / 2) ** 2
        return [int(videos.shape[1]) * pooled + 1] * int(videos.shape[0])
