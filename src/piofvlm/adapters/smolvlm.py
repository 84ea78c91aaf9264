"""SmolVLM (``SmolVLMForConditionalGeneration``) and Idefics3 (``Idefics3ForConditionalGeneration``): one layout.

Layout facts (``get_image_prompt_string`` of its processor): a large image is split into ``rows x cols`` tiles
plus a downscaled global view; each tile is written ``<fake_token_around_image><row_i_col_j>`` + ``image_seq_len``
``<image>`` tokens, tile rows end with a newline, and the global view comes last (``<global-img>`` + its tokens). So
an image is several runs of image tokens split by text, and the model config does not know the ``<global-img>`` id
that would mark where an image ends. The mechanism therefore treats **each tile (each run) as one item**: with
``budget_scope="image"`` every tile and every global view keeps its own share (a ratio is then close to a per-image
ratio; a count is per tile); ``budget_scope="sample"`` pools every tile of a sample. ``pixel_values`` is
``(B, tiles, 3, H, W)`` padded with all-zero tiles that the model drops; the runs match the real tiles in order.
The language model is ``model.model.text_model`` (Llama-style, 1-D RoPE: ``positions="renumber"`` works).
Idefics3 is the same model under another name (``Idefics3Processor.replace_image_token`` writes the same strings;
``Idefics3Model`` merges features with the same ``inputs_merger``), so one adapter serves both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class SmolVLMAdapter(ModelAdapter):
    """Each run of ``<image>`` tokens (a tile or a global view) is one item; see the module docstring."""

    model_types = ("smolvlm", "idefics3")

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        return None  # features come per sample, tiles are runs: each run is one item

    @property
    def tile_side(self) -> int:
        """Side of one tile's token grid: the vision tower's patches per side divided by the pixel-shuffle factor."""
        config = self.model.config
        return config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per tile (run) in prompt order: ``crop`` = the real tile it comes from, ``patch`` = its token in the tile,
        ``grid`` 0, ``row``/``col`` in the tile's square grid."""
        side = self.tile_side
        visual = self.visual_token_mask(model_kwargs["input_ids"])
        if model_kwargs.get("attention_mask") is not None:
            visual = visual & model_kwargs["attention_mask"].bool()
        tiles = []
        for row in visual:
            starts = (row & ~torch.nn.functional.pad(row, (1, 0))[:-1]).nonzero()[:, 0]
            ends = (row & ~torch.nn.functional.pad(row, (0, 1))[1:]).nonzero()[:, 0]
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                token = torch.arange(end - start + 1)
                if len(token) != side * side:
                    raise RuntimeError(f"a tile of {len(token)} image tokens is not a {side} x {side} grid")
                tiles.append(
                    {
                        "crop": torch.full_like(token, len(tiles)),
                        "patch": token,
                        "grid": torch.zeros_like(token),
                        "row": token // side,
                        "col": token % side,
                    }
                )
        return tiles
