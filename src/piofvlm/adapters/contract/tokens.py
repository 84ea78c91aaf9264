"""The visual tokens of a call: their ids, how many belong to each image / video, which modality, in prompt order."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from piofvlm import transformers_compat


class VisualTokens:
    """Placeholder ids and per-item token counts (defaults: ``config.image_token_id`` / ``video_token_id``, counts
    from the features ``generate()`` pre-encoded, else contiguous runs)."""

    model: nn.Module

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # ------------------------------------------------------------------------------------------ visual tokens
    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        """Number of placeholder tokens of each image (and video) of the batch, in prompt order, or ``None``.

        ``model_kwargs`` are the keyword arguments of the multimodal model's forward (``input_ids``, ``pixel_values``,
        ``image_sizes``, ...). ``None`` makes the mechanism treat each contiguous run of visual tokens as one item.

        Default: the per-item sizes of :meth:`item_token_counts` for images and videos, placed in prompt order by
        :func:`items_in_prompt_order` (so text between an item's tokens, e.g. row breaks, does not split it); ``None``
        when the family gives no sizes (each image is then one contiguous run, as in InternVL).
        """
        input_ids = model_kwargs.get("input_ids")
        images = self.item_token_counts(model_kwargs, "image")
        videos = self.item_token_counts(model_kwargs, "video") if self.video_token_id is not None else None
        if input_ids is None or (images is None and videos is None):
            return None
        modality = self.visual_modality(input_ids, model_kwargs)
        return items_in_prompt_order(modality, {0: images or [], 1: videos or []})

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        """Visual tokens of each image (``modality="image"``) or video of the call, in the order the model consumes
        them, or ``None`` if the family does not know them (then contiguous runs are items).

        Default: from the per-item features ``generate()`` pre-encoded (``mm_encoder_outputs``), if they are a list.
        """
        return self.counts_from_encoder_outputs(model_kwargs, modality)

    @staticmethod
    def counts_from_encoder_outputs(model_kwargs: dict[str, Any], modality: str = "image") -> list[int] | None:
        """Per-item token counts from precomputed encoder outputs, if the call carries them.

        ``generate()`` (transformers 5.x) runs the vision tower before the model call and passes
        ``mm_encoder_outputs`` instead of ``pixel_values``/``image_sizes``; their ``pooler_output`` is a list with
        one ``(tokens, d)`` tensor per item.
        """
        features = transformers_compat.encoded_features(model_kwargs, modality)
        if isinstance(features, (list, tuple)):
            return [int(f.shape[0]) for f in features]
        return None

    @property
    def video_token_id(self) -> int | None:
        """Placeholder id of video tokens, or None for families without video."""
        value = getattr(self.model.config, "video_token_id", None)
        return None if value is None else int(value)

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` bool: which prompt positions hold visual tokens (image, and video where the family has it)."""
        return self.visual_modality(input_ids) >= 0

    def visual_modality(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """``(B, S)`` long: 0 for image tokens, 1 for video tokens, -1 elsewhere (``budget_scope="modality"``).

        ``model_kwargs`` (the multimodal call's keyword arguments) are for families whose video tokens reuse the image
        id and are told apart by another input (GLM-4.xV's ``mm_token_type_ids``).
        """
        modality = torch.full_like(input_ids, -1, dtype=torch.long)
        modality = modality.masked_fill(input_ids == self.image_token_id, 0)
        if self.video_token_id is not None:
            modality = modality.masked_fill(input_ids == self.video_token_id, 1)
        return modality


def items_in_prompt_order(modality: torch.Tensor, sizes: dict[int, list[int]]) -> list[int] | None:
    """Token counts of the images and videos of a batch in the order they appear, images and videos mixed.

    Args:
        modality: ``(B, S)`` long, as :meth:`ModelAdapter.visual_modality` (0 image, 1 video, -1 elsewhere).
        sizes: per modality, the token count of each of its items in batch order (as the model consumes them).

    Returns:
        The count of each item in flat (sample-major) prompt order, or ``None`` if the counts do not match the tokens.
        A video written frame by frame with text in between is still one item.
    """
    items = prompt_items(modality, sizes)
    return None if items is None else [length for _, _, length in items]


def prompt_items(modality: torch.Tensor, sizes: dict[int, list[int]]) -> list[tuple[int, int, int]] | None:
    """Like :func:`items_in_prompt_order`, but each item as ``(modality, index within its modality, tokens)``."""
    modality = modality.flatten()
    modality = modality[modality >= 0]  # (N_visual,)
    item = torch.empty_like(modality)
    for value in (0, 1):
        counts = sizes.get(value, [])
        slots = modality == value
        if int(slots.sum()) != sum(counts):
            return None
        lengths = torch.tensor(counts, dtype=torch.long, device=modality.device)
        item[slots] = torch.repeat_interleave(torch.arange(len(counts), device=modality.device), lengths)
    # Consecutive visual tokens of the same (modality, index) are one image or video.
    keys, run_lengths = torch.unique_consecutive(modality * (len(item) + 1) + item, return_counts=True)
    return [
        (int(key) // (len(item) + 1), int(key) % (len(item) + 1), int(length))
        for key, length in zip(keys.tolist(), run_lengths.tolist(), strict=True)
    ]
