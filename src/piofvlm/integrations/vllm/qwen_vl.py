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
  coordinates, and ``max(h, w) / merge`` as the text continuation, so vLLM's ``recompute_mrope_positions`` gives the
  positions piofvlm gives on transformers (decoding continues from the largest position, as there). Where the runner
  does not recompute (the CPU runner), ``embed_input_ids`` strips the channels and ``forward`` adds each multimodal
  slot's coordinate to its position (every slot sits at its item's start, so the sum is the token's own position).
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

import numpy as np
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
    merged_grid_sources,
    select_image_tokens,
    tokens_per_image,
)

POSITIONS = "keep"
#: Methods that read the vision tower's attention: not available for the Qwen ViT in vLLM yet.
_VISION_ATTENTION = ("visionzip", "vscan")


def _method(config: Any) -> Any:
    return _method_of(config, POSITIONS)


class PiofvlmQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_num_image_tokens(self, **kwargs: Any) -> int:
        full = self.get_full_image_tokens(**kwargs)
        method = _method(self.get_hf_config())
        return full if method is None else tokens_per_image(method, full)

    def get_full_image_tokens(self, **kwargs: Any) -> int:
        """Tokens the image has unpruned: ``t * h * w / merge**2`` of its grid."""
        return super().get_num_image_tokens(**kwargs)


class PiofvlmQwen2_5_VLMultiModalProcessor(PromptKeyMixin, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor: each image gets the budget's placeholders, each video its full count."""

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


@MULTIMODAL_REGISTRY.register_processor(
    PiofvlmQwen2_5_VLMultiModalProcessor,
    info=PiofvlmQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PiofvlmQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with a piofvlm input/encoder-side method in ``embed_multimodal`` and the kept tokens' own
    M-RoPE positions (piofvlm's ``positions="keep"``)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
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
                f"{method.name} on Qwen2.5-VL is not available in the vLLM plugin yet: it reads the vision tower's "
                "attention, which the plugin recomputes for CLIP towers (LLaVA, LLaVA-NeXT) only, not for the Qwen "
                "ViT's windowed blocks with 2-D rotary; use divprune, pool or random"
            )
        check_method(method, self.piofvlm_tower, config.text_config.num_hidden_layers, "qwen2_5_vl")
        # vLLM's model runner rewrites a request's M-RoPE positions from the embeddings' extra channels after
        # encoding only where multimodal pruning is enabled, which it reads from video_pruning_rate (EVS). This
        # worker's copy of the config is set so; EVS stays off (this class's processor and embed_multimodal never
        # prune videos).
        multimodal = vllm_config.model_config.multimodal_config
        if not multimodal.is_multimodal_pruning_enabled():
            multimodal.video_pruning_rate = 1e-6
        self.is_multimodal_pruning_enabled = True

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """The shorter prompt's positions before encoding: text where the unpruned prompt has it (after an item, at
        its start + its largest grid coordinate + 1); every slot of an image or video at the item's start (its
        (0, 0, 0) coordinate). The kept tokens' own coordinates are added after encoding (``recompute_mrope_positions``
        where the model runner calls it, else :meth:`embed_input_ids` and :meth:`forward`)."""
        if self.piofvlm_method is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        pieces: list[np.ndarray] = []
        start, next_position = 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            ((offset, t, h, w, t_factor),) = list(self.iter_mm_grid_thw([feature]))
            length = int(feature.mm_position.length)
            text = offset - start
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            base = next_position + text
            pieces.append(np.full((3, length), base, dtype=np.int64))
            last_t = int((t - 1) * t_factor) if t_factor != 1.0 else t - 1
            next_position = base + max(last_t, h - 1, w - 1) + 1
            start = offset + length
        if start < len(input_tokens):
            text = len(input_tokens) - start
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        positions = np.concatenate(pieces, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))

    def embed_input_ids(
        self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *, is_multimodal: Any = None
    ) -> torch.Tensor:
        """Where the model runner did not take the recompute route (vLLM's CPU model runner never enables it), the
        items' embeddings still carry their 4 position channels: strip them here and keep each multimodal slot's
        (t, h, w) coordinate for :meth:`forward`."""
        hidden = self.config.text_config.hidden_size
        items = list(multimodal_embeddings) if multimodal_embeddings is not None else []
        if items and is_multimodal is not None and items[0].shape[-1] == hidden + 4:
            coordinates = torch.cat([item[:, hidden : hidden + 3] for item in items]).round().long()
            self._pending_coordinates = (is_multimodal.nonzero()[:, 0], coordinates)
            multimodal_embeddings = [item[:, :hidden] for item in items]
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids: Any, positions: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        pending, self._pending_coordinates = getattr(self, "_pending_coordinates", None), None
        if pending is not None and positions.dim() == 2:
            slots, coordinates = pending
            positions = positions.clone()
            positions[:, slots] += coordinates.T.to(positions.device, positions.dtype)
        return super().forward(input_ids, positions, *args, **kwargs)

    def _with_positions(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``embeddings`` with EVS's 4 position channels: (t, h, w) from the item's start, and the continuation of
        the text after it (the largest coordinate + 1, as the unpruned prompt continues)."""
        return torch.cat([embeddings, positions.to(embeddings.device, embeddings.dtype)], dim=1)

    def embed_multimodal(self, **kwargs: object) -> Any:
        keys = kwargs.pop(KEY_FIELD, None)
        if self.piofvlm_method is None:
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        merge = self.visual.spatial_merge_size
        out: list[torch.Tensor] = []
        for modality, item in inputs.items():
            if modality == "image":
                if item["type"] != "pixel_values":
                    raise ValueError("the piofvlm plugin selects among encoded images: send images, not image_embeds")
                grids = item["image_grid_thw"].tolist()
                features = list(self._process_image_input(item))
                if keys is not None:
                    keys = torch.as_tensor(keys if isinstance(keys, torch.Tensor) else torch.stack(list(keys)))
                    keys = keys.reshape(-1)
                selection = select_image_tokens(
                    self.piofvlm_method,
                    features,
                    self.piofvlm_tower,
                    sample_keys=keys,
                    num_text_layers=self.config.text_config.num_hidden_layers,
                    model_type="qwen2_5_vl",
                    sources=[merged_grid_sources(grid, merge, i) for i, grid in enumerate(grids)],
                )
                for embeddings, kept, grid in zip(selection.embeddings, selection.kept, grids, strict=True):
                    positions = compute_mrope_for_media(grid, merge)
                    continuation = int(positions[:, :3].max()) + 1
                    positions = positions[kept.cpu()]
                    positions[:, 3] = continuation
                    out.append(self._with_positions(embeddings, positions))
                if os.environ.get(RECORD_ENV):
                    self._record(item["pixel_values"], grids, selection.kept, keys)
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
