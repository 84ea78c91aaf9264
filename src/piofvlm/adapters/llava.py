"""LLaVA-1.5 style models (``LlavaForConditionalGeneration``): a fixed number of visual tokens per image."""

from __future__ import annotations

from typing import Any

from transformers.models.llama import modeling_llama

from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    """Every image expands to the same number of placeholder tokens (576 for LLaVA-1.5 at 336 px)."""

    model_types = ("llava",)

    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is None:
            return None
        num_images = int(pixel_values.shape[0])
        if num_images == 0 or num_image_tokens % num_images:
            raise ValueError(
                f"{num_image_tokens} image tokens in input_ids cannot be split evenly over {num_images} images"
            )
        return [num_image_tokens // num_images] * num_images

    def rotary_fn(self):  # noqa: D102 - documented in the base class
        if self.text_config.model_type in ("llama", "mistral", "qwen2"):
            return modeling_llama.apply_rotary_pos_emb
        return None
