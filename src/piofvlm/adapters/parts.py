"""Small parts a family adapter is composed from, each one fact about a family's layout (used by the data entries of
:mod:`piofvlm.adapters.facts` and by the code adapters).

A part is a plain class (no :class:`~piofvlm.adapters.base.ModelAdapter` base) that implements a few members of the
adapter contract; an adapter lists its parts before ``ModelAdapter`` (or ``FactsAdapter``), first wins. Parts read
the adapter's other members (``self.model``, ``self.visual_token_mask``, ...) and may be tuned by class attributes
(a data entry sets them through ``Family.settings``).

* how images are counted: :class:`EqualTokensPerImage` (LLaVA-1.5), :class:`PatchGridPerImage` (ViP-LLaVA),
  :class:`RunsAreItems` (InternVL, SmolVLM, Idefics2: each contiguous run of image tokens is one item);
* the vision side: :class:`ClipVisionTower` (a CLIP / SigLIP encoder whose one feature layer feeds the projector:
  what ``visionzip`` / ``vscan`` / ``chain`` read), :class:`SquarePatchGrid` (one ``side x side`` patch grid per
  image: ``pool``'s sources and the overlays' boxes);
* checks: :class:`NoSlidingWindow` (a text model with a sliding window is refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from piofvlm.adapters.boxes import TokenBoxes, no_place, raster_boxes, split_by_sample

if TYPE_CHECKING:
    from torch import nn


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


class PatchGridPerImage:
    """Every image of ``pixel_values`` is the vision tower's whole patch grid, ``(image_size / patch_size)**2``
    tokens, its [CLS] token always dropped (ViP-LLaVA)."""

    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        """``(image_size / patch_size)**2`` tokens per image of ``pixel_values`` ([CLS] always dropped)."""
        from_encoder = self.counts_from_encoder_outputs(model_kwargs)  # type: ignore[attr-defined]
        if from_encoder is not None:
            return from_encoder
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is None:
            return None
        vision = self.model.config.vision_config  # type: ignore[attr-defined]
        return [(vision.image_size // vision.patch_size) ** 2] * int(pixel_values.shape[0])


class RunsAreItems:
    """The model sees no per-image token count (features per tile, per sample, or perceiver latents): each contiguous
    run of image tokens is one item (the mechanism's rule when the counts are ``None``)."""

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        return None


class ClipVisionTower:
    """LLaVA's vision side: ``model.model.vision_tower``, a CLIP or SigLIP encoder (``encoder.layers`` or
    ``vision_model.encoder.layers``) one of whose layers feeds the projector; its blocks' self-attention is
    recomputed for the encoder-side methods (``visionzip``, ``vscan``, ``chain``).

    Tuned by two class attributes: :attr:`feature_layer_field` (the config field naming the feature layer) and
    :attr:`select_strategy_field` (the config field saying whether [CLS] is dropped; ``None``: always dropped).
    """

    #: The config field naming the vision layer(s) whose output becomes the visual tokens.
    feature_layer_field: ClassVar[str] = "vision_feature_layer"
    #: The config field holding ``vision_feature_select_strategy`` (``"default"`` drops [CLS], ``"full"`` keeps it);
    #: ``None`` when the family always drops it (ViP-LLaVA has no such field).
    select_strategy_field: ClassVar[str | None] = "vision_feature_select_strategy"

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower  # type: ignore[attr-defined]

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
        if encoder is None or not hasattr(encoder, "layers"):
            raise self._no_vision(f"the encoder blocks of vision tower {type(tower).__name__}")  # type: ignore[attr-defined]
        return encoder.layers

    def _select_strategy(self) -> str:
        field = self.select_strategy_field
        return "default" if field is None else getattr(self.model.config, field)  # type: ignore[attr-defined]

    @property
    def vision_feature_layer_index(self) -> int:
        field = self.feature_layer_field
        config = self.model.config  # type: ignore[attr-defined]
        layer = getattr(config, field)
        if not isinstance(layer, int):
            raise ValueError(
                f"{field}={layer!r} concatenates several vision layers ({config.model_type}); encoder-side "
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
        vision = self.model.config.vision_config  # type: ignore[attr-defined]
        return vision.image_size // vision.patch_size


class SquarePatchGrid:
    """Each image of ``pixel_values`` is one crop of the vision tower: its visual tokens are the ``side x side``
    patch grid in raster order (LLaVA-1.5, ViP-LLaVA). Needs :class:`ClipVisionTower` (or ``_check_patch_tokens``)."""

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """One view per image: the vision tower's ``side x side`` patch grid in raster order over the picture it was
        given (a [CLS] token fed to the projector, ``"full"`` strategy with CLIP, has no place). A processor that
        center-crops (LLaVA-1.5's CLIP processor) gives the tower the central square: boxes are on that square."""
        visual = self.visual_slots(model_kwargs)  # type: ignore[attr-defined]
        counts = self.image_token_counts(int(visual.sum()), model_kwargs)  # type: ignore[attr-defined]
        if counts is None:
            raise ValueError(
                f"{self.model_type}: pixel_values are needed to lay out the image tokens (pass the processor's)"  # type: ignore[attr-defined]
            )
        vision = self.model.config.vision_config  # type: ignore[attr-defined]
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

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        side = self._check_patch_tokens()  # type: ignore[attr-defined]
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


class NoSlidingWindow:
    """Refuses a text model with a sliding window (``text_config.sliding_window``): after tokens are dropped the
    mechanism rebuilds full causal masks (Mistral 3's text model may declare one)."""

    #: What the error adds about the family's released checkpoints.
    sliding_window_note: ClassVar[str] = "the released checkpoints have none"

    def check_attention(self) -> None:
        super().check_attention()  # type: ignore[misc]
        window = getattr(self.text_config, "sliding_window", None)  # type: ignore[attr-defined]
        if window is not None:
            raise ValueError(
                f"this {self.model_type} model's text model uses a sliding window ({window} tokens); "  # type: ignore[attr-defined]
                "after tokens are dropped the mechanism rebuilds full causal masks, which differ once a prompt is "
                f"longer than the window. Load it with text_config.sliding_window=None ({self.sliding_window_note})."
            )


class TiledImageRuns:
    """Each contiguous run of visual tokens is one image: its tiles (the dynamic-resolution crops of
    ``GotOcr2ImageProcessor``'s ``crop_to_patches``, then a thumbnail when there are several), back to back,
    ``config.image_seq_length`` tokens each, a ``side x side`` token grid in raster order over the tile (GOT-OCR 2.0:
    256 = 16 x 16 per 1024 px tile). The model sees no per-image tile count, so the runs are the items (the base
    class's default). Gives :meth:`visual_token_sources` (``pool`` pools each tile's grid; ``patch`` is the token's
    cell in its tile, not a vision-encoder patch, as the projector downsamples the encoder's grid) and
    :meth:`token_boxes` (the tiles' layout is the processor's choice for the picture's aspect: ``source_sizes``)."""

    def tile_grid(self) -> tuple[int, int]:
        """``(side, tile_pixels)``: the side of a tile's token grid and of a tile in pixels."""
        config = self.model.config  # type: ignore[attr-defined]
        per_tile = int(config.image_seq_length)
        side = round(per_tile**0.5)
        if side * side != per_tile:
            raise ValueError(f"{config.model_type}: image_seq_length={per_tile} is not a square token grid")
        size = config.vision_config.image_size
        return side, int(size[0] if isinstance(size, (list, tuple)) else size)

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image (run) in prompt order: ``crop`` = its tile in ``pixel_values``, ``patch`` = the token's cell in
        its tile, ``grid`` = the tile within the image, ``row``/``col`` in the tile's grid."""
        import torch

        side = self.tile_grid()[0]
        per_tile = side * side
        images, first_tile = [], 0
        for row in self.visual_slots(model_kwargs):  # type: ignore[attr-defined]
            starts = (row & ~torch.nn.functional.pad(row, (1, 0))[:-1]).nonzero()[:, 0].tolist()
            ends = (row & ~torch.nn.functional.pad(row, (0, 1))[1:]).nonzero()[:, 0].tolist()
            for start, end in zip(starts, ends, strict=True):
                count = end - start + 1
                if count % per_tile:
                    raise ValueError(f"an image run of {count} tokens is not a whole number of {per_tile}-token tiles")
                token = torch.arange(count)
                tile, cell = token // per_tile, token % per_tile
                images.append(
                    {"crop": first_tile + tile, "patch": cell, "grid": tile, "row": cell // side, "col": cell % side}
                )
                first_tile += count // per_tile
        return images

    def token_boxes(self, model_kwargs: dict[str, Any], source_sizes: Any = None) -> list[Any]:
        """Per image: one tile (a square grid over the whole picture), or ``n`` tiles laid out ``rows x cols`` over
        the picture (view ``"tiles"``) and the thumbnail (view ``"thumbnail"``, the whole picture); the grid is the
        processor's choice for the picture's aspect among the grids of ``n`` tiles, so images of several tiles need
        ``source_sizes`` (``(width, height)`` per image in prompt order)."""
        from piofvlm.adapters.boxes import tiled_image_boxes

        side, tile_pixels = self.tile_grid()
        visual = self.visual_slots(model_kwargs)  # type: ignore[attr-defined]
        sources = self.visual_token_sources(model_kwargs)
        return tiled_image_boxes(self.model_type, visual, sources, side, tile_pixels, source_sizes)  # type: ignore[attr-defined]


class PaddedSquareGrid(EqualTokensPerImage):
    """Every image is the same ``side x side`` token grid in raster order over the picture resized so its longer side
    fits and padded to a square, centred (DeepSeek-VL's and Janus's image processors, ``do_pad``): the counts of
    :class:`EqualTokensPerImage`, :meth:`visual_token_sources` (``pool`` pools each image's grid) and
    :meth:`token_boxes` (tokens on the padding only have no place; those on its edge are clipped to the picture)."""

    def _square_side(self, model_kwargs: dict[str, Any]) -> tuple[list[int], int]:
        visual = self.visual_slots(model_kwargs)  # type: ignore[attr-defined]
        counts = self.image_token_counts(int(visual.sum()), model_kwargs)
        if counts is None:
            raise ValueError(f"{self.model_type}: pixel_values are needed to lay out the image tokens")  # type: ignore[attr-defined]
        side = round(counts[0] ** 0.5) if counts else 0
        if any(count != side * side for count in counts):
            raise ValueError(f"{self.model_type}: images of {counts} tokens are not square token grids")  # type: ignore[attr-defined]
        return counts, side

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image: ``crop`` = the image, ``patch`` = its token, ``grid`` 0, ``row``/``col`` on the square grid."""
        import torch

        counts, side = self._square_side(model_kwargs)
        token = torch.arange(side * side)
        return [
            {
                "crop": torch.full_like(token, i),
                "patch": token,
                "grid": torch.zeros_like(token),
                "row": token // side,
                "col": token % side,
            }
            for i in range(len(counts))
        ]

    def token_boxes(self, model_kwargs: dict[str, Any], source_sizes: Any = None) -> list[Any]:
        """Per image: the square grid mapped from the padded square onto the picture (``source_sizes``: the
        ``(width, height)`` of each image in prompt order, needed for its padding)."""
        import torch

        from piofvlm.adapters.boxes import TokenBoxes, no_place, raster_boxes, split_by_sample

        counts, side = self._square_side(model_kwargs)
        if source_sizes is None or len(source_sizes) < len(counts):
            raise ValueError(
                f"{self.model_type}: images are padded to a square before the vision tower, so where a token lies "  # type: ignore[attr-defined]
                "on the picture depends on its size: pass source_sizes=[(width, height), ...] of the images in "
                "prompt order"
            )
        placed = split_by_sample(self.visual_slots(model_kwargs), counts)  # type: ignore[attr-defined]
        items = []
        for (sample, tokens), (width, height) in zip(placed, source_sizes, strict=False):
            fx, fy = width / max(width, height), height / max(width, height)  # the picture's share of the square
            square = raster_boxes(side, side)
            origin = torch.tensor([(1 - fx) / 2, (1 - fy) / 2] * 2)
            boxes = ((square - origin) / torch.tensor([fx, fy, fx, fy])).clamp(0, 1)
            inside = (boxes[:, 2] > boxes[:, 0] + 1e-9) & (boxes[:, 3] > boxes[:, 1] + 1e-9)
            boxes[~inside] = no_place(int((~inside).sum()))
            view = torch.where(inside, 0, -1)
            items.append(TokenBoxes(sample, "image", tokens, boxes, view, ("image",)))
        return items
