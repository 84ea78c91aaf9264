"""PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``, ``model_type`` ``paligemma``).

Read from transformers 5.24 (``modeling_paligemma.py``, ``processing_paligemma.py``, ``masking_utils.py``).
``PaliGemmaProcessor`` writes ``<image>`` x ``image_seq_length`` per image (the SigLIP tower's every patch, no
pooling), ``<bos>`` after the last image, the prompt and ``\\n``; ``token_type_ids`` are 0 on this *prefix* and 1 on a
training *suffix* (``suffix=``). The language model is Gemma (PaliGemma) or Gemma 2 (PaliGemma 2). What differs from
the Llama-style families:

* **A bidirectional prefix (prefix-LM).** The model ORs into every layer's causal mask one block over all prefix
  tokens (``block_sequence_ids = where(token_type_ids == 0, 0, -1)``): at inference the whole prompt, images and
  text, attends to itself in both directions; generated tokens (the suffix) are causal. **After pruning the prefix
  stays bidirectional among the kept prefix tokens**: the block of each kept token is gathered with it
  (:meth:`prompt_block_ids` through the layout's ``source``), so a pruned layer computes what the unhooked model
  computes on the kept sequence with the same ``token_type_ids`` (``tests/test_paligemma.py`` checks it against
  that run). Decoding adds suffix tokens only: causal, as the model's own decode steps (it builds the block on the
  first iteration only).
* **Sliding layers do not cut the prefix** (PaliGemma 2: Gemma 2's local layers). ``create_sliding_window_causal_mask``
  ORs the block *after* the window: sliding = (causal AND window) OR prefix block, so a local layer's prefix queries
  see the whole (kept) prefix, unlike Gemma 3's image blocks, which the window cuts
  (:func:`~piofvlm.transformers_compat.prefix_lm_mask`). Suffix tokens see the last ``sliding_window`` kept slots
  (windows count kept slots, as for Gemma 3: what the stock sliding cache of the pruned sequence holds).
* **Softcapping** (Gemma 2). ``final_logit_softcapping`` (30 in the checkpoints) is applied by the model after the
  LM head: PIO's proxy head applies it too (:attr:`lm_head`), so the proxy loss is the model's.
  ``attn_logit_softcapping`` (50 in the checkpoints) is applied by Gemma 2's eager attention only (transformers has
  no sdpa for Gemma 2): the fast proxy and the methods recomputing attention do not model it, so with it set PIO
  takes its reference proxy (the layer's own forward: exact) and ``fastv``/``pdrop``/``sparsevlm`` are refused
  (:meth:`check_method`).
* Positions are 1-indexed (``arange + 1``): the model passes them, the mechanism gathers them
  (``positions="renumber"`` renumbers from 1 as well). Gemma 2's sandwich norms are the fast proxy's tail as in
  Gemma 3; Gemma's layer is Llama's pre-norm block.
* Refused: static caches (``generate()`` would prepare a 4-D mask with the prefix block that the mechanism does not
  rebuild), flash attention (refused by transformers itself: it would drop the prefix block). The SigLIP tower has no
  vision-attention scores here: ``visionzip``/``vscan``/``chain`` refuse; ``pool`` pools each image's patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.boxes import TokenBoxes, raster_boxes, split_by_sample
from piofvlm.adapters.gemma3 import Gemma3Adapter
from piofvlm.adapters.registry import register_adapter
from piofvlm.core.guard import guarded

if TYPE_CHECKING:
    from piofvlm.core.handle import PruningHandle


class _SoftcappedHead(nn.Module):
    """The LM head followed by the model's ``final_logit_softcapping``: ``cap * tanh(head(x) / cap)``."""

    def __init__(self, head: nn.Module, cap: float) -> None:
        super().__init__()
        self.head, self.cap = head, float(cap)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


def _refuse_static_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = transformers_compat.cache_from_kwargs(kwargs)
    try:
        static = transformers_compat.static_cache_length(cache) is not None
    except ValueError:  # a static cache with sliding layers (PaliGemma 2)
        static = True
    if static:
        raise ValueError(
            "piofvlm does not support a static KV cache for paligemma models (the bidirectional prefix mask "
            "generate() prepares for it is not rebuilt, and transformers 5.24's PaliGemma 2 fails on one by itself); "
            "use the default dynamic cache"
        )


@register_adapter
class PaliGemmaAdapter(Gemma3Adapter):
    """PaliGemma / PaliGemma 2: a bidirectional prefix (images + prompt), Gemma or Gemma 2 text models."""

    model_types = ("paligemma",)

    # ------------------------------------------------------------------------------------------ visual tokens
    @property
    def tokens_per_image(self) -> int:
        """Visual tokens of every image: one per SigLIP patch (``image_size / patch_size`` squared)."""
        vision = self.model.config.vision_config
        return int(vision.image_size // vision.patch_size) ** 2

    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        """Every image is :attr:`tokens_per_image` tokens: the call's image tokens split into images of that size
        (adjacent images, the checkpoints' layout, are told apart; with or without ``pixel_values``, e.g. the
        features ``generate()`` pre-encoded)."""
        input_ids = model_kwargs.get("input_ids")
        if input_ids is not None:
            num_image_tokens = int(self.visual_token_mask(input_ids).sum())
        tokens = self.tokens_per_image
        if num_image_tokens % tokens:
            raise ValueError(
                f"{num_image_tokens} image tokens are not a whole number of paligemma images of {tokens} tokens "
                "(image_size / patch_size squared): build the prompt with the model's PaliGemmaProcessor"
            )
        return [tokens] * (num_image_tokens // tokens)

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        return self.image_token_counts(0, model_kwargs) if modality == "image" else None

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """One view per image: the SigLIP patch grid in raster order over the whole picture (the processor resizes
        to a square)."""
        tokens = self.tokens_per_image
        side = round(tokens**0.5)
        counts = self.image_token_counts(0, model_kwargs)
        if counts is None:
            raise ValueError("paligemma: pixel_values (or pre-encoded image features) are needed to lay out images")
        return [
            TokenBoxes(
                sample, "image", item, raster_boxes(side, side), torch.zeros(tokens, dtype=torch.long), ("image",)
            )
            for sample, item in split_by_sample(self.visual_slots(model_kwargs), counts)
        ]

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image in prompt order: its SigLIP patches in raster order (``pixel_values`` row ``crop``, no [CLS])."""
        tokens = self.tokens_per_image
        side = round(tokens**0.5)
        counts = self.image_token_counts(0, model_kwargs) or []
        token = torch.arange(tokens)
        return [
            {"crop": torch.full_like(token, i), "patch": token, "grid": torch.zeros_like(token)}
            | {"row": token // side, "col": token % side}
            for i in range(len(counts))
        ]

    # ---------------------------------------------------------------------------------------------- positions
    def default_position_ids(self, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """PaliGemma's positions are 1-indexed."""
        return torch.arange(1, seq_len + 1, device=device)[None]

    # -------------------------------------------------------------------------------------------- layer types
    def layer_type(self, index: int) -> str:
        layer_types = getattr(self.text_config, "layer_types", None)
        return layer_types[index] if layer_types else "full_attention"

    def window(self, layer_type: str) -> int | None:
        window = getattr(self.text_config, "sliding_window", None)
        return int(window) if layer_type == "sliding_attention" and window is not None else None

    def rotary_embeddings(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor, layer_type: str = "full_attention"
    ) -> tuple[torch.Tensor, ...]:
        return self.language_model.rotary_emb(hidden_states, position_ids)  # one table for every layer type

    def prompt_block_ids(self, model_kwargs: dict[str, Any]) -> tuple[str, torch.Tensor] | None:
        """The prefix block: 0 where ``token_type_ids == 0`` (images and prompt), -1 on the suffix; None without
        ``token_type_ids`` (the model then builds plain causal masks too)."""
        token_type_ids = model_kwargs.get("token_type_ids")
        if token_type_ids is None:
            return None
        return "token_type_ids", torch.where(token_type_ids == 0, 0, -1)

    def prefill_masks(
        self,
        valid: torch.Tensor,
        source: torch.Tensor,
        dtype: torch.dtype,
        key_length: int | None,
        model_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        if key_length is not None:
            raise ValueError(
                "piofvlm does not support a static KV cache for paligemma models (the bidirectional prefix mask "
                "generate() prepares for it is not rebuilt); use the default dynamic cache"
            )
        blocks = self.block_ids(source, model_kwargs)
        return {
            kind: transformers_compat.prefix_lm_mask(
                self.text_config, valid, valid.shape[1], dtype, sliding_window=self.window(kind), block_ids=blocks
            )
            for kind in self.layer_types
        }

    def allowed_keys(
        self,
        layer_type: str,
        valid: torch.Tensor,
        source: torch.Tensor,
        query_slots: torch.Tensor,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """(Causal AND the window in sliding layers) OR the prefix block, over real keys."""
        key_index = torch.arange(valid.shape[1], device=valid.device)[None, None, :]  # (1, 1, S)
        query_index = query_slots[:, :, None]  # (B, n, 1)
        allowed = key_index <= query_index  # (B, n, S)
        window = self.window(layer_type)
        if window is not None:
            allowed = allowed & (key_index > query_index - window)
        blocks = self.block_ids(source, model_kwargs)
        if blocks is not None:
            query_block = blocks.gather(1, query_slots)[:, :, None]  # (B, n, 1)
            allowed = allowed | ((blocks[:, None, :] == query_block) & (query_block >= 0))
        return (allowed & valid[:, None, :])[:, None]  # (B, 1, n, S)

    def block_ids(self, source: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """As Gemma 3's, but padding slots join the prefix block, as the processor's padding (``token_type_ids`` 0)
        does in the model: only their own (ignored) query rows see it, their keys stay masked by the padding mask,
        and keep-all stays bit-identical on every row."""
        blocks = super().block_ids(source, model_kwargs)
        return None if blocks is None else torch.where(source >= 0, blocks, 0)

    # ------------------------------------------------------------------------------------------------ hooks
    def attach(self, handle: PruningHandle) -> None:
        """Refuse a static KV cache at the multimodal call, before the model builds its prefix-LM mask for it."""
        hook = guarded(_refuse_static_cache)
        handle.add_hook(self.multimodal_model.register_forward_pre_hook(hook, with_kwargs=True))

    # ------------------------------------------------------------------------------------ fast proxy support
    @property
    def lm_head(self) -> nn.Module:
        """The LM head, followed by ``final_logit_softcapping`` where the text config sets it (Gemma 2)."""
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return self.model.lm_head if cap is None else _SoftcappedHead(self.model.lm_head, cap)

    @property
    def attention_softcap(self) -> float | None:
        """Gemma 2's ``attn_logit_softcapping`` (None for Gemma or where it is unset)."""
        cap = getattr(self.text_config, "attn_logit_softcapping", None)
        return None if cap is None else float(cap)

    def rotary_fn(self):  # noqa: D102 - documented in the base class
        if self.attention_softcap is not None:  # the explicit attention would miss the softcap: reference proxy
            return None
        return transformers_compat.rotary_function(self.text_config.model_type)

    def decoder_layer_output(self, layer: nn.Module, hidden: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """Gemma 2's sandwich norms (as Gemma 3's); Gemma's Llama pre-norm block."""
        if hasattr(layer, "pre_feedforward_layernorm"):
            return super().decoder_layer_output(layer, hidden, attn_output)
        return ModelAdapter.decoder_layer_output(self, layer, hidden, attn_output)

    # ---------------------------------------------------------------------------------------------- checks
    def check_method(self, method: Any) -> None:
        name = getattr(method, "name", type(method).__name__)
        if getattr(method, "reads_attention", False) and self.attention_softcap is not None:
            raise ValueError(
                f"{name} is not supported on paligemma models with attn_logit_softcapping="
                f"{self.attention_softcap:g} (PaliGemma 2): it recomputes a decoder layer's attention (queries, keys) "
                "without the softcap; use pio (its proxy runs the layer itself here), random, divprune, cdpruner or "
                "pool"
            )

    def check_attention(self) -> None:
        ModelAdapter.check_attention(self)  # Gemma 3's check refuses use_bidirectional_attention, which PaliGemma sets
