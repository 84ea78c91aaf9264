"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) in vLLM with a piofvlm method before the language model.

Imports vLLM: loaded by vLLM's ``ModelRegistry`` for the architecture ``PiofvlmQwen2_5_VLForConditionalGeneration``
(see :mod:`piofvlm.integrations.vllm`).

M-RoPE: a visual token's position is its (t, h, w) grid coordinate, offset by where the image starts, and the text
after an image continues at ``start + max(h, w) / merge``. piofvlm on transformers keeps each kept token's own grid
position and the text's positions unchanged (``positions="keep"``, the only mode it defines for these models). vLLM
computes a request's M-RoPE positions when the request is added, before the encoder has chosen the kept tokens; it
has one route to change them afterwards, built for EVS (its video pruning): a model implementing
``recompute_mrope_positions`` returns, from ``embed_multimodal``, each item's embeddings with 4 extra channels (t, h,
w, and how far the text after it continues), and the model runner rewrites the request's positions from them after
encoding (``gpu_model_runner``: only where ``multimodal_config.is_multimodal_pruning_enabled()``; vLLM 0.32's CPU
model runner never takes it). The plugin uses that route for images where the runner takes it, and its own elsewhere:

* the processor gives each image the budget's number of placeholders (a count, or a ratio of its
  ``t * h * w / merge**2`` tokens);
* ``get_mrope_input_positions`` lays out the shorter prompt with the text after each image where the unpruned prompt
  has it (every slot of the image at the image's start, its (0, 0, 0) coordinate);
* ``embed_multimodal`` runs piofvlm's ``select`` on each image's merged tokens and appends the kept tokens' own grid
  coordinates, and ``max(h, w) / merge`` as the text continuation; the plugin's own ``recompute_mrope_positions``
  (:class:`KeptMropeMixin`, not vLLM's EVS function) then writes each slot's position as its item's start + its
  coordinate, which is what piofvlm gives on transformers (decoding continues from the largest position, as there).
  Where the runner does not recompute (the CPU runner), ``embed_input_ids`` strips the channels and ``forward`` adds
  each multimodal slot's coordinate to its position (every slot sits at its item's start, so the sum is the token's
  own position).
* The runner only takes that route where video pruning is enabled, so the model sets ``video_pruning_rate`` of its
  own worker's multimodal config (EVS itself stays off: videos get their full count of placeholders from this
  plugin's processor and pass unpruned, with their positions appended as EVS would with nothing pruned).

Methods: ``divprune``, ``pool``, ``random``. VisionZip / VScan (and ``chain`` with them) read the vision tower's
attention, which for the Qwen ViT (windowed blocks, 2-D rotary, packed images) is not recomputed in vLLM yet: refused.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from piofvlm.integrations.vllm.llava import KEY_FIELD, RECORD_ENV, PromptKeyMixin, _method_of
from piofvlm.integrations.vllm.selection import (
    VisionTower,
    check_method,
    kept_mrope_channels,
    merged_grid_sources,
    select_image_tokens,
    shorter_prompt_mrope_positions,
    tokens_per_image,
    with_kept_rows,
)

POSITIONS = "keep"
#: Methods that read the vision tower's attention: not available for the Qwen ViT in vLLM yet.
_VISION_ATTENTION = ("visionzip", "vscan")


def _method(config: Any) -> Any:
    return _method_of(config, POSITIONS)


class QwenBudgetInfoMixin:
    """A Qwen-VL processing info whose ``get_num_image_tokens`` is the budget of the image's ``t * h * w / merge**2``
    tokens (mixed into vLLM's Qwen2.5-VL / Qwen3-VL processing infos)."""

    def get_num_image_tokens(self, **kwargs: Any) -> int:
        full = self.get_full_image_tokens(**kwargs)
        method = _method(self.get_hf_config())  # type: ignore[attr-defined]
        return full if method is None else tokens_per_image(method, full)

    def get_full_image_tokens(self, **kwargs: Any) -> int:
        """Tokens the image has unpruned: ``t * h * w / merge**2`` of its grid."""
        return super().get_num_image_tokens(**kwargs)  # type: ignore[misc]


class PiofvlmQwen2_5_VLProcessingInfo(QwenBudgetInfoMixin, Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info; each image gets the budget's placeholders."""


class QwenPromptKeyMixin(PromptKeyMixin):
    """:class:`PromptKeyMixin` for Qwen-VL processors: each image's unpruned count from its size (dynamic
    resolution), positions mode ``"keep"``."""

    positions = POSITIONS

    def _full_counts(self, inputs: Any) -> list[int]:
        items = inputs.mm_data_items.get("image") if hasattr(inputs.mm_data_items, "get") else None
        if items is None or not hasattr(items, "get_image_size"):
            return []
        processor = self.info.get_image_processor()
        counts = []
        for i in range(items.get_count()):
            size = items.get_image_size(i)
            counts.append(
                self.info.get_full_image_tokens(
                    image_width=size.width, image_height=size.height, image_processor=processor, mm_kwargs={}
                )
            )
        return counts


class PiofvlmQwen2_5_VLMultiModalProcessor(QwenPromptKeyMixin, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor: each image gets the budget's placeholders, each video its full count."""

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
    ) -> Sequence[PromptReplacement]:
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        image_processor = self.info.get_image_processor(**hf_processor_mm_kwargs)
        vocab = self.info.get_tokenizer().get_vocab()
        placeholder = {"image": vocab[hf_processor.image_token], "video": vocab[hf_processor.video_token]}
        merge_length = image_processor.merge_size**2
        method = _method(self.info.get_hf_config())

        def replacement(item_idx: int, modality: str) -> list[int]:
            grid_thw = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            full = int(grid_thw.prod()) // merge_length
            count = full if method is None or modality == "video" else tokens_per_image(method, full)
            return [placeholder[modality]] * count

        return [
            PromptReplacement(
                modality=modality,
                target=[placeholder[modality]],
                replacement=functools.partial(replacement, modality=modality),
            )
            for modality in ("image", "video")
        ]


class KeptMropeMixin:
    """What the plugin's Qwen-VL classes share in vLLM (Qwen2.5-VL, Qwen3-VL): the method from the config, the
    kept tokens' own M-RoPE coordinates (appended to their embeddings as EVS's 4 position channels; stripped and added
    to the positions in :meth:`embed_input_ids` / :meth:`forward` where the model runner does not recompute them), the
    selection on each image's merged tokens, and the record of what each image kept. Mixed in before vLLM's class."""

    config: Any
    visual: Any
    piofvlm_method: Any
    piofvlm_tower: VisionTower
    is_multimodal_pruning_enabled: bool
    #: piofvlm's model type (for the method's checks and messages) and the family's name in messages
    piofvlm_model_type: str = "qwen2_5_vl"
    piofvlm_family: str = "Qwen2.5-VL"

    def _init_piofvlm(self, vllm_config: Any) -> None:
        """Read the method, check it, and enable the model runner's position recompute (end of ``__init__``)."""
        config = self.config
        self.piofvlm_method = _method(config)
        vision = config.vision_config
        self.piofvlm_tower = VisionTower(
            num_layers=int(vision.depth), feature_layer_index=int(vision.depth) - 1, has_cls=False, side=0
        )
        if self.piofvlm_method is None:
            return
        method = self.piofvlm_method
        if method.name in _VISION_ATTENTION:
            raise ValueError(
                f"{method.name} on {self.piofvlm_family} is not available in the vLLM plugin yet: it reads the "
                "vision tower's attention, which the plugin recomputes for CLIP towers (LLaVA, LLaVA-NeXT) only, not "
                "for the Qwen ViT's windowed blocks with 2-D rotary; use divprune, pool or random"
            )
        check_method(method, self.piofvlm_tower, config.text_config.num_hidden_layers, self.piofvlm_model_type)
        # vLLM's model runner rewrites a request's M-RoPE positions from the embeddings' extra channels after
        # encoding only where multimodal pruning is enabled, which it reads from video_pruning_rate (EVS). This
        # worker's copy of the config is set so; EVS stays off (the plugin's processors and embed_multimodal never
        # prune videos).
        multimodal = vllm_config.model_config.multimodal_config
        if not multimodal.is_multimodal_pruning_enabled():
            multimodal.video_pruning_rate = 1e-6
        self.is_multimodal_pruning_enabled = True

    def _embedding_width(self) -> int:
        """Channels of an item's embedding as the language model side takes it (before the 4 position channels)."""
        return int(self.config.text_config.hidden_size)

    def _split_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An image's encoder output ``(n, c)`` -> the tokens the method selects among and per-token extras that
        follow each kept token (``None``: none)."""
        return features, None

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """The model runner's position rewrite after encoding (vLLM's GPU runners, where multimodal pruning is
        enabled): strip the 4 position channels the plugin appended and write each item slot's position as its
        item's start + its (t, h, w) coordinate; the text keeps the positions :meth:`get_mrope_input_positions` gave
        it (already those of the unpruned prompt).

        ``multimodal_embeddings`` are the rows of this step's chunk: the prompt's image / video slots from
        ``num_computed_tokens`` on, in order (a chunk may end or start inside an item). An item's start is the
        position of the vision-start token before it + 1 (text positions are never rewritten, so calling this again
        on the same slots gives the same positions). vLLM's own EVS function is not used: it places an item that
        follows a split item in the same chunk as a continuation of the split one (vLLM 0.32).
        """
        if self.piofvlm_method is None:
            return super().recompute_mrope_positions(  # type: ignore[misc]
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        width = self._embedding_width()
        positions = mrope_positions.clone()
        items = [item for item in multimodal_embeddings if item.shape[0]]
        if items:
            ids = torch.as_tensor(input_ids, dtype=torch.long).to(positions.device)
            config = self.config
            media = (ids == config.image_token_id) | (ids == config.video_token_id)
            first = int(media[:num_computed_tokens].sum())
            coordinates = torch.cat([item[:, width : width + 3] for item in items]).round().long().to(positions.device)
            slots = media.nonzero()[:, 0][first : first + coordinates.shape[0]]
            if slots.shape[0] != coordinates.shape[0]:
                raise RuntimeError(
                    f"{coordinates.shape[0]} multimodal rows but {slots.shape[0]} image / video slots after token "
                    f"{num_computed_tokens} of the prompt"
                )
            # each slot's run of media tokens starts after a vision-start token, whose position + 1 is the item's start
            starts = torch.cummax(torch.where(media, -1, torch.arange(len(ids), device=ids.device)), 0).values
            opener = starts[slots]
            if bool((opener < 0).any()) or bool((ids[opener.clamp(min=0)] != config.vision_start_token_id).any()):
                raise RuntimeError("an image or video placeholder of the prompt does not follow a vision-start token")
            positions[:, slots] = positions[0, opener] + 1 + coordinates.T.to(positions.dtype)
        stripped = [item[:, :width] for item in multimodal_embeddings]
        return stripped, positions, int(positions.max()) + 1 - len(input_ids)

    def embed_input_ids(
        self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *, is_multimodal: Any = None
    ) -> torch.Tensor:
        """Where the model runner did not take the recompute route (vLLM's CPU model runner never enables it), the
        items' embeddings still carry their 4 position channels: strip them here and keep each multimodal slot's
        (t, h, w) coordinate for :meth:`forward`."""
        width = self._embedding_width()
        items = list(multimodal_embeddings) if multimodal_embeddings is not None else []
        if items and is_multimodal is not None and items[0].shape[-1] == width + 4:
            coordinates = torch.cat([item[:, width : width + 3] for item in items]).round().long()
            self._pending_coordinates = (is_multimodal.nonzero()[:, 0], coordinates)
            multimodal_embeddings = [item[:, :width] for item in items]
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)  # type: ignore[misc]

    def forward(self, input_ids: Any, positions: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        pending, self._pending_coordinates = getattr(self, "_pending_coordinates", None), None
        if pending is not None and positions.dim() == 2:
            slots, coordinates = pending
            positions = positions.clone()
            positions[:, slots] += coordinates.T.to(positions.device, positions.dtype)
        return super().forward(input_ids, positions, *args, **kwargs)  # type: ignore[misc]

    def _with_positions(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``embeddings`` with EVS's 4 position channels: (t, h, w) from the item's start, and the continuation of
        the text after it (the largest coordinate + 1, as the unpruned prompt continues)."""
        return torch.cat([embeddings, positions.to(embeddings.device, embeddings.dtype)], dim=1)

    def _select_images(self, item: Any, keys: Any) -> list[torch.Tensor]:
        """The kept embeddings of each image of ``item`` (vLLM's parsed image input), with their position channels:
        piofvlm's ``select`` on each image's merged tokens in raster order."""
        if item["type"] != "pixel_values":
            raise ValueError("the piofvlm plugin selects among encoded images: send images, not image_embeds")
        merge = self.visual.spatial_merge_size
        grids = item["image_grid_thw"].tolist()
        features, extras = zip(*(self._split_features(f) for f in self._process_image_input(item)), strict=True)  # type: ignore[attr-defined]
        if keys is not None:
            keys = torch.as_tensor(keys if isinstance(keys, torch.Tensor) else torch.stack(list(keys))).reshape(-1)
        selection = select_image_tokens(
            self.piofvlm_method,
            list(features),
            self.piofvlm_tower,
            sample_keys=keys,
            num_text_layers=self.config.text_config.num_hidden_layers,
            model_type=self.piofvlm_model_type,
            sources=[merged_grid_sources(grid, merge, i) for i, grid in enumerate(grids)],
        )
        embeddings = with_kept_rows(selection.embeddings, extras, selection.kept)
        out = [
            self._with_positions(rows, kept_mrope_channels(grid, merge, kept))
            for rows, kept, grid in zip(embeddings, selection.kept, grids, strict=True)
        ]
        if os.environ.get(RECORD_ENV):
            self._record(item["pixel_values"], grids, selection.kept, keys)
        return out

    def _record(self, pixel_values: Any, grids: list, kept: list[torch.Tensor], keys: torch.Tensor | None) -> None:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        patches = [t * h * w for t, h, w in grids]
        chunks = torch.as_tensor(pixel_values).split(patches) if isinstance(pixel_values, torch.Tensor) else []
        with open(os.environ[RECORD_ENV], "a") as file:
            for b, index in enumerate(kept):
                line = {
                    "rank": rank,
                    "pixel_sum": float(chunks[b].double().sum()) if chunks else None,
                    "key": None if keys is None else int(keys[b]),
                    "kept": index.tolist(),
                }
                file.write(json.dumps(line) + "\n")


@MULTIMODAL_REGISTRY.register_processor(
    PiofvlmQwen2_5_VLMultiModalProcessor,
    info=PiofvlmQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PiofvlmQwen2_5_VLForConditionalGeneration(KeptMropeMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with a piofvlm input/encoder-side method in ``embed_multimodal`` and the kept tokens' own
    M-RoPE positions (piofvlm's ``positions="keep"``)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_piofvlm(vllm_config)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """The shorter prompt's positions before encoding (:func:`~piofvlm.integrations.vllm.selection.
        shorter_prompt_mrope_positions`: text where the unpruned prompt has it, each item's slots at its start); the
        kept tokens' own coordinates are added after encoding (``recompute_mrope_positions`` where the model runner
        calls it, else :meth:`embed_input_ids` and :meth:`forward`)."""
        if self.piofvlm_method is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        items = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            ((offset, t, h, w, t_factor),) = list(self.iter_mm_grid_thw([feature]))
            items.append((offset, int(feature.mm_position.length), t, h, w, t_factor))
        return shorter_prompt_mrope_positions(len(input_tokens), items)

    def embed_multimodal(self, **kwargs: object) -> Any:
        keys = kwargs.pop(KEY_FIELD, None)
        if self.piofvlm_method is None:
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        merge = self.visual.spatial_merge_size
        out: list[torch.Tensor] = []
        for modality, item in inputs.items():
            if modality == "image":
                out.extend(self._select_images(item, keys))
            elif modality == "video":
                grids = item["video_grid_thw"].tolist()
                seconds = item.get("second_per_grid_ts")
                tokens_per_second = self.config.vision_config.tokens_per_second
                for i, (embeddings, grid) in enumerate(zip(self._process_video_input(item), grids, strict=True)):
                    per_grid = 1.0 if seconds is None else float(seconds[i])
                    positions = compute_mrope_for_media(grid, merge, tokens_per_second, per_grid)
                    positions[:, 3] = int(positions[:, :3].max()) + 1
                    out.append(self._with_positions(embeddings, positions))
        return tuple(out)
