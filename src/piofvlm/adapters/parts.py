"""Small parts a family adapter is composed from, each one fact about a family's layout (used by the code adapters
and by the data entries of :mod:`piofvlm.adapters.facts`)."""

from __future__ import annotations

from typing import Any


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
        import torch

        from piofvlm import transformers_compat
        from piofvlm.adapters.boxes import TokenBoxes, cell_boxes, in_region, split_by_sample

        sources = self.visual_token_sources(model_kwargs)
        side, tile_pixels = self.tile_grid()
        visual = self.visual_slots(model_kwargs)  # type: ignore[attr-defined]
        placed = split_by_sample(visual, [len(source["grid"]) for source in sources])
        items = []
        for index, ((sample, tokens), source) in enumerate(zip(placed, sources, strict=True)):
            tile = source["grid"]
            tiles = int(tile.max()) + 1
            boxes = cell_boxes(source["row"], source["col"], side, side)  # within its tile
            if tiles == 1:
                items.append(TokenBoxes(sample, "image", tokens, boxes, torch.zeros_like(tile), ("image",)))
                continue
            if source_sizes is None or index >= len(source_sizes):
                raise ValueError(
                    f"{self.model_type}: image {index} has {tiles - 1} tiles + a thumbnail, laid out according to the "  # type: ignore[attr-defined]
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
