"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) in vLLM with a piofvlm method before the language model.

Imports vLLM: loaded by vLLM's ``ModelRegistry`` for the architecture ``PiofvlmQwen3VLForConditionalGeneration``
(see :mod:`piofvlm.integrations.vllm`). The Qwen2.5-VL route (:mod:`piofvlm.integrations.vllm.qwen_vl`) with two
differences:

* **Deepstack.** Qwen3-VL's vision tower also projects the outputs of some intermediate blocks
  (``deepstack_visual_indexes``), and the language model adds level ``i`` of them to the visual tokens' hidden states
  after decoder layer ``i``. vLLM's encoder returns them with each visual token, as one row ``[features | level 0 |
  level 1 | ...]``, and its ``embed_input_ids`` scatters the levels to the image's slots. piofvlm on transformers
  (``adapters.qwen_vl.Qwen3VLAdapter``) adds to each kept token the deepstack features *of that token* and drops the
  dropped tokens' (for ``pool``: the features of the cell's centre token, the token that carries the pooled state).
  The plugin does the same: the method selects among the ``features`` part and the kept rows' levels follow them.
* **Positions.** The kept tokens' own (t, h, w) grid coordinates travel as 4 extra channels, as for Qwen2.5-VL
  (:class:`~piofvlm.integrations.vllm.qwen_vl.KeptMropeMixin`). vLLM's Qwen3-VL ``recompute_mrope_positions``
  expects 5 channels (its video layout with timestamps) and would continue the text after an image from the largest
  *kept* coordinate, not from the image's grid as the unpruned prompt does: the mixin's own
  ``recompute_mrope_positions`` replaces it (GPU runners), and ``forward`` adds the coordinates where the runner does
  not recompute (vLLM 0.32's CPU runner).

Images only: a Qwen3-VL video is written frame by frame with timestamp text between the frames, and vLLM's position
recompute for it (on GPUs, once the plugin enables the route) assumes EVS's own layout, so the plugin's processor
refuses videos with a client error (``VLLMValidationError``, a 400 from the server) saying why.

Methods: ``divprune``, ``pool``, ``random`` (and ``chain`` of those); ``visionzip`` / ``vscan`` refused, as for
Qwen2.5-VL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from piofvlm.integrations.vllm.llava import KEY_FIELD
from piofvlm.integrations.vllm.qwen_vl import KeptMropeMixin, QwenBudgetInfoMixin, QwenPromptKeyMixin, _method
from piofvlm.integrations.vllm.selection import shorter_prompt_mrope_positions, tokens_per_image

_NO_VIDEOS = (
    "the piofvlm vLLM plugin runs Qwen3-VL with images only: a Qwen3-VL video is written frame by frame with "
    "timestamps between the frames, and the plugin does not lay out its positions next to pruned images yet; "
    "send images, or serve videos with the model's own architecture (without the plugin)"
)


class PiofvlmQwen3VLProcessingInfo(QwenBudgetInfoMixin, Qwen3VLProcessingInfo):
    """Qwen3-VL's processing info: each image gets the budget's placeholders; videos are refused."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # no video modality: vLLM neither profiles nor accepts videos

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # vLLM's Qwen3-VL adds keys to the videos' kwargs, which a processing info without videos does not have
        return super(Qwen3VLProcessingInfo, self).get_supported_mm_processor_kwargs()

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}

    def validate_num_items(self, modality: str, num_items: int) -> None:
        if modality == "video" and num_items > 0:
            raise VLLMValidationError(_NO_VIDEOS, parameter="video")
        super().validate_num_items(modality, num_items)


class PiofvlmQwen3VLMultiModalProcessor(QwenPromptKeyMixin, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's processor: each image gets the budget's placeholders (the configured count, or a ratio of its
    ``h * w / merge**2`` tokens)."""

    def _finalize_hf_mm_data(
        self,
        hf_data: Mapping[str, object],
        hf_kwargs: Mapping[str, object],
        passthrough_data: Mapping[str, object],
        processed_data: Any = None,
    ) -> Any:
        # vLLM's Qwen3-VL calls the HF processor itself (per modality), not through _call_hf_processor: the prompt
        # key of prompt-seeded methods (random) is added to its outputs here
        finalized = super()._finalize_hf_mm_data(hf_data, hf_kwargs, passthrough_data, processed_data)
        return self._with_prompt_key(finalized)

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
    ) -> Sequence[Any]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        method = _method(self.info.get_hf_config())
        if method is None:
            return updates
        merge_length = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size ** 2
        image_token = self.info.get_hf_config().image_token_id

        def image_replacement(item_idx: int) -> list[int]:
            grid_thw = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return [image_token] * tokens_per_image(method, int(grid_thw.prod()) // merge_length)

        return [
            PromptReplacement(modality="image", target=update.target, replacement=image_replacement)
            if update.modality == "image"
            else update
            for update in updates
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PiofvlmQwen3VLMultiModalProcessor,
    info=PiofvlmQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class PiofvlmQwen3VLForConditionalGeneration(KeptMropeMixin, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with a piofvlm input/encoder-side method in ``embed_multimodal``: the kept tokens' own M-RoPE
    positions (piofvlm's ``positions="keep"``) and their own deepstack features."""

    piofvlm_model_type = "qwen3_vl"
    piofvlm_family = "Qwen3-VL"

    def __init__(self, *, vllm_config: Any, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_piofvlm(vllm_config)

    def _embedding_width(self) -> int:
        return int(self.visual_dim + self.multiscale_dim)  # the features, then every deepstack level

    def _split_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged features (what the method selects among) and the deepstack levels of each token."""
        if not self.multiscale_dim:
            return features, None
        return features[:, : self.visual_dim], features[:, self.visual_dim :]

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """The shorter prompt's positions before encoding (images only): see
        :func:`~piofvlm.integrations.vllm.selection.shorter_prompt_mrope_positions`."""
        if self.piofvlm_method is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = int(self.config.vision_config.spatial_merge_size)
        items = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(_NO_VIDEOS)
            t, h, w = (int(v) for v in feature.data["image_grid_thw"].data.tolist())
            offset, length = int(feature.mm_position.offset), int(feature.mm_position.length)
            items.append((offset, length, t, h // merge, w // merge, 1.0))
        return shorter_prompt_mrope_positions(len(input_tokens), items)

    def embed_multimodal(self, **kwargs: object) -> Any:
        keys = kwargs.pop(KEY_FIELD, None)
        if self.piofvlm_method is None:
            return super().embed_multimodal(**kwargs)
        out: list[torch.Tensor] = []
        for modality, item in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "video":
                raise ValueError(_NO_VIDEOS)
            if modality == "image" and item is not None:
                out.extend(self._select_images(item, keys))
        return tuple(out)
