"""LLaVA-1.5 style models (``LlavaForConditionalGeneration``): a fixed number of visual tokens per image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.boxes import TokenBoxes, cell_boxes, no_place, raster_boxes, split_by_sample
from piofvlm.adapters.parts import EqualTokensPerImage
from piofvlm.adapters.registry import register_adapter


@register_adapter
class LlavaAdapter(EqualTokensPerImage, ModelAdapter):
    """Every image expands to the same number of placeholder tokens (576 for LLaVA-1.5 at 336 px)."""

    model_types = ("llava",)

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """One view per image: the vision tower's ``side x side`` patch grid in raster order over the picture it was
        given (a [CLS] token fed to the projector, ``"full"`` strategy with CLIP, has no place). A processor that
        center-crops (LLaVA-1.5's CLIP processor) gives the tower the central square: boxes are on that square."""
        visual = self.visual_slots(model_kwargs)
        counts = self.image_token_counts(int(visual.sum()), model_kwargs)
        if counts is None:
            raise ValueError("llava: pixel_values are needed to lay out the image tokens (pass the processor's)")
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        items = []
        for sample, tokens in split_by_sample(visual, counts):
            extra = len(tokens) - side * side
            if extra not in (0, 1):
                raise ValueError(f"an image of {len(tokens)} tokens is not a {side} x {side} patch grid")
            boxes = torch.cat([no_place(extra), raster_boxes(side, side)])
            view = torch.cat([torch.full((extra,), -1), torch.zeros(side * side, dtype=torch.long)])
            items.append(TokenBoxes(sample, "image", tokens, boxes, view, ("image",)))
        return items

    # ------------------------------------------------------------------------------------------ vision tower
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
        if encoder is None or not hasattr(encoder, "layers"):
            raise self._no_vision(f"the encoder blocks of vision tower {type(tower).__name__}")
        return encoder.layers

    def _select_strategy(self) -> str:
        return self.model.config.vision_feature_select_strategy

    #: The config field naming the vision layer(s) whose output becomes the visual tokens.
    feature_layer_field = "vision_feature_layer"

    @property
    def vision_feature_layer_index(self) -> int:
        field = self.feature_layer_field
        layer = getattr(self.model.config, field)
        if not isinstance(layer, int):
            raise ValueError(
                f"{field}={layer!r} concatenates several vision layers ({self.model.config.model_type}); encoder-side "
                "methods need a single feature layer"
            )
        num_layers = len(self.vision_layers)
        index = layer % (num_layers + 1) - 1  # hidden_states[layer] is the output of block (layer mod (n+1)) - 1
        if index < 0:
            raise ValueError(f"{field}={layer} selects the embeddings, not a vision block")
        return index

    @property
    def vision_has_cls_token(self) -> bool:
        """Whether the encoder prepends a [CLS] token (CLIP does; SigLIP does not)."""
        embeddings = getattr(self.vision_tower, "embeddings", None) or getattr(
            getattr(self.vision_tower, "vision_model", None), "embeddings", None
        )
        return embeddings is None or hasattr(embeddings, "class_embedding")

    @property
    def vision_has_cls(self) -> bool:
        # "default" drops the first encoder token as [CLS] (CLIP); "full" feeds every token to the projector.
        return self.vision_has_cls_token and self._select_strategy() == "default"

    def vision_attention(self, layer_index: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.vision_layers[layer_index]
        attn = block.self_attn
        num_crops, length, _ = hidden_states.shape
        normed = block.layer_norm1(hidden_states)
        q = attn.q_proj(normed).view(num_crops, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(num_crops, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale).softmax(-1)  # (N, H, T, T)
        return probs, k.mean(1)

    def _check_patch_tokens(self) -> int:
        if self.vision_has_cls_token and not self.vision_has_cls:
            raise ValueError(
                "vision_feature_select_strategy='full' makes the [CLS] token a visual token of the prompt; "
                "encoder-side methods support the 'default' strategy only"
            )
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        side = self._check_patch_tokens()
        patch = torch.arange(side * side)
        images = []
        for crop in range(int(model_kwargs["pixel_values"].shape[0])):
            images.append(
                {
                    "crop": torch.full_like(patch, crop),
                    "patch": patch,
                    "grid": torch.zeros_like(patch),
                    "row": patch // side,
                    "col": patch % side,
                }
            )
        return images


def anyres_view_boxes(
    source: dict[str, torch.Tensor], side: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Boxes of an anyres image (LLaVA-NeXT, LLaVA-OneVision) from its :meth:`~LlavaAdapter.visual_token_sources`
    entry: the base view (grid 0, ``side x side``) and the unpadded (possibly downscaled) high-resolution grid (grid 1,
    ``rows x cols`` over the whole picture); ``image_newline`` tokens (``crop == -1``) have no place.

    Returns ``(boxes (N, 4), view (N,), views)``.
    """
    grid, row, col = source["grid"], source["row"], source["col"]
    placed = source["crop"] >= 0
    boxes, view = no_place(len(grid)), torch.full_like(grid, -1)
    base = placed & (grid == 0)
    boxes[base], view[base] = cell_boxes(row[base], col[base], side, side), 0
    high = placed & (grid == 1)
    if not bool(high.any()):
        return boxes, view, ("base",)
    rows, cols = int(row[high].max()) + 1, int(col[high].max()) + 1
    boxes[high], view[high] = cell_boxes(row[high], col[high], rows, cols), 1
    return boxes, view, ("base", "high-res")
