"""LLaVA-1.5 (``LlavaForConditionalGeneration``) in vLLM with a piofvlm method before the language model.

Imports vLLM: loaded by vLLM's ``ModelRegistry`` when a model is configured with the architecture
``PiofvlmLlavaForConditionalGeneration`` (see :mod:`piofvlm.integrations.vllm`).

* Processing: each image gets the method's budget of placeholder tokens (``get_num_image_tokens``), so the prompt
  is shorter before the engine schedules it. For ``random`` the processor also hands each image the fingerprint of
  its prompt (piofvlm's seed, with every image counted at its full size), and the prompt joins the image in the
  items' cache identity, so vLLM's processor, encoder and prefix caches never reuse one prompt's draw for another.
* Encoding: ``embed_multimodal`` encodes the images as vLLM does, captures the inputs of the vision blocks the method
  reads (forward pre-hooks on this instance's vision tower), and returns the selected (and, for VisionZip / VScan /
  pool, merged) embeddings: piofvlm's own ``select`` (:mod:`piofvlm.integrations.vllm.selection`).
* Weights: a checkpoint whose vision tower is saved without the ``vision_model.`` level (what transformers 5 writes
  for the testbed) is loaded by renaming its keys here.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from piofvlm.core.prefill import _sample_keys
from piofvlm.integrations.vllm.selection import (
    CONFIG_KEY,
    VisionTower,
    check_method,
    method_from_config,
    select_image_tokens,
    tokens_per_image,
    vision_layers_needed,
)

KEY_FIELD = "piofvlm_key"
#: If set, a file each rank appends one JSON line per encoded image to: what it kept (tests, inspection).
RECORD_ENV = "PIOFVLM_VLLM_RECORD"


@functools.lru_cache(maxsize=32)
def _method_cached(spec_json: str, positions: str) -> Any:
    return method_from_config(json.loads(spec_json), positions)


def _method_of(config: Any, positions: str = "renumber") -> Any:
    """The configured method of a model config (``None``: nothing pruned), validated."""
    spec = getattr(config, CONFIG_KEY, None)
    if spec is None:
        raise ValueError(
            f"the piofvlm vLLM plugin's model classes need a {CONFIG_KEY!r} entry in the model config: pass "
            "hf_overrides=piofvlm.integrations.vllm.hf_overrides(model, 'divprune', keep=64) (or method 'none'), "
            f'i.e. {{"architectures": ["Piofvlm<Architecture>"], '
            f'"{CONFIG_KEY}": {{"method": "divprune", "keep": 64}}}}'
        )
    return _method_cached(json.dumps(spec, sort_keys=True), positions)


class BudgetInfoMixin:
    """A vLLM processing info whose ``get_num_image_tokens`` is the configured budget of the image's unpruned count
    (``get_full_image_tokens``: the family's own count); mixed into LLaVA's and LLaVA-NeXT's processing infos."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = self.get_full_image_tokens(image_width=image_width, image_height=image_height)
        method = _method_of(self.get_hf_config())  # type: ignore[attr-defined]
        return full if method is None else tokens_per_image(method, full)

    def get_full_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """Tokens the image has unpruned (the vLLM family's own count)."""
        return super().get_num_image_tokens(image_width=image_width, image_height=image_height)  # type: ignore[misc]


class PiofvlmLlavaProcessingInfo(BudgetInfoMixin, LlavaProcessingInfo):
    """LLaVA's processing info; each image gets the budget's placeholders (vLLM's LLaVA count unpruned)."""


class PromptKeyMixin:
    """For prompt-seeded methods (``random``) a processor hands each image its prompt's fingerprint (piofvlm's seed,
    computed on the prompt transformers sees: each image token expanded to that image's full count), and adds it to
    the items' cache identity. Mixed into a vLLM multimodal processor whose info has ``get_full_image_tokens``."""

    _prompt_key: int = 0
    info: Any

    positions: str = "renumber"  # the family's positions mode (method_from_config)

    def _prompt_seeded(self) -> bool:
        method = _method_of(self.info.get_hf_config(), self.positions)
        return method is not None and method.name == "random"

    def _full_counts(self, inputs: Any) -> list[int]:
        """Each image's unpruned token count, in prompt order (from the images' sizes)."""
        items = inputs.mm_data_items.get("image") if hasattr(inputs.mm_data_items, "get") else None
        if items is None or not hasattr(items, "get_image_size"):
            return []
        sizes = [items.get_image_size(i) for i in range(items.get_count())]
        return [self.info.get_full_image_tokens(image_width=s.width, image_height=s.height) for s in sizes]

    def _full_prompt_key(self, prompt: list[int], counts: list[int]) -> int:
        """piofvlm's seed of ``prompt`` (``core.prefill._sample_keys``) with the ``i``-th image token expanded to
        ``counts[i]`` tokens, as the prompt transformers sees."""
        config = self.info.get_hf_config()
        image_token = getattr(config, "image_token_index", None)
        image_token = config.image_token_id if image_token is None else image_token
        ids: list[int] = []
        images = iter(counts)
        for token in prompt:
            ids.extend([token] * (next(images) if token == image_token else 1))
        tensor = torch.tensor([ids], dtype=torch.long)
        return int(_sample_keys(tensor, torch.ones_like(tensor, dtype=torch.bool))[0])

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        if self._prompt_seeded():
            self._prompt_key = self._full_prompt_key(list(inputs.prompt), self._full_counts(inputs))
        else:
            self._prompt_key = 0
        return super().apply(inputs, timing_ctx)  # type: ignore[misc]

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)  # type: ignore[misc]
        if not self._prompt_seeded():
            return hashes
        return {modality: [f"{h}-piofvlm-{self._prompt_key}" for h in items] for modality, items in hashes.items()}

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> Any:
        return self._with_prompt_key(super()._call_hf_processor(hf_data, hf_kwargs))  # type: ignore[misc]

    def _with_prompt_key(self, processed: Any) -> Any:
        """``processed`` (the HF processor's outputs) with each image's prompt key, for prompt-seeded methods."""
        if self._prompt_seeded() and "pixel_values" in processed:
            # one key per image (Qwen's pixel_values are every image's patches, its image_grid_thw one row per image)
            images = len(processed["image_grid_thw"] if "image_grid_thw" in processed else processed["pixel_values"])
            processed[KEY_FIELD] = torch.full((images,), self._prompt_key, dtype=torch.long)
        return processed

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Any:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        fields[KEY_FIELD] = MultiModalFieldConfig.batched("image")
        return fields


class PiofvlmLlavaMultiModalProcessor(PromptKeyMixin, LlavaMultiModalProcessor):
    """LLaVA's processor; for prompt-seeded methods (``random``) it passes each image its prompt's fingerprint."""

    def _full_counts(self, inputs: Any) -> list[int]:
        vision = self.info.get_hf_config().vision_config
        full = self.info.get_full_image_tokens(image_width=vision.image_size, image_height=vision.image_size)
        return [full] * len(list(inputs.prompt))  # every image has the same count (more than enough entries)


def _vision_tower_keys(name: str) -> str:
    """``vision_tower.encoder...`` -> ``vision_tower.vision_model.encoder...`` (also under ``model.``)."""
    for prefix in ("model.vision_tower.", "vision_tower."):
        if name.startswith(prefix) and not name[len(prefix) :].startswith("vision_model."):
            return prefix + "vision_model." + name[len(prefix) :]
    return name


class ClipTowerMixin:
    """The glue LLaVA-1.5 and LLaVA-NeXT share in vLLM (CLIP-style vision towers, ``vision_tower.vision_model``):
    the method from the config, the tower's description, captures of the vision blocks the method reads, their
    attention recomputed from vLLM's fused ``qkv_proj``, the selection on the projected features, the record of what
    each image kept, and the checkpoint key renaming. Mixed in before vLLM's model class."""

    config: Any
    vision_tower: Any
    piofvlm_method: Any
    piofvlm_tower: VisionTower
    _captured: dict[int, torch.Tensor]

    def _init_piofvlm(self, model_type: str) -> None:
        """Read the method from the config, describe the vision tower, check the method against it, and hook the
        vision blocks whose inputs it reads (called at the end of ``__init__``)."""
        config = self.config
        self.piofvlm_method = _method_of(config)
        vision = config.vision_config
        blocks = self._vision_blocks()
        layer = config.vision_feature_layer
        feature_index = layer % (vision.num_hidden_layers + 1) - 1 if isinstance(layer, int) else -1
        strategy = config.vision_feature_select_strategy
        self.piofvlm_tower = VisionTower(
            num_layers=len(blocks),
            feature_layer_index=feature_index,
            has_cls=strategy == "default" and vision.model_type == "clip_vision_model",
            side=vision.image_size // vision.patch_size,
            attention=self._vision_attention,
        )
        self._captured = {}
        method = self.piofvlm_method
        if method is None:
            return
        if model_type == "llava_next" and strategy != "default":
            raise ValueError(
                f"the piofvlm plugin runs LLaVA-NeXT with vision_feature_select_strategy 'default' (no [CLS] token "
                f"among the visual tokens); this model has {strategy!r}"
            )
        if method.name in ("visionzip", "vscan"):
            if not isinstance(layer, int) or feature_index < 0:
                raise ValueError(
                    f"{method.name} needs a single vision feature layer (a block's output); this model has "
                    f"vision_feature_layer={layer!r}"
                )
            if vision.model_type != "clip_vision_model" or strategy != "default":
                raise ValueError(
                    f"{method.name} in vLLM supports CLIP vision towers with the 'default' feature strategy; this "
                    f"model has {vision.model_type} / {strategy!r} (use divprune, pool or random)"
                )
        check_method(method, self.piofvlm_tower, config.text_config.num_hidden_layers, model_type)
        for index in vision_layers_needed(method, self.piofvlm_tower):
            blocks[index].register_forward_pre_hook(functools.partial(self._capture, index))

    def _vision_blocks(self) -> torch.nn.ModuleList:
        tower = self.vision_tower
        model = getattr(tower, "vision_model", tower)
        return model.encoder.layers

    def _capture(self, index: int, module: torch.nn.Module, args: tuple) -> None:
        self._captured[index] = args[0]

    def _vision_attention(self, layer_index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities ``(N, H, T, T)`` (fp32, every head) and keys ``(N, T, hd)`` (mean over heads) of vision
        block ``layer_index``, as piofvlm's LLaVA adapter computes them; with tensor parallelism each rank holds
        some heads and they are gathered (in head order)."""
        block = self._vision_blocks()[layer_index]
        attn = block.self_attn
        num, length, _ = hidden.shape
        qkv, _ = attn.qkv_proj(block.layer_norm1(hidden))
        q, k, _ = qkv.chunk(3, dim=-1)
        heads = attn.num_heads_per_partition
        q = q.reshape(num, length, heads, attn.head_dim).transpose(1, 2)
        k = k.reshape(num, length, heads, attn.head_dim).transpose(1, 2)
        probs = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale).softmax(-1)
        if attn.tp_size > 1:
            probs = tensor_model_parallel_all_gather(probs.contiguous(), dim=1)
            k = tensor_model_parallel_all_gather(k.contiguous(), dim=1)
        return probs, k.mean(1)

    def _select_encoded(
        self,
        image_input: Any,
        keys: Any,
        encode: Callable[[], list[torch.Tensor] | torch.Tensor],
        model_type: str,
        sources: list[dict[str, torch.Tensor]] | None = None,
    ) -> list[torch.Tensor]:
        """Encode the images (``encode()``, with this instance's captures of the vision blocks the method reads) and
        run the method's selection on the projected features; returns the kept embeddings of each image."""
        self._captured.clear()
        try:
            features = encode()
            if keys is not None:
                keys = torch.as_tensor(keys if isinstance(keys, torch.Tensor) else torch.stack(list(keys))).reshape(-1)
            selection = select_image_tokens(
                self.piofvlm_method,
                features,
                self.piofvlm_tower,
                self._captured,
                sample_keys=keys,
                num_text_layers=self.config.text_config.num_hidden_layers,
                model_type=model_type,
                sources=sources,
            )
        finally:
            self._captured.clear()
        if os.environ.get(RECORD_ENV):
            self._record(image_input["pixel_values"], selection.kept, keys)
        return selection.embeddings

    def _record(self, pixel_values: Any, kept: list[torch.Tensor], keys: torch.Tensor | None) -> None:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        with open(os.environ[RECORD_ENV], "a") as file:
            for b, index in enumerate(kept):
                line = {
                    "rank": rank,
                    "pixel_sum": float(pixel_values[b].double().sum()),
                    "key": None if keys is None else int(keys[b]),
                    "kept": index.tolist(),
                }
                file.write(json.dumps(line) + "\n")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((_vision_tower_keys(name), tensor) for name, tensor in weights)  # type: ignore[misc]


@MULTIMODAL_REGISTRY.register_processor(
    PiofvlmLlavaMultiModalProcessor, info=PiofvlmLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PiofvlmLlavaForConditionalGeneration(ClipTowerMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA with a piofvlm input/encoder-side method in ``embed_multimodal``."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_piofvlm("llava")

    def embed_multimodal(self, **kwargs: object) -> Any:
        keys = kwargs.pop(KEY_FIELD, None)
        if self.piofvlm_method is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if (
            isinstance(image_input, dict)
            and image_input.get("type") == "image_embeds"
            or isinstance(image_input, LlavaImageEmbeddingInputs)
        ):
            raise ValueError("the piofvlm plugin selects among encoded images: send images, not image_embeds")

        def encode() -> torch.Tensor:
            features = self._process_image_input(image_input)
            return features if isinstance(features, torch.Tensor) else torch.stack(list(features))

        return self._select_encoded(image_input, keys, encode, "llava")
