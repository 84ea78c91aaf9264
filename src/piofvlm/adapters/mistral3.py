"""Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral Small 3.x with a Pixtral vision tower).

Layout facts (``PixtralProcessor``): an image of ``h x w`` pixels becomes ``rows = h // (patch * merge)`` rows of
``cols = w // (patch * merge)`` ``[IMG]`` tokens, each row but the last followed by ``[IMG_BREAK]``, the last one by
``[IMG_END]``. Only ``[IMG]`` tokens receive vision features, so they are the visual tokens; the breaks and the end
token are text: they are never dropped and keep the row structure visible to the decoder. An image's count comes from
``image_sizes`` (``rows * cols``), and its tokens form several runs split by the breaks: :func:`items_in_prompt_order`
groups them back into one item. 1-D RoPE: ``positions="renumber"`` works as for LLaVA.

The adapter is a data entry (``adapters/facts.py``: LLaVA's module tree, a text model with a sliding window refused
by :class:`~piofvlm.adapters.parts.NoSlidingWindow`); this module keeps the part that is code, the grid read from
``image_sizes`` (:class:`PixtralImageGrid`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from piofvlm.adapters.boxes import TokenBoxes, raster_boxes, split_by_sample


class PixtralImageGrid:
    """The part of Mistral 3's adapter that is code: ``[IMG]`` tokens are visual, ``[IMG_BREAK]`` / ``[IMG_END]``
    text; each image a ``rows x cols`` grid read from ``image_sizes`` (counts, ``pool``'s sources, overlays)."""

    @property
    def _downsample(self) -> int:
        config = self.model.config
        return int(config.vision_config.patch_size * config.spatial_merge_size)

    def _grids(self, model_kwargs: dict[str, Any]) -> list[tuple[int, int]] | None:
        """``(rows, cols)`` of each image's token grid, from ``image_sizes`` (pixels)."""
        image_sizes = model_kwargs.get("image_sizes")
        if image_sizes is None:
            return None
        return [
            (int(h) // self._downsample, int(w) // self._downsample) for h, w in torch.as_tensor(image_sizes).tolist()
        ]

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        encoded = self.counts_from_encoder_outputs(model_kwargs, modality)
        if encoded is not None or modality != "image":
            return encoded
        grids = self._grids(model_kwargs)
        return None if grids is None else [rows * cols for rows, cols in grids]

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image in order: ``crop`` = the image, ``patch`` = its token (raster order over the merged grid),
        ``grid`` 0, ``row``/``col`` on the ``rows x cols`` grid."""
        grids = self._grids(model_kwargs)
        if grids is None:
            raise ValueError("mistral3: image_sizes are needed to lay out the image tokens (pass the processor's)")
        images = []
        for index, (rows, cols) in enumerate(grids):
            token = torch.arange(rows * cols)
            images.append(
                {
                    "crop": torch.full_like(token, index),
                    "patch": token,
                    "grid": torch.zeros_like(token),
                    "row": token // cols,
                    "col": token % cols,
                }
            )
        return images

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Per image: its ``rows x cols`` ``[IMG]`` grid (from ``image_sizes``, not square in general) in raster
        order over the whole picture; the ``[IMG_BREAK]`` / ``[IMG_END]`` tokens are text, not there."""
        grids = self._grids(model_kwargs)
        if grids is None:
            raise ValueError("mistral3: image_sizes are needed to lay out the image tokens (pass the processor's)")
        placed = split_by_sample(self.visual_slots(model_kwargs), [rows * cols for rows, cols in grids])
        return [
            TokenBoxes(sample, "image", tokens, raster_boxes(rows, cols), torch.zeros_like(tokens), ("image",))
            for (sample, tokens), (rows, cols) in zip(placed, grids, strict=True)
        ]
