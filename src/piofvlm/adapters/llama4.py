"""Llama 4 Scout / Maverick (``Llama4ForConditionalGeneration``, ``model_type`` ``llama4``).

Read from transformers 5.24 (``modeling_llama4.py``, ``processing_llama4.py``, ``masking_utils.py``,
``cache_utils.py``). ``Llama4Processor`` writes an image as ``<|image_start|>``, then for a tiled image each tile's
``<|patch|>`` tokens (``<|tile_x_separator|>`` between the tiles of a row, ``<|tile_y_separator|>`` after a row),
then ``<|image|>`` and the global view's ``<|patch|>`` tokens, then ``<|image_end|>``; the ``<|patch|>`` tokens
(``config.image_token_id``) receive the pixel-shuffled vision features. What differs from the Llama-style families:

* **Module tree.** ``Llama4ForConditionalGeneration`` has no inner multimodal model: it merges the features itself
  and calls ``language_model`` (a ``Llama4ForCausalLM``: decoder ``language_model.model``, LM head
  ``language_model.lm_head``).
* **An image is the span between ``<|image_start|>`` and ``<|image_end|>``**: its tiles and global view are one item
  (the separators are text inside it), counted from ``input_ids`` (:meth:`item_token_counts`).
* **Chunked attention counts kept slots.** Layers with RoPE (3 of 4) are ``chunked_attention``: a query sees the
  earlier keys of its chunk of ``attention_chunk_size`` slots, counted from the sample's first real slot. After
  pruning, chunks are cut **by kept index** (the slots of the pruned sequence), not by original position: this is what
  the unhooked model computes on the kept sequence and what its chunked-layer cache (a ``DynamicSlidingWindowLayer``
  of ``attention_chunk_size - 1`` slots) serves while decoding, so cached decode == no-cache forward of the kept
  sequence (``tests/test_llama4.py``). A pruned layer's chunk therefore reaches further back in the original prompt.
  The decode mask needs each key's absolute slot: :meth:`decode_mask_over` builds it over every slot the layer saw.
* **NoPE global layers** (every 4th) take no rotary table; their attention temperature (``attn_temperature_tuning``,
  ``floor_scale``) is computed by the model from the slot count of the layer's sequence (``arange`` + cached length),
  so it also counts kept slots (constant 1 below ``floor_scale`` = 8192 slots).
* **Complex rotary tables.** The rotary embedding returns one complex tensor (``freqs_cis``); the mechanism gathers
  ``(cos, sin)`` pairs, so the adapter hands it ``(real, imag)`` and the layers the complex tensor back (two
  layer pre-hooks around the mechanism's, :meth:`attach`; exact).
* **MoE feed-forward** (``layer.feed_forward``: a top-k sigmoid router per token plus a shared expert): routing is
  per token, so cached decode == no-cache forward and batch == single hold as for dense layers. The fast proxy does
  not model Llama 4's attention (complex interleaved RoPE, L2 QK-norm, NoPE temperature): ``rotary_fn()`` is None and
  PIO runs the proxy layer's own forward (MoE block included: exact); ``fastv``/``pdrop``/``sparsevlm``/``dart``
  (explicit attention recomputation) are refused, as are ``visionzip``/``vscan``/``chain`` (no vision-attention map).
* Refused: static caches (chunked layers are ``StaticSlidingWindowLayer``s), flash attention on prompts longer than
  a chunk (refused by transformers itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.boxes import TokenBoxes, in_region, raster_boxes, split_by_sample
from piofvlm.adapters.registry import register_adapter
from piofvlm.core.guard import guarded

if TYPE_CHECKING:
    from piofvlm.core.handle import PruningHandle

CHUNKED = "chunked_attention"


def _to_pair(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Before the mechanism's layer hook: the complex ``freqs_cis`` as a ``(real, imag)`` pair it can gather."""
    table = kwargs.get("position_embeddings")
    if isinstance(table, torch.Tensor) and table.is_complex():
        kwargs = dict(kwargs)
        kwargs["position_embeddings"] = (table.real, table.imag)
        return args, kwargs
    return None


def _to_complex(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """After the mechanism's layer hook (and for the reference proxy's call): the pair back as ``freqs_cis``."""
    table = kwargs.get("position_embeddings")
    if isinstance(table, (tuple, list)) and len(table) == 2:
        kwargs = dict(kwargs)
        kwargs["position_embeddings"] = torch.complex(table[0].contiguous(), table[1].contiguous())
        return args, kwargs
    return None


@register_adapter
class Llama4Adapter(ModelAdapter):
    """Llama 4: chunked (RoPE) and global (NoPE) layers, MoE feed-forwards, tiled images, complex rotary tables."""

    model_types = ("llama4",)

    # ----------------------------------------------------------------------------------------------- module tree
    @property
    def multimodal_model(self) -> nn.Module:
        return self.model

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model.model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.language_model.lm_head

    # ------------------------------------------------------------------------------------------ visual tokens
    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        """Image tokens between each ``<|image_start|>`` and its ``<|image_end|>``, in prompt order (tiles and the
        global view of an image are one item)."""
        input_ids = model_kwargs.get("input_ids")
        if modality != "image" or input_ids is None:
            return None
        start, end = int(self.model.config.boi_token_index), int(self.model.config.eoi_token_index)
        counts: list[int] = []
        for row in input_ids.tolist():
            inside, count = False, 0
            for token in row:
                if token == start:
                    inside, count = True, 0
                elif token == end and inside:
                    counts.append(count)
                    inside = False
                elif inside and token == self.image_token_id:
                    count += 1
        return counts

    def image_layouts(self, input_ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """Per image in flat prompt order: ``(sample, rows, cols, tokens)``, the tile grid read from its span
        (``rows == 0``: one tile, no global view). A tiled image's tiles are runs of image tokens in raster order,
        then the global view's run; the token after a row's last tile is ``<|tile_y_separator|>`` (also the first
        token after the last tile), between tiles of a row ``<|tile_x_separator|>``."""
        start, end = int(self.model.config.boi_token_index), int(self.model.config.eoi_token_index)
        layouts = []
        for sample, row in enumerate(input_ids.tolist()):
            span: list[int] | None = None
            for token in row:
                if token == start:
                    span = []
                elif token == end and span is not None:
                    visual = [t == self.image_token_id for t in span]
                    runs = [i for i, v in enumerate(visual) if v and (i + 1 == len(span) or not visual[i + 1])]
                    count = sum(visual)
                    if len(runs) == 1:
                        layouts.append((sample, 0, 0, count))
                    else:
                        row_end = span[runs[-2] + 1]  # <|tile_y_separator|>
                        rows = sum(span[i + 1] == row_end for i in runs[:-1])
                        layouts.append((sample, rows, (len(runs) - 1) // rows, count))
                    span = None
                elif span is not None:
                    span.append(token)
        return layouts

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Per image: one tile (a square grid over the picture), or ``rows x cols`` tiles over the picture (view
        ``"tiles"``, each a square grid in raster order: the pixel shuffle keeps raster order) then the global view
        (``"global"``, the whole picture); the grid is read from the prompt (:meth:`image_layouts`)."""
        layouts = self.image_layouts(model_kwargs["input_ids"])
        placed = split_by_sample(self.visual_slots(model_kwargs), [count for *_, count in layouts])
        items = []
        for (sample, tokens), (_, rows, cols, count) in zip(placed, layouts, strict=True):
            views = rows * cols + 1 if rows else 1
            side = round((count // views) ** 0.5)
            grid = raster_boxes(side, side)
            if not rows:
                items.append(
                    TokenBoxes(sample, "image", tokens, grid, torch.zeros(count, dtype=torch.long), ("image",))
                )
                continue
            tiles = [
                in_region(grid, (t % cols / cols, t // cols / rows, (t % cols + 1) / cols, (t // cols + 1) / rows))
                for t in range(rows * cols)
            ]
            boxes = torch.cat([*tiles, grid])
            view = torch.cat(
                [torch.zeros(rows * cols * side * side, dtype=torch.long), torch.ones(side * side).long()]
            )
            items.append(TokenBoxes(sample, "image", tokens, boxes, view, ("tiles", "global")))
        return items

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        raise ValueError(
            "llama4: the visual tokens are pixel-shuffled tiles (each of 2 x 2 vision patches) whose grid the adapter "
            "does not place yet: methods that need a patch grid (pool) or vision-tower attention (visionzip, vscan, "
            "chain) cannot run on this family"
        )

    # -------------------------------------------------------------------------------------------- layer types
    def layer_type(self, index: int) -> str:
        return self.text_config.layer_types[index]

    @property
    def chunk_size(self) -> int:
        return int(self.text_config.attention_chunk_size)

    def window(self, layer_type: str) -> int | None:
        """The furthest a query of a ``layer_type`` layer reaches back (in slots): its chunk, for a chunked layer (PIO
        warns about, or refuses, visual tokens out of its loss positions' reach)."""
        return self.chunk_size if layer_type == CHUNKED else None

    def rotary_embeddings(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor, layer_type: str = "full_attention"
    ) -> tuple[torch.Tensor, ...]:
        table = self.language_model.rotary_emb(hidden_states, position_ids)  # complex (B, S, hd / 2)
        return table.real, table.imag

    def prefill_masks(
        self,
        valid: torch.Tensor,
        source: torch.Tensor,
        dtype: torch.dtype,
        key_length: int | None,
        model_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        if key_length is not None:  # unreachable: transformers_compat.static_cache_length refuses sliding layers
            raise ValueError("piofvlm does not support a static KV cache for llama4 models (chunked layers)")
        seq_len = valid.shape[1]
        masks = {}
        for kind in self.layer_types:
            if kind == CHUNKED:
                masks[kind] = transformers_compat.chunked_causal_mask(
                    self.text_config, valid, seq_len, dtype, self.chunk_size
                )
            else:
                masks[kind] = transformers_compat.causal_padding_mask(self.text_config, valid, seq_len, dtype)
        return masks

    def decode_mask_over(
        self, layer_type: str, all_keys: torch.Tensor, visible: int, query_length: int, dtype: torch.dtype
    ) -> Any:
        """A chunked layer's chunks are counted from each sample's first real slot: built over every slot the layer
        saw (``all_keys``), presented over the last ``visible``."""
        if layer_type != CHUNKED:
            return super().decode_mask_over(layer_type, all_keys, visible, query_length, dtype)
        return transformers_compat.chunked_causal_mask(
            self.text_config, all_keys, query_length, dtype, self.chunk_size, visible=visible
        )

    def allowed_keys(
        self,
        layer_type: str,
        valid: torch.Tensor,
        source: torch.Tensor,
        query_slots: torch.Tensor,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Causal over real keys; in chunked layers, within the query's chunk (counted from the first real slot)."""
        allowed = super().allowed_keys(layer_type, valid, source, query_slots, model_kwargs)  # (B, 1, n, S)
        if layer_type != CHUNKED:
            return allowed
        left = (valid.long().cumsum(-1) == 0).sum(-1)  # (B,)
        key_chunk = (torch.arange(valid.shape[1], device=valid.device)[None] - left[:, None]) // self.chunk_size
        query_chunk = (query_slots - left[:, None]) // self.chunk_size  # (B, n)
        return allowed & (key_chunk[:, None, None, :] == query_chunk[:, None, :, None])

    # ------------------------------------------------------------------------------------------------ hooks
    def attach(self, handle: PruningHandle) -> None:
        """Complex rotary tables as ``(real, imag)`` for the mechanism, complex again for the layers."""
        for layer in self.layers:
            handle.add_hook(layer.register_forward_pre_hook(guarded(_to_pair), with_kwargs=True, prepend=True))
            handle.add_hook(layer.register_forward_pre_hook(guarded(_to_complex), with_kwargs=True))

    # ------------------------------------------------------------------------------------ fast proxy support
    def rotary_fn(self):  # noqa: D102 - documented in the base class
        return None  # complex interleaved RoPE, L2 QK-norm, NoPE temperature: the reference proxy

    def decoder_layer_output(self, layer: nn.Module, hidden: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """``Llama4TextDecoderLayer``: pre-norm block with ``feed_forward`` (an MoE block returns a pair)."""
        residual = hidden + attn_output
        out = layer.feed_forward(layer.post_attention_layernorm(residual))
        out = out[0] if isinstance(out, tuple) else out
        return residual + out.view(residual.shape)

    # ---------------------------------------------------------------------------------------------- checks
    def check_method(self, method: Any) -> None:
        name = getattr(method, "name", type(method).__name__)
        if getattr(method, "reads_attention", False):
            raise ValueError(
                f"{name} is not supported on llama4 models: it recomputes a decoder layer's attention, and Llama 4's "
                "(complex interleaved RoPE, L2 QK-norm, NoPE temperature) is not modelled; use a method that reads "
                "the hidden states only (pio, random, divprune, cdpruner)"
            )

    def check_attention(self) -> None:
        super().check_attention()
        reason = transformers_compat.llama4_unsupported_reason()
        if reason is not None:
            raise ValueError(reason)
