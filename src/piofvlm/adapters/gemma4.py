"""Gemma 4 (``Gemma4ForConditionalGeneration``, ``model_type`` ``gemma4``).

``Gemma4Processor`` writes an image as ``<|image>`` + ``<|image|>`` x its soft-token count + ``<image|>``: the
image processor resizes each picture keeping its aspect ratio, so images have different token counts (one per
``pooling_kernel_size**2`` patches of ``image_position_ids``), and ``mm_token_type_ids`` is 1 on their tokens.
The facts shared with Gemma 3 (:class:`~piofvlm.adapters.gemma3.Gemma3Adapter`: local / global layer types with
masks and rotary tables of their own, sliding windows counted in kept slots, sandwich norms) carry over; what
differs:

* **Per-layer inputs.** ``Gemma4TextModel`` hands decoder layer ``i`` ``per_layer_inputs[:, :, i]`` ``(B, S, d_ple)``
  (positional argument 1), one row per prompt token: after a prune point the mechanism gathers it with the kept
  tokens (:attr:`per_token_layer_input`).
* **KV-shared layers.** The last ``num_kv_shared_layers`` layers compute no keys: they attend with the keys and
  values the last earlier layer of their type stored during the same forward (its whole cache while decoding).
  Prune points after that storing layer are refused (:meth:`check_method`: pruned queries against unpruned keys);
  decode masks of a shared layer are sized from the storing layer's cache (:meth:`kv_layer`).
* **Sliced prefill.** ``generate()``'s prefill runs the shared layers on the last ``logits_to_keep`` tokens only;
  the mechanism slices its rebuilt masks, rotary tables and positions the same way (the kept sequence's last slots
  must then be the prompt's last tokens, which they are: an image is closed by ``<image|>``).
* **Vision blocks in local layers only.** With ``use_bidirectional_attention == "vision"`` the tokens of one image
  attend to each other in both directions in sliding layers (still cut by the window); global layers stay causal.
* **PIO** takes the reference proxy (the proxy layer's own forward, with its gathered per-layer input): the fast
  proxy's recomputation does not know Gemma 4's value norms, unit scaling and per-layer inputs.
* Not supported (refused with an error): ``use_bidirectional_attention == "all"``; audio and video inputs; the
  methods that recompute a decoder layer's attention (``fastv``, ``pdrop``, ``sparsevlm``, ``dart``), PIO with
  ``proxy_layer="previous"``; the encoder-side ones (no vision-attention map here). ``pool`` pools each image's
  grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from piofvlm import transformers_compat
from piofvlm.adapters.base import check_supported_attention
from piofvlm.adapters.boxes import TokenBoxes, raster_boxes, split_by_sample
from piofvlm.adapters.gemma3 import SLIDING, Gemma3Adapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class Gemma4Adapter(Gemma3Adapter):
    """Gemma 4: Gemma 3's layer types plus per-layer inputs, KV-shared layers and vision blocks in local layers."""

    model_types = ("gemma4",)
    per_token_layer_input: ClassVar[tuple[int, str] | None] = (1, "per_layer_input")

    # ------------------------------------------------------------------------------------------ visual tokens
    def _grids(self, model_kwargs: dict[str, Any]) -> list[tuple[int, int]] | None:
        """``(rows, cols)`` of each image's pooled token grid, from ``image_position_ids`` ``(N, P, 2)`` (x, y per
        patch, -1 for padding); None without them."""
        positions = model_kwargs.get("image_position_ids")
        if not isinstance(positions, torch.Tensor):
            return None
        kernel = int(self.model.config.vision_config.pooling_kernel_size)
        grids = []
        for item in positions:
            real = item[(item >= 0).all(-1)]
            cols, rows = (int(v) + 1 for v in real.max(0).values)
            grids.append((rows // kernel, cols // kernel))
        return grids

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        """Each image's soft tokens: its real patches over ``pooling_kernel_size**2``, as the vision tower pools."""
        if modality != "image":
            return None
        grids = self._grids(model_kwargs)
        return None if grids is None else [rows * cols for rows, cols in grids]

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """One view per image: its pooled grid in raster order over the whole (aspect-preserving resized) picture
        (``Gemma4VisionPooler`` numbers a token ``x // k + (cols) * (y // k)``)."""
        grids = self._grids(model_kwargs)
        if grids is None:
            raise ValueError("gemma4: image_position_ids are needed to lay out the images' tokens")
        items = split_by_sample(self.visual_slots(model_kwargs), [rows * cols for rows, cols in grids])
        return [
            TokenBoxes(
                sample, "image", item, raster_boxes(rows, cols), torch.zeros(rows * cols, dtype=torch.long), ("image",)
            )
            for (sample, item), (rows, cols) in zip(items, grids, strict=True)
        ]

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image in prompt order: its pooled grid (``row``, ``col``), ``crop`` the image's index."""
        sources = []
        for i, (rows, cols) in enumerate(self._grids(model_kwargs) or []):
            token = torch.arange(rows * cols)
            sources.append(
                {"crop": torch.full_like(token, i), "patch": token, "grid": torch.zeros_like(token)}
                | {"row": token // cols, "col": token % cols}
            )
        return sources

    # -------------------------------------------------------------------------------------------- layer types
    def kv_layer(self, index: int) -> int:
        """A KV-shared layer reads the last layer of its type before the shared block."""
        config = self.text_config
        first_shared = config.num_hidden_layers - config.num_kv_shared_layers
        if index < first_shared:
            return index
        kind = config.layer_types[index]
        return max(i for i in range(first_shared) if config.layer_types[i] == kind)

    def last_prune_point(self) -> int:
        """The last decoder layer a prune point may be at: the first layer whose keys a KV-shared layer reads
        (after it, a shared layer's pruned queries would meet unpruned keys)."""
        config = self.text_config
        first_shared = config.num_hidden_layers - config.num_kv_shared_layers
        read = {self.kv_layer(i) for i in range(first_shared, config.num_hidden_layers)}
        return min(read, default=config.num_hidden_layers - 1)

    def prompt_block_ids(self, model_kwargs: dict[str, Any]) -> tuple[str, torch.Tensor] | None:
        """Vision blocks from ``mm_token_type_ids``; None when the model builds none (no ``mm_token_type_ids``, or
        ``use_bidirectional_attention`` is not ``"vision"``)."""
        types = model_kwargs.get("mm_token_type_ids")
        if types is None or getattr(self.text_config, "use_bidirectional_attention", None) != "vision":
            return None
        return "mm_token_type_ids", transformers_compat.vision_block_ids(types)

    def has_blocks(self, layer_type: str) -> bool:
        """Gemma 4: only local layers are bidirectional over an image; global layers stay causal."""
        return layer_type == SLIDING

    # ------------------------------------------------------------------------------------ fast proxy support
    def rotary_fn(self):  # noqa: D102 - documented in the base class
        # Gemma 4 rotates one tensor at a time, with value norms and unit scaling: PIO takes the reference proxy
        # (the layer's own forward), the attention-recomputing methods are refused (check_method).
        return None

    def proxy_layer_kwargs(self) -> dict[str, Any]:
        """The layers storing their keys for the KV-shared ones write them to ``shared_kv_states``."""
        return {"shared_kv_states": {}}

    # ---------------------------------------------------------------------------------------------- checks
    def check_method(self, method: Any) -> None:
        name = getattr(method, "name", type(method).__name__)
        if getattr(method, "reads_attention", False):
            raise ValueError(
                f"{name} is not supported on gemma4 models: it recomputes a decoder layer's attention, and Gemma 4's "
                "(value norms, unit scaling, per-layer inputs, KV-shared layers) is not modelled yet; use a method "
                "that reads the hidden states only (random, divprune, cdpruner, pool)"
            )
        if getattr(method, "runs_previous_layer", False):
            raise ValueError(
                f"{name} running a decoder layer before its prune point (pio: proxy_layer='previous') is not "
                "supported on gemma4 models (the previous layer's per-layer inputs are gone at the prune point); use "
                "proxy_layer='next'"
            )
        last = self.last_prune_point()
        late = [layer for layer in getattr(method, "layers", ()) if layer > last]
        if late:
            raise ValueError(
                f"{name} prune point(s) {late} on a gemma4 model: layers after {last} include KV-shared layers that "
                f"attend with the keys layer(s) up to {last} stored, so queries after a later prune point would meet "
                f"unpruned keys. Choose prune points <= {last}"
            )

    def check_attention(self) -> None:
        # not Gemma 3's check, which reads use_bidirectional_attention as a flag
        check_supported_attention(self.attn_implementation)
        reason = transformers_compat.gemma4_unsupported_reason()
        if reason is not None:
            raise ValueError(reason)
        if getattr(self.text_config, "use_bidirectional_attention", None) == "all":
            raise ValueError(
                "gemma4 models with use_bidirectional_attention='all' (fully bidirectional text) are not supported: "
                "the mechanism rebuilds causal masks with image blocks and sliding windows"
            )
