"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``) in vLLM with a piofvlm method before the language model.

Imports vLLM: loaded by vLLM's ``ModelRegistry`` for the architecture ``PiofvlmLlavaNextForConditionalGeneration``
(see :mod:`piofvlm.integrations.vllm`).

* anyres: an image's visual tokens are its base view (``side x side``), its unpadded high-resolution grid and one
  ``image_newline`` token per grid row, so the count depends on the image's size. vLLM's processor knows the size
  before encoding; the budget (a count per image, or a ratio of *that image's* count, rounded half up as piofvlm
  rounds) is what ``get_num_image_tokens`` returns.
* ``embed_multimodal`` packs each image as vLLM does (its own ``_merge_image_patch_embeddings``), computes where each
  token comes from from the image size (:func:`piofvlm.integrations.vllm.selection.anyres_sources`: crop, patch,
  grid, row, column; newlines have no patch) and runs piofvlm's ``select`` on it, as piofvlm does on transformers:
  every token of the image, newlines included, is a visual token and counts towards the budget; newlines have no
  vision patch (VisionZip / VScan rank them last), and ``pool`` pools them as their own ``rows x 1`` column. The kept
  tokens keep their order (the base view first, then the grid in raster order, newlines in place).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageSize

from piofvlm.integrations.vllm.llava import KEY_FIELD, BudgetInfoMixin, ClipTowerMixin, PromptKeyMixin
from piofvlm.integrations.vllm.selection import anyres_sources


class PiofvlmLlavaNextProcessingInfo(BudgetInfoMixin, LlavaNextProcessingInfo):
    """LLaVA-NeXT's processing info: the budget of each image's unpruned count (vLLM's LLaVA-NeXT count: base view
    + unpadded grid + newlines)."""

    def get_image_size_with_most_features(self) -> ImageSize:
        """The largest image for memory profiling, by its unpruned count (the encoder's work), not the budget."""
        best, best_size = 0, None
        for height, width in self.get_hf_config().image_grid_pinpoints:
            count = self.get_full_image_tokens(image_width=width, image_height=height)
            if count > best:
                best, best_size = count, ImageSize(width=width, height=height)
        if best_size is None:
            raise ValueError("the model config has no image_grid_pinpoints")
        return best_size


class PiofvlmLlavaNextMultiModalProcessor(PromptKeyMixin, LlavaNextMultiModalProcessor):
    """LLaVA-NeXT's processor; for ``random`` it passes each image its prompt's fingerprint (with every image counted
    at its own full anyres size, as transformers writes the prompt)."""


@MULTIMODAL_REGISTRY.register_processor(
    PiofvlmLlavaNextMultiModalProcessor, info=PiofvlmLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PiofvlmLlavaNextForConditionalGeneration(ClipTowerMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with a piofvlm input/encoder-side method in ``embed_multimodal``."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_piofvlm("llava_next")

    def _sources(self, pixel_values: Any, image_sizes: Any) -> list[dict[str, torch.Tensor]]:
        """Each image's token layout; ``crop`` indexes the vision tower's batch as vLLM stacked it (a padded
        ``(images, crops, ...)`` tensor, or a list of ``(crops_i, ...)`` tensors concatenated)."""
        config = self.config
        if isinstance(pixel_values, torch.Tensor):
            firsts = [i * pixel_values.shape[1] for i in range(pixel_values.shape[0])]
        else:
            counts = [int(v.shape[0]) for v in pixel_values]
            firsts = [sum(counts[:i]) for i in range(len(counts))]
        return [
            anyres_sources(
                tuple(torch.as_tensor(size).tolist()),
                self.piofvlm_tower.side,
                config.image_grid_pinpoints,
                config.vision_config.image_size,
                first,
            )
            for size, first in zip(image_sizes, firsts, strict=True)
        ]

    def embed_multimodal(self, **kwargs: object) -> Any:
        keys = kwargs.pop(KEY_FIELD, None)
        if self.piofvlm_method is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("the piofvlm plugin selects among encoded images: send images, not image_embeds")
        pixel_values = image_input["pixel_values"]
        image_sizes = image_input.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs each image's size (image_sizes) to lay out its tokens")
        sources = self._sources(pixel_values, image_sizes)
        return self._select_encoded(
            image_input, keys, lambda: list(self._process_image_input(image_input)), "llava_next", sources
        )
