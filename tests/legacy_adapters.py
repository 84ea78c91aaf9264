"""The code adapters that the data entries of ``adapters/facts.py`` replaced, as they were on main before
(72551f9, issue 26), unregistered: ``tests/test_facts.py`` checks that each registered data entry prunes, decodes,
counts, sources and places tokens exactly as its old code did. Frozen reference code: do not edit."""

# ruff: noqa
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.boxes import (
    TokenBoxes,
    cell_boxes,
    closest_grid,
    in_region,
    no_place,
    raster_boxes,
    split_by_sample,
)


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


class OldLlavaAdapter(EqualTokensPerImage, ModelAdapter):
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


class OldVipLlavaAdapter(OldLlavaAdapter):
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


class OldInternVLAdapter(ModelAdapter):
    """One contiguous run of ``<IMG_CONTEXT>`` tokens per image (or video frame); tiles are square token grids."""

    model_types = ("internvl",)

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        return None  # pooled features are per tile, not per image: each run of image tokens is one image

    @property
    def tile_side(self) -> int:
        """Side of one tile's token grid: patches per side times the pixel-shuffle ratio."""
        vision = self.model.config.vision_config
        patches = vision.image_size[0] // vision.patch_size[0]
        return int(patches * self.model.config.downsample_ratio)

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image (run) in prompt order: ``crop`` = its tile in ``pixel_values``, ``patch`` = token within the tile
        (after the pixel shuffle), ``grid`` = tile within the image, ``row``/``col`` in the tile's square grid."""
        side = self.tile_side
        per_tile = side * side
        visual = self.visual_token_mask(model_kwargs["input_ids"])
        if model_kwargs.get("attention_mask") is not None:
            visual = visual & model_kwargs["attention_mask"].bool()
        images, first_tile = [], 0
        for row in visual:
            starts = (row & ~torch.nn.functional.pad(row, (1, 0))[:-1]).nonzero()[:, 0].tolist()
            ends = (row & ~torch.nn.functional.pad(row, (0, 1))[1:]).nonzero()[:, 0].tolist()
            for start, end in zip(starts, ends, strict=True):
                count = end - start + 1
                if count % per_tile:
                    raise RuntimeError(
                        f"an image run of {count} tokens is not a whole number of {per_tile}-token tiles"
                    )
                token = torch.arange(count)
                tile = token // per_tile
                images.append(
                    {
                        "crop": first_tile + tile,
                        "patch": token % per_tile,
                        "grid": tile,
                        "row": token % per_tile // side,
                        "col": token % side,
                    }
                )
                first_tile += math.ceil(count / per_tile)
        return images

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Per image (run, so a video frame is an image): one tile (a square grid over the whole picture), or
        ``n`` tiles laid out ``rows x cols`` over the picture (view ``"tiles"``) plus the thumbnail (view
        ``"thumbnail"``, the whole picture). The grid is the processor's choice for the picture's aspect among the
        grids of ``n`` tiles, so ``source_sizes`` are needed for images of several tiles."""
        sources = self.visual_token_sources(model_kwargs)
        side = self.tile_side
        tile_pixels = int(self.model.config.vision_config.image_size[0])
        placed = split_by_sample(self.visual_slots(model_kwargs), [len(source["grid"]) for source in sources])
        items = []
        for index, ((sample, tokens), source) in enumerate(zip(placed, sources, strict=True)):
            tile, row, col = source["grid"], source["row"], source["col"]
            tiles = int(tile.max()) + 1
            boxes = cell_boxes(row, col, side, side)  # within its tile
            if tiles == 1:
                items.append(TokenBoxes(sample, "image", tokens, boxes, torch.zeros_like(tile), ("image",)))
                continue
            if source_sizes is None or index >= len(source_sizes):
                raise ValueError(
                    f"internvl: image {index} has {tiles - 1} tiles + a thumbnail, laid out according to the "
                    "picture's size: pass source_sizes=[(width, height), ...] of the images in prompt order"
                )
            width, height = source_sizes[index]
            cols, rows = transformers_compat.tiled_canvas(height, width, tile_pixels, tiles - 1)
            for t in range(tiles - 1):
                region = ((t % cols) / cols, (t // cols) / rows, (t % cols + 1) / cols, (t // cols + 1) / rows)
                boxes[tile == t] = in_region(boxes[tile == t], region)
            view = (tile == tiles - 1).long()  # 0: the tiles, 1: the thumbnail
            items.append(TokenBoxes(sample, "image", tokens, boxes, view, ("tiles", "thumbnail")))
        return items


class OldSmolVLMAdapter(ModelAdapter):
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


class OldIdefics2Adapter(ModelAdapter):
    """Each run of ``<image>`` tokens (a crop or a whole image: its perceiver latents) is one item."""

    model_types = ("idefics2",)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        return None  # each run of latents is one item

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


class OldMistral3Adapter(ModelAdapter):
    """``[IMG]`` tokens are visual; ``[IMG_BREAK]`` / ``[IMG_END]`` are text; counts from ``image_sizes``."""

    model_types = ("mistral3",)

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

    def check_attention(self) -> None:
        super().check_attention()
        if getattr(self.text_config, "sliding_window", None) is not None:
            raise ValueError(
                f"this mistral3 model's text model uses a sliding window ({self.text_config.sliding_window} tokens); "
                "after tokens are dropped the mechanism rebuilds full causal masks, which differ once a prompt is "
                "longer than the window. Load it with text_config.sliding_window=None (the released Mistral Small "
                "3.x checkpoints have none)."
            )
