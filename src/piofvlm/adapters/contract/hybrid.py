"""Hybrid decoder stacks: layers without a KV cache (linear attention) and layers reading another layer's cache."""

from __future__ import annotations

from typing import Any

import torch


class HybridStack:
    """Defaults describe an all-attention stack, every layer with its own KV cache."""

    # ------------------------------------------------------------------------------------ hybrid layer stacks
    # Families whose decoder stack mixes attention layers with layers that keep a fixed-size state instead of a KV
    # cache (Qwen3.5's Gated DeltaNet linear attention) override these; the defaults describe an all-attention stack.
    def is_attention_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` attends over a KV cache through a causal mask (its attention map exists).

        False for a linear-attention (recurrent) layer: its layer type gets a 2-D padding mask (:meth:`prefill_masks`),
        decoding leaves its mask alone, and attention-reading methods refuse it (:meth:`check_attention_map`)."""
        return True

    def token_mixer(self, index: int, normed: torch.Tensor, mask: Any) -> torch.Tensor:
        """Output ``(B, S, d)`` of the token mixer of a non-attention layer ``index`` (before the residual add) on its
        normed input ``normed`` ``(B, S, d)`` with the mask its layer type gets, without a cache: the fast proxy's head
        of such a layer."""
        raise ValueError(f"{type(self).__name__} has no token mixer other than attention (layer {index})")

    def check_attention_map(self, index: int, method: str) -> None:
        """Raise a ``ValueError`` naming ``method`` if it cannot read the attention (queries, keys) of layer
        ``index``."""
        if not self.is_attention_layer(index):
            attention = [i for i in range(self.num_layers) if self.is_attention_layer(i)]
            raise ValueError(
                f"{method} reads the attention map (queries and keys) of decoder layer {index}, which in "
                f"{self.model_type} models is a linear-attention layer without one; the full-attention layers are "
                f"{attention}. Choose prune points whose attention layer is one of them, or a method that needs no "
                "attention map (pio, random, divprune, cdpruner, pool)"
            )

    def kv_layer(self, index: int) -> int:
        """The decoder layer whose KV cache layer ``index`` attends to: itself, or for a KV-shared layer (Gemma 4's
        last ``num_kv_shared_layers``) the earlier layer whose keys and values it reads (decode masks are sized from
        that layer's cache)."""
        return index
