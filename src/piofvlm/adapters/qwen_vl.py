"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, video, multimodal RoPE (M-RoPE) and Qwen3-VL deepstack.

What differs from LLaVA, as of transformers 5.x:

* Visual tokens are the image placeholders (``image_token_id``) *and* the video placeholders (``video_token_id``).
  Each image has ``t * h * w / merge**2`` of them from its ``image_grid_thw`` row; each video likewise from
  ``video_grid_thw`` (Qwen3-VL writes a video frame by frame with timestamps in between: still one video).
* The language model receives M-RoPE position ids ``(3, B, S)`` (temporal, height, width), or ``(4, B, S)`` with
  the text positions first when ``generate`` prepares them; the decoder layers receive only those text positions (or
  None). The rotary tables (cos, sin) are already combined per section: ``(B, S, head_dim)``, and the attention
  applies them Llama-style, so the fast PIO proxy uses the family's own ``apply_rotary_pos_emb`` unchanged.
* Kept tokens keep their original 3-D positions. Decoding positions come from the model's ``rope_deltas``,
  computed from the unpruned prompt, so they continue exactly where the unpruned model would.
  ``positions="renumber"`` is refused: a visual token's M-RoPE position is its grid coordinate, and the text after an
  image continues at ``start + max(h, w) / merge``, not at ``start + number of tokens``, so "compact the positions
  by the number of dropped tokens" has no meaning these models were trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.adapters.base import ModelAdapter, items_in_prompt_order, prompt_items
from piofvlm.adapters.boxes import TokenBoxes, frame_names, raster_boxes, split_by_sample
from piofvlm.adapters.registry import register_adapter
from piofvlm.core.guard import guarded
from piofvlm.core.threads import PerThread, new_state

if TYPE_CHECKING:
    from piofvlm.core.handle import PruningHandle


@register_adapter
class QwenVLAdapter(ModelAdapter):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``)."""

    model_types = ("qwen2_vl",)
    position_batch_dim = 1  # (3, B, S), or (4, B, S) with the text positions first
    rotary_batch_dim = 0  # cos, sin: (B, S, head_dim)
    supports_renumber = False

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    # ------------------------------------------------------------------------------------------ visual tokens
    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        """Tokens of each image and each video, in the order they appear in the batch (images and videos mixed).

        Computed from ``input_ids`` and the per-item sizes, so a video written frame by frame (Qwen3-VL) is one item.
        """
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None:
            return None
        sizes = {0: self._item_sizes(model_kwargs, "image"), 1: self._item_sizes(model_kwargs, "video")}
        return items_in_prompt_order(self.visual_modality(input_ids, model_kwargs), sizes)

    def _item_sizes(self, model_kwargs: dict[str, Any], modality: str) -> list[int]:
        """Tokens of each image (or video) of the call: from its grid, or from features ``generate`` pre-encoded."""
        grid = model_kwargs.get(f"{modality}_grid_thw")
        if grid is not None:
            return (grid.prod(-1) // self.merge_size**2).tolist()
        encoded = transformers_compat.encoded_features(model_kwargs, modality)
        if encoded is not None:  # generate() runs the vision tower first and passes per-item features instead
            return [int(features.shape[0]) for features in encoded]
        return []

    # ---------------------------------------------------------------------------------------------- positions
    def default_position_ids(self, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
        return torch.arange(seq_len, device=device).view(1, 1, -1).expand(3, 1, -1)

    def layer_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        # The text model hands its layers the text row of 4-row position ids, and nothing for plain M-RoPE ids.
        return position_ids[0] if position_ids.dim() == 3 and position_ids.shape[0] == 4 else None

    def rotary_fn(self):  # noqa: D102 - documented in the base class
        return transformers_compat.rotary_function("qwen2_vl")

    # ------------------------------------------------------------------------------------------ vision tower
    # The ViT packs every image (or video) of a call into one sequence of patches, laid out 2x2 merge unit by merge
    # unit, and attends within each frame (``cu_seqlens``; Qwen2.5-VL's window blocks within each window). The patch
    # merger turns each unit of ``merge_size**2`` patches into one LLM token, so scores are given per LLM token.
    @property
    def vision_tower(self) -> nn.Module:
        return self.multimodal_model.visual

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    @property
    def vision_feature_layer_index(self) -> int:
        return len(self.vision_layers) - 1  # the last block feeds the patch merger

    @property
    def vision_has_cls(self) -> bool:
        return False

    @property
    def vision_local_layer_index(self) -> int:
        """Shallow block for VScan's local scan: Qwen2.5-VL-7B's authors use block 7 of 32 (the first full-attention
        block); families without window attention get the same relative depth (``depth // 4 - 1``)."""
        return max(0, len(self.vision_layers) // 4 - 1)

    def _unit_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Original index of each merge unit in the blocks' order (Qwen2.5-VL permutes units into windows)."""
        return torch.arange(int((grid_thw.prod(-1) // self.merge_size**2).sum()), device=grid_thw.device)

    def _vision_qk(
        self, layer_index: int, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries and keys ``(H, L, hd)`` and head-mean keys before RoPE ``(L, hd)`` of ``(L, d)`` inputs."""
        block = self.vision_layers[layer_index]
        attn = block.attn
        q, k, _ = attn.qkv(block.norm1(hidden)).reshape(hidden.shape[0], 3, attn.num_heads, -1).unbind(1)
        raw_keys = k.mean(1)
        q, k = transformers_compat.qwen_vision_rotary_function()(q, k, *position_embeddings)
        return q.transpose(0, 1), k.transpose(0, 1), raw_keys

    def vision_attention(
        self,
        layer_index: int,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full softmax attention of block ``layer_index`` over each row of ``hidden_states`` ``(N, T, d)``.

        ``position_embeddings``: the block's 2-D rotary ``(cos, sin)`` for the ``T`` patches, ``(T, hd)``.
        Returns ``(N, H, T, T)`` fp32 probabilities and ``(N, T, hd)`` head-mean keys (before RoPE).
        """
        if position_embeddings is None:
            raise ValueError("the Qwen ViT's attention needs its 2-D rotary embeddings (position_embeddings)")
        probs, keys = [], []
        for hidden in hidden_states:
            q, k, raw = self._vision_qk(layer_index, hidden, position_embeddings)
            scaling = self.vision_layers[layer_index].attn.scaling
            probs.append((torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling).softmax(-1))
            keys.append(raw)
        return torch.stack(probs), torch.stack(keys)

    def _patch_scores(
        self, layer_index: int, vision: Any, modality: str, chunk: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention received by each patch (heads and queries averaged within its attention segment) and its
        head-mean key, in the blocks' patch order: ``(P,)`` and ``(P, hd)``."""
        hidden = vision.layer_input(layer_index, modality)  # (P, d)
        kwargs = vision.layer_call_kwargs(layer_index, modality)
        cu_seqlens = kwargs["cu_seqlens"].tolist()
        cos, sin = kwargs["position_embeddings"]
        scaling = self.vision_layers[layer_index].attn.scaling
        scores = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        keys = []
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
            q, k, raw = self._vision_qk(layer_index, hidden[start:end], (cos[start:end], sin[start:end]))
            keys.append(raw)
            for first in range(0, end - start, chunk):  # bounds memory to H * chunk * L
                logits = torch.matmul(q[:, first : first + chunk].float(), k.float().transpose(-1, -2)) * scaling
                scores[start:end] += logits.softmax(-1).mean(0).sum(0)
            scores[start:end] /= end - start
        return scores, torch.cat(keys)

    def vision_token_scores(self, layer_index: int, vision: Any, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image or video (images first, then videos, each in the model's order) and per LLM token: the mean
        over its ``merge_size**2`` patches of their attention received and of their keys (VisPruner's rule)."""
        if mode != "mean":
            raise ValueError("the Qwen vision encoder has no [CLS] token: use attention='mean'")
        rows_scores, rows_keys = [], []
        inputs = vision.image_kwargs
        for modality in ("image", "video"):
            grid = inputs.get(f"{modality}_grid_thw")
            if grid is None or (modality, layer_index % len(self.vision_layers)) not in vision.hidden:
                continue
            unit = self.merge_size**2
            scores, keys = self._patch_scores(layer_index, vision, modality)
            scores = scores.view(-1, unit).mean(1)
            keys = keys.view(-1, unit, keys.shape[-1]).mean(1)
            order = self._unit_order(grid.to(scores.device))  # units in the blocks' order -> original units
            scores = torch.empty_like(scores).index_copy_(0, order, scores)
            keys = torch.empty_like(keys).index_copy_(0, order, keys)
            sizes = (grid.prod(-1) // unit).tolist()
            rows_scores += list(scores.split(sizes))
            rows_keys += list(keys.split(sizes))
        width = max(len(row) for row in rows_scores)
        table = torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in rows_scores])
        key_table = torch.stack([torch.nn.functional.pad(row, (0, 0, 0, width - len(row))) for row in rows_keys])
        return table, key_table

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image or video in prompt order: ``crop`` = its row in :meth:`vision_token_scores` (images first),
        ``patch`` = its LLM token, ``grid`` = the frame (0 for images), ``row``/``col`` on the merged grid."""
        input_ids = model_kwargs["input_ids"]
        modality = self.visual_modality(input_ids, model_kwargs)
        if model_kwargs.get("attention_mask") is not None:
            modality = modality.masked_fill(~model_kwargs["attention_mask"].bool(), -1)
        grids = {}
        for value, name in ((0, "image"), (1, "video")):
            grid = model_kwargs.get(f"{name}_grid_thw")
            grids[value] = [] if grid is None or not bool((modality == value).any()) else grid.tolist()
        sizes = {value: [t * h * w // self.merge_size**2 for t, h, w in grid] for value, grid in grids.items()}
        items = prompt_items(modality, sizes)
        if items is None:
            raise RuntimeError("the image / video grids do not match the visual tokens of the prompt")
        sources = []
        for kind, index, count in items:
            t, h, w = grids[kind][index]
            width, per_frame = w // self.merge_size, h * w // self.merge_size**2
            token = torch.arange(count)
            row = len(grids[0]) * kind + index
            sources.append(
                {
                    "crop": torch.full_like(token, row),
                    "patch": token,
                    "grid": token // per_frame,
                    "row": token % per_frame // width,
                    "col": token % width,
                }
            )
        return sources

    # ------------------------------------------------------------------------------------------------ overlays
    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Dynamic resolution: an image's ``(h / merge) x (w / merge)`` merged grid (from ``image_grid_thw``; not
        square in general) in raster order over the whole picture (the processor resizes it, aspect kept, to a
        multiple of ``patch * merge``); a video one view per temporal patch (``temporal_patch_size`` source frames)
        with the same grid. Items in prompt order."""
        visual = self.visual_slots(model_kwargs)
        modality = self.visual_modality(model_kwargs["input_ids"], model_kwargs).cpu().masked_fill(~visual, -1)
        grids = {}
        for value, name in ((0, "image"), (1, "video")):
            grid = model_kwargs.get(f"{name}_grid_thw")
            grids[value] = [] if grid is None or not bool((modality == value).any()) else grid.tolist()
        merge = self.merge_size
        sizes = {value: [t * h * w // merge**2 for t, h, w in grid] for value, grid in grids.items()}
        order = prompt_items(modality, sizes)
        if order is None:
            raise ValueError(f"{self.model_type}: the image / video grids {grids} do not match the visual tokens")
        items = []
        for (sample, tokens), (kind, index, _) in zip(
            split_by_sample(visual, [count for _, _, count in order]), order, strict=True
        ):
            t, h, w = grids[kind][index]
            boxes = raster_boxes(h // merge, w // merge).repeat(t, 1)
            view = torch.arange(t).repeat_interleave(h * w // merge**2)
            views = ("image",) if kind == 0 else frame_names(t)
            items.append(TokenBoxes(sample, ("image", "video")[kind], tokens, boxes, view, views))
        return items

    # ---------------------------------------------------------------------------------------------- checks
    def check_attention(self) -> None:
        super().check_attention()
        if "sliding_attention" in (getattr(self.text_config, "layer_types", None) or ()):
            raise ValueError(
                "this model uses sliding-window attention layers; after tokens are dropped the mechanism rebuilds "
                "full causal masks only. Load it with use_sliding_window=False."
            )


@register_adapter
class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): the same language-model side as Qwen2-VL."""

    model_types = ("qwen2_5_vl",)

    @property
    def vision_local_layer_index(self) -> int:
        """The first full-attention block, as PIO-FVLM's authors (spec A.9): 7 for Qwen2.5-VL-7B."""
        return int(self.model.config.vision_config.fullatt_block_indexes[0])

    def _unit_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        window_index = transformers_compat.vision_window_index(grid_thw, self.model.config.vision_config)
        return window_index.to(grid_thw.device)


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL (``Qwen3VLForConditionalGeneration``): interleaved M-RoPE, per-head q/k norms and deepstack.

    Deepstack: the vision tower's intermediate features are added to the visual tokens' hidden states after each of
    the first ``len(vision_config.deepstack_visual_indexes)`` decoder layers. The language model indexes them by the
    *unpruned* sequence, so while pruning the adapter takes them out of the language model's call and adds them
    itself, after the same layers, to the visual tokens still present (each to the token it belongs to). Prune
    points before or between deepstack layers therefore work; dropped tokens' features are dropped with them.
    """

    model_types = ("qwen3_vl",)

    def rotary_fn(self):  # noqa: D102 - documented in the base class
        return transformers_compat.rotary_function("qwen3_vl")

    @property
    def num_deepstack_layers(self) -> int:
        return len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or ())

    def attach(self, handle: PruningHandle) -> None:
        """Re-route deepstack injection through hooks that follow the pruned sequence (see the class docstring)."""
        if not self.num_deepstack_layers or min(handle.method.layers) >= self.num_deepstack_layers:
            return  # every deepstack layer runs on the unpruned sequence: the model's own injection is exact
        state = _DeepstackState(handle)
        handle.add_hook(self.language_model.register_forward_pre_hook(guarded(state.take), with_kwargs=True))
        handle.add_hook(self.language_model.register_forward_hook(guarded(state.release)))
        for index in range(min(self.num_deepstack_layers, self.num_layers)):
            handle.add_hook(self.layers[index].register_forward_hook(guarded(state.injector(index))))


class _DeepstackState:
    """The deepstack features of the current prefill, injected after their layers into the current layout."""

    # The calling thread's prefill (core/threads.py).
    features: PerThread[list[torch.Tensor] | None] = PerThread(lambda: None)
    row_of_slot: PerThread[torch.Tensor | None] = PerThread(lambda: None)  # (B, S_prompt) row of each visual slot

    def __init__(self, handle: PruningHandle) -> None:
        self._per_thread = new_state()
        self.handle = handle

    def take(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        features = kwargs.get("deepstack_visual_embeds")
        if features is None:
            return None
        mask = kwargs["visual_pos_masks"]  # (B, S) bool, rows of the features in flat (sample-major) order
        self.row_of_slot = (mask.flatten().long().cumsum(0) - 1).view_as(mask)
        self.features = list(features)
        kwargs = dict(kwargs)
        kwargs["deepstack_visual_embeds"] = None
        kwargs["visual_pos_masks"] = None
        return args, kwargs

    def release(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.features = None
        self.row_of_slot = None

    def injector(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            slots = self.handle.prefill_slots()
            if self.features is None or slots is None:
                return None  # decoding, or a method's proxy forward of this layer: nothing is injected
            source, visual = slots
            hidden = output[0] if isinstance(output, tuple) else output
            rows = self.row_of_slot.to(source.device).gather(1, source.clamp(min=0))  # (B, S_cur)
            features = self.features[index].to(hidden.device, hidden.dtype)
            hidden = hidden.clone()
            hidden[visual] = hidden[visual] + features[rows[visual]]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook
