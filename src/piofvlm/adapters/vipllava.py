"""ViP-LLaVA (``VipLlavaForConditionalGeneration``): LLaVA-1.5's layout (a fixed number of tokens per image, the CLIP
[CLS] token dropped, 1-D RoPE on a Llama text model, ``LlavaProcessor``) with image features taken from several
vision layers at once.

Read from transformers 5.24 (``modeling_vipllava.py``): ``get_image_features`` concatenates
``hidden_states[i][:, 1:]`` over ``config.vision_feature_layers`` (``[-2, -5, -8, -11, 6]`` in the checkpoints) along
the channels and projects them (``VipLlavaMultiModalProjector``: a LayerNorm and two linears), always dropping
[CLS]; there is no ``vision_feature_select_strategy``. What this changes for piofvlm: nothing in the decoder (the
adapter is LLaVA's), but the encoder-side methods that read one vision layer's attention (``visionzip``, ``vscan``,
``chain``) refuse a list of feature layers (the visual tokens mix several layers); with an int
``vision_feature_layers`` they run as for LLaVA. ``pool`` pools the patch grid as for LLaVA.
"""

from __future__ import annotations

from typing import Any

from piofvlm.adapters.llava import LlavaAdapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class VipLlavaAdapter(LlavaAdapter):
    """ViP-LLaVA: LLaVA-1.5's adapter; image features from several vision layers (see the module doc)."""

    model_types = ("vipllava",)
    feature_layer_field = "vision_feature_layers"

    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        """``(image_size / patch_size)**2`` tokens per image of ``pixel_values`` ([CLS] always dropped)."""
        from_encoder = self.counts_from_encoder_outputs(model_kwargs)
        if from_encoder is not None:
            return from_encoder
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is None:
            return None
        vision = self.model.config.vision_config
        return [(vision.image_size // vision.patch_size) ** 2] * int(pixel_values.shape[0])

    def _select_strategy(self) -> str:
        return "default"  # the [CLS] token is always dropped
