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

The adapter is a data entry (``adapters/facts.py``: ``text_model`` for the language model,
:class:`~piofvlm.adapters.parts.RunsAreItems`); this module keeps the one part that is code, the tile geometry
(:class:`SmolVLMTiles`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from piofvlm.adapters.boxes import TokenBoxes, cell_boxes, closest_grid, in_region


class SmolVLMTiles:
    """The part of SmolVLM's adapter that is code: each run of ``<image>`` tokens is a square tile (or the global
    view) of the pixel-shuffled patch grid; an image's runs end at its ``<global-img>`` run (``pool``'s sources,
    overlays)."""

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

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Per image: its ``rows x cols`` tiles over the picture (view ``"tiles"``, each tile a square grid) and the
        global view (``"global"``, the whole picture); an image small enough not to be split has the global view only
        (``"image"``). The runs of an image end at its global view, the run the ``<global-img>`` token (the token
        before each sample's last run) opens. The processor does not pass its tile grid on, so it is the grid of
        that many tiles closest to the picture's aspect (``source_sizes`` are needed for split images): the
        processor's own grid, whose aspect follows the picture's up to rounding to whole tiles."""
        side = self.tile_side
        input_ids = model_kwargs["input_ids"].cpu()
        visual = self.visual_slots(model_kwargs)
        items: list[TokenBoxes] = []
        for sample, row in enumerate(visual):
            starts = (row & ~torch.nn.functional.pad(row, (1, 0))[:-1]).nonzero()[:, 0].tolist()
            if not starts:
                continue
            if starts[0] == 0:
                raise ValueError(
                    f"{self.model_type}: a prompt starts with an image token; the processor opens tiles with text"
                )
            global_id = int(input_ids[sample, starts[-1] - 1])
            runs: list[int] = []  # the current image's runs (their start)
            for start in starts:
                runs.append(start)
                if int(input_ids[sample, start - 1]) != global_id:
                    continue
                tiles = len(runs) - 1
                first = int(row[: runs[0]].sum())
                tokens = torch.arange(first, first + (tiles + 1) * side * side)
                token = torch.arange(side * side)
                grid = cell_boxes(token // side, token % side, side, side)  # (side**2, 4) within one tile
                if tiles == 0:
                    items.append(TokenBoxes(sample, "image", tokens, grid, torch.zeros_like(token), ("image",)))
                else:
                    index = len(items)
                    if source_sizes is None or index >= len(source_sizes):
                        raise ValueError(
                            f"{self.model_type}: image {index} is split into {tiles} tiles, laid out by the picture's "
                            "size: pass source_sizes=[(width, height), ...] of the images, in prompt order"
                        )
                    rows, cols = closest_grid(tiles, *source_sizes[index])
                    regions = [
                        (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows) for r in range(rows) for c in range(cols)
                    ]
                    boxes = torch.cat([*(in_region(grid, region) for region in regions), grid])
                    view = torch.cat([torch.zeros(tiles * side * side, dtype=torch.long), torch.ones_like(token)])
                    items.append(TokenBoxes(sample, "image", tokens, boxes, view, ("tiles", "global")))
                runs = []
            if runs:
                raise ValueError(f"{self.model_type}: tile runs after the last global view of a sample")
        return items
