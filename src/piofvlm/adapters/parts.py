"""Small parts a family adapter is composed from, each one fact about a family's layout (used by the code adapters
and by the data entries of :mod:`piofvlm.adapters.facts`)."""

from __future__ import annotations

from typing import Any


class EqualTokensPerImage:
    """Every image expands to the same number of placeholder tokens (LLaVA-1.5: 576 at 336 px): the image tokens of
    the call split evenly over ``pixel_values``' images (or the per-image features ``generate()`` pre-encoded)."""

    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        from_encoder = self.counts_from_encoder_outputs(model_kwargs)  # type: ignore[attr-defined]
        if from_encoder is not None:
            return from_encoder
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is None:
            return None
        input_ids = model_kwargs.get("input_ids")
        if input_ids is not None:  # the call's own image tokens (the same total the mechanism passes)
            num_image_tokens = int(self.visual_token_mask(input_ids).sum())  # type: ignore[attr-defined]
        num_images = int(pixel_values.shape[0])
        if num_images == 0 or num_image_tokens % num_images:
            raise ValueError(
                f"{num_image_tokens} image tokens in input_ids cannot be split evenly over {num_images} images"
            )
        return [num_image_tokens // num_images] * num_images
