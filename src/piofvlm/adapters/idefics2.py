"""Idefics2 (``Idefics2ForConditionalGeneration``): a SigLIP tower, a perceiver resampler to
``perceiver_config.resampler_n_latents`` tokens per image (64 in the checkpoints) and a Mistral text model
(``model.model.text_model``, 1-D RoPE: ``positions="renumber"`` works).

Layout (``Idefics2Processor``, transformers 5.24): an image is ``<fake_token_around_image>`` + ``image_seq_len``
``<image>`` + ``<fake_token_around_image>``; with ``do_image_splitting`` the image is four crops and the whole image,
each such a run (fake tokens between them, merged where adjacent). ``pixel_values`` is ``(B, images, 3, H, W)``
padded with all-zero images the model drops. As for SmolVLM, **each run of image tokens (a crop or the whole image)
is one item**: the config cannot tell where an image's crops end.

The tokens are perceiver latents, not patches: they have no place on the image (``token_boxes`` reports them
unplaced), no patch grid for ``pool`` and no vision-attention map for ``visionzip``/``vscan``/``chain``, which refuse
with an error naming what is missing.

The adapter is a data entry (``adapters/facts.py``: ``text_model`` for the language model,
:class:`~piofvlm.adapters.parts.RunsAreItems`); this module keeps the part that is code (:class:`PerceiverLatents`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from piofvlm.adapters.boxes import TokenBoxes, no_place


class PerceiverLatents:
    """The part of Idefics2's adapter that is code: each run of ``<image>`` tokens is a crop's perceiver latents,
    placed nowhere on the image and from no patch."""

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """One item per run of latents, every token without a place (perceiver latents attend to the whole image)."""
        visual = self.visual_slots(model_kwargs)
        items = []
        for sample, row in enumerate(visual):
            order = torch.cumsum(row.long(), 0) - 1  # visual-token index of each slot
            starts = (row & ~torch.nn.functional.pad(row, (1, 0))[:-1]).nonzero()[:, 0].tolist()
            ends = (row & ~torch.nn.functional.pad(row, (0, 1))[1:]).nonzero()[:, 0].tolist()
            for start, end in zip(starts, ends, strict=True):
                tokens = torch.arange(int(order[start]), int(order[end]) + 1)
                view = torch.full((len(tokens),), -1, dtype=torch.long)
                items.append(TokenBoxes(sample, "image", tokens, no_place(len(tokens)), view, ()))
        return items

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        raise ValueError(
            "idefics2: the visual tokens are perceiver latents, which come from no patch of the image: methods that "
            "need a patch grid (pool) or vision-tower attention (visionzip, vscan, chain) cannot run on this family"
        )
