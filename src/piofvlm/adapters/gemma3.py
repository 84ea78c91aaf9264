"""Gemma 3 (``Gemma3ForConditionalGeneration``, ``model_type`` ``gemma3``).

``Gemma3Processor`` writes an image as ``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x ``mm_tokens_per_image``
+ ``<end_of_image>\\n\\n`` (every image the same size: SigLIP at a fixed resolution, average-pooled), so each image
is one contiguous run of image tokens. What differs from the Llama-style families:

* **Two layer types.** Local layers (``sliding_attention``, 5 of every 6) and global ones (``full_attention``) get
  masks of their own and rotary tables of their own (``rope_local_base_freq`` vs ``rope_theta``): the mechanism
  keeps one mask and one table per type (:meth:`layer_type`), gathers the tables with the kept tokens and rebuilds
  the masks per type (:meth:`prefill_masks`, :meth:`decode_mask`).
* **Sliding windows count kept slots.** After pruning, a local layer's window covers the last ``sliding_window``
  *kept* tokens, not the tokens within ``sliding_window`` original positions: this is what the stock
  ``DynamicSlidingWindowLayer`` cache of the pruned sequence holds (its last ``sliding_window - 1`` slots), and what
  a no-cache forward of the kept sequence computes, so cached decoding equals that forward. Pruning therefore lets
  a local layer reach further back in the original prompt than the unpruned model's would.
* **Bidirectional image blocks.** In every layer the tokens of one image attend to each other in both directions
  (``token_type_ids`` -> ``get_block_sequence_ids_for_mask``; in local layers still cut by the window). The block
  of each kept token is gathered with it, so the kept tokens of one image still see each other. Decoding adds text
  only (a new image on an old cache is refused), which needs no block.
* **Sandwich norms.** A decoder layer normalises the attention output and the MLP input and output
  (:meth:`decoder_layer_output`, the fast proxy's tail). ``Gemma3Attention`` (5.17-5.24) does not pass
  ``attn_logit_softcapping`` to its attention function, so neither does the proxy. The embedding scale
  (``sqrt(hidden_size)``) is inside ``embed_tokens``, before the mechanism sees the hidden states.
* Static KV caches are refused (their local layers are ``StaticSlidingWindowLayer``s of ``sliding_window`` slots,
  rolled in place), as is ``use_bidirectional_attention`` (EmbeddingGemma's fully bidirectional text). The SigLIP
  vision tower has no vision-attention scores here: ``visionzip``/``vscan``/``chain`` refuse; ``pool`` pools each
  image's square grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.adapters.base import ModelAdapter, check_supported_attention
from piofvlm.adapters.boxes import TokenBoxes, raster_boxes, split_by_sample
from piofvlm.adapters.registry import register_adapter
from piofvlm.core.ops import gather_sequence

SLIDING = "sliding_attention"


@register_adapter
class Gemma3Adapter(ModelAdapter):
    """Gemma 3: local (sliding-window) and global layers, bidirectional image blocks, sandwich norms."""

    model_types = ("gemma3",)
    rebuilds_layer_type_masks: ClassVar[bool] = True

    # ------------------------------------------------------------------------------------------ visual tokens
    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        """Every image (and every pan-and-scan crop) is ``mm_tokens_per_image`` tokens: one per ``pixel_values`` row
        (or per pre-encoded feature row)."""
        if modality != "image":
            return None
        features = transformers_compat.encoded_features(model_kwargs, "image")
        pixels = model_kwargs.get("pixel_values")
        if isinstance(features, torch.Tensor):
            items = features.shape[0]
        elif isinstance(features, (list, tuple)):
            return [int(f.shape[0]) for f in features]
        elif isinstance(pixels, torch.Tensor):
            items = pixels.shape[0]
        else:
            return None
        return [int(self.model.config.mm_tokens_per_image)] * int(items)

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """One view per image: the pooled ``side x side`` grid (``side**2 == mm_tokens_per_image``) in raster order
        over the whole picture (the processor resizes to a square, it does not crop). With pan-and-scan each crop is
        an image run of its own, so each is drawn as a picture of its own."""
        tokens = int(self.model.config.mm_tokens_per_image)
        side = round(tokens**0.5)
        if side * side != tokens:
            raise ValueError(f"gemma3: mm_tokens_per_image={tokens} is not a square grid; overlays need one")
        counts = self.item_token_counts(model_kwargs, "image")
        if counts is None:
            raise ValueError("gemma3: pixel_values (or pre-encoded image features) are needed to lay out the images")
        return [
            TokenBoxes(
                sample, "image", item, raster_boxes(side, side), torch.zeros(tokens, dtype=torch.long), ("image",)
            )
            for sample, item in split_by_sample(self.visual_slots(model_kwargs), counts)
        ]

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image in prompt order: one square grid of ``mm_tokens_per_image`` tokens (``pixel_values`` row
        ``crop``); ``patch`` is the token's cell of the pooled grid (each averages ``kernel x kernel`` SigLIP
        patches, so it is not a vision-encoder patch index: no vision-attention method uses it here)."""
        tokens = int(self.model.config.mm_tokens_per_image)
        side = int(round(tokens**0.5))
        counts = self.item_token_counts(model_kwargs, "image") or []
        token = torch.arange(tokens)
        return [
            {"crop": torch.full_like(token, i), "patch": token, "grid": torch.zeros_like(token)}
            | {"row": token // side, "col": token % side}
            for i in range(len(counts))
        ]

    # -------------------------------------------------------------------------------------------- layer types
    def layer_type(self, index: int) -> str:
        return self.text_config.layer_types[index]

    def window(self, layer_type: str) -> int | None:
        """The sliding window of layers of ``layer_type`` (in slots), None for global layers."""
        return int(self.text_config.sliding_window) if layer_type == SLIDING else None

    def rotary_embeddings(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor, layer_type: str = "full_attention"
    ) -> tuple[torch.Tensor, ...]:
        return self.language_model.rotary_emb(hidden_states, position_ids, layer_type)

    def prompt_block_ids(self, model_kwargs: dict[str, Any]) -> tuple[str, torch.Tensor] | None:
        """``(argument name, (B, S_prompt) block ids)`` of the prompt's image blocks (-1 outside them), from
        ``token_type_ids``; None without it (the model then builds plain causal masks too)."""
        token_type_ids = model_kwargs.get("token_type_ids")
        if token_type_ids is None:
            return None
        return "token_type_ids", transformers_compat.image_block_ids(token_type_ids)

    def has_blocks(self, layer_type: str) -> bool:
        """Whether layers of ``layer_type`` let an image block attend to itself both ways (Gemma 3: every layer)."""
        return True

    def block_ids(self, source: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """``(B, S)`` image block of each slot of a layout (-1 for text and padding), gathered from
        :meth:`prompt_block_ids` through ``source`` (the prompt slot of each slot); None where there are none."""
        prompt = self.prompt_block_ids(model_kwargs)
        if prompt is None:
            return None
        name, blocks = prompt
        blocks = blocks.to(source.device)  # (B, S_prompt)
        if blocks.shape[0] != source.shape[0]:
            raise ValueError(
                f"{name} has {blocks.shape[0]} rows for a batch of {source.shape[0]}: pass the processor's "
                f"{name} with input_ids"
            )
        missing = int(source.max()) + 1 - blocks.shape[1]
        if missing > 0:  # block ids shorter than the prompt: text after them (as the model pads them, with -1)
            blocks = torch.nn.functional.pad(blocks, (0, missing), value=-1)
        gathered = gather_sequence(blocks, source.clamp(min=0), 0)
        return torch.where(source >= 0, gathered, -1)

    def prefill_masks(
        self,
        valid: torch.Tensor,
        source: torch.Tensor,
        dtype: torch.dtype,
        key_length: int | None,
        model_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        if key_length is not None:  # unreachable: transformers_compat.static_cache_length refuses sliding layers
            raise ValueError(
                f"piofvlm does not support a static KV cache for {self.model_type} models (sliding-window layers)"
            )
        blocks = self.block_ids(source, model_kwargs)
        seq_len = valid.shape[1]
        return {
            kind: transformers_compat.layer_type_mask(
                self.text_config,
                valid,
                seq_len,
                dtype,
                sliding_window=self.window(kind),
                block_ids=blocks if self.has_blocks(kind) else None,
            )
            for kind in self.layer_types
        }

    def decode_mask(self, layer_type: str, key_valid: torch.Tensor, query_length: int, dtype: torch.dtype) -> Any:
        return transformers_compat.layer_type_mask(
            self.text_config, key_valid, query_length, dtype, sliding_window=self.window(layer_type)
        )

    def allowed_keys(
        self,
        layer_type: str,
        valid: torch.Tensor,
        source: torch.Tensor,
        query_slots: torch.Tensor,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Causal over real keys, OR the query's own image block (where :meth:`has_blocks`); AND the window in local
        layers."""
        key_index = torch.arange(valid.shape[1], device=valid.device)[None, None, :]  # (1, 1, S)
        query_index = query_slots[:, :, None]  # (B, n, 1)
        allowed = key_index <= query_index  # (B, n, S)
        blocks = self.block_ids(source, model_kwargs) if self.has_blocks(layer_type) else None
        if blocks is not None:
            query_block = blocks.gather(1, query_slots)[:, :, None]  # (B, n, 1)
            allowed = allowed | ((blocks[:, None, :] == query_block) & (query_block >= 0))
        window = self.window(layer_type)
        if window is not None:
            allowed = allowed & (key_index > query_index - window)
        return (allowed & valid[:, None, :])[:, None]  # (B, 1, n, S)

    # ------------------------------------------------------------------------------------ fast proxy support
    def rotary_fn(self):  # noqa: D102 - documented in the base class
        return transformers_compat.rotary_function("gemma3")

    def decoder_layer_output(self, layer: nn.Module, hidden: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """``Gemma3DecoderLayer``: ``h = x + post_attn_norm(attn)``; ``h + post_ff_norm(mlp(pre_ff_norm(h)))``."""
        residual = hidden + layer.post_attention_layernorm(attn_output)
        return residual + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(residual)))

    # ---------------------------------------------------------------------------------------------- checks
    def check_attention(self) -> None:
        check_supported_attention(self.attn_implementation)
        if getattr(self.text_config, "use_bidirectional_attention", False):
            raise ValueError(
                "gemma3 models with use_bidirectional_attention=True (fully bidirectional text, e.g. EmbeddingGemma) "
                "are not supported: the mechanism rebuilds causal masks with image blocks and sliding windows"
            )
