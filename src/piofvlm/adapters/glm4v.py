"""GLM-4.1V / 4.5V (``Glm4vForConditionalGeneration``) and GLM-4.6V (``Glm46VForConditionalGeneration``).

Both run the same text model (``Glm4vTextModel``; GLM-4.6V builds it from a ``glm4v_text`` config) and the same
multimodal merge, so one adapter serves ``glm4v`` and ``glm46v``. What differs from Qwen2-VL, whose mechanism it
reuses (3-D M-RoPE positions from ``get_rope_index`` kept as they are, ``rope_deltas`` for decoding,
``positions="renumber"`` refused):

* **Video tokens reuse the image token id.** ``Glm4vProcessor`` writes a video as ``<|begin_of_video|>`` + per frame
  ``<|begin_of_image|>`` + ``<|image|>`` x ``h * w / merge**2`` + ``<|end_of_image|>`` + a timestamp, then
  ``<|end_of_video|>``; only ``mm_token_type_ids == 2`` marks those tokens as video. :meth:`visual_modality` reads it,
  so a video (its frames split by text) is one item, counted from ``video_grid_thw``. Stock transformers 5.24 cannot
  take an image and a video in one call (``get_placeholder_mask`` counts the video's tokens as image tokens and
  refuses), so a batch holds images or videos.
* **Partial, interleaved rotary.** The rotary tables are ``(B, S, rotary_dim)`` with ``rotary_dim = head_dim *
  partial_rotary_factor``, already combined per M-RoPE section and repeated pairwise; the attention rotates pairs
  ``(x[2i], x[2i+1])`` of the first ``rotary_dim`` dims (``rotate_half_llm``). The fast PIO proxy and the
  explicit-attention methods use that very function (``modeling_glm4v.apply_rotary_pos_emb``).
* **Sandwich norms.** A decoder layer normalises the attention output (``post_self_attn_layernorm``) and the MLP
  output (``post_mlp_layernorm``) before each residual add: :meth:`decoder_layer_output`.
* The vision tower (Qwen-like blocks) has no vision-attention scores here: ``visionzip``/``vscan``/``chain`` refuse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.adapters.qwen_vl import QwenVLAdapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class Glm4vAdapter(QwenVLAdapter):
    """GLM-4.1V / 4.5V / 4.6V: Qwen2-VL's M-RoPE mechanism, videos marked by ``mm_token_type_ids``."""

    model_types = ("glm4v", "glm46v")

    def visual_modality(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """Image-id tokens are video tokens (1) where ``mm_token_type_ids == 2``, else image tokens (0)."""
        modality = torch.full_like(input_ids, -1, dtype=torch.long)
        modality = modality.masked_fill(input_ids == self.image_token_id, 0)
        types = (model_kwargs or {}).get("mm_token_type_ids")
        if types is not None and tuple(types.shape) == tuple(input_ids.shape):
            modality = modality.masked_fill((modality == 0) & (types.to(input_ids.device) == 2), 1)
        return modality

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` bool: the image token id marks images and video frames alike."""
        return input_ids == self.image_token_id

    def rotary_fn(self):  # noqa: D102 - documented in the base class
        return transformers_compat.rotary_function("glm4v")

    def decoder_layer_output(self, layer: nn.Module, hidden: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """``Glm4vTextDecoderLayer``: ``h = x + post_self_attn_norm(attn)``; ``h + post_mlp_norm(mlp(norm(h)))``."""
        residual = hidden + layer.post_self_attn_layernorm(attn_output)
        return residual + layer.post_mlp_layernorm(layer.mlp(layer.post_attention_layernorm(residual)))

    # No vision-attention scores for the GLM vision tower yet: encoder-side methods that need them refuse.
    @property
    def vision_layers(self) -> nn.ModuleList:
        raise self._no_vision("vision_layers (vision-attention scores of the GLM vision tower)")

    @property
    def vision_local_layer_index(self) -> int:
        raise self._no_vision("vision_local_layer_index")
