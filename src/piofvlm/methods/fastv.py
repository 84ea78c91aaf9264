"""FastV: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024, arXiv 2403.06764).

Idea: after K layers, drop the visual tokens that receive the least attention; later layers never see them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from piofvlm.core.context import StageContext
from piofvlm.core.handle import PruningHandle
from piofvlm.methods.base import TokenPruner
from piofvlm.methods.shared.attention import attention_received
from piofvlm.methods.shared.capture import LayerInputs
from piofvlm.registry import register_method

QUERIES = ("last", "mean")
ATTENTION_LAYERS = ("previous", "next")


@register_method
@dataclass
class FastV(TokenPruner):
    """FastV. Budget: visual tokens kept per image at each stage (see :class:`TokenPruner`).

    Score: attention a visual token receives, averaged over heads, in one decoder layer. The attention is computed
    explicitly from that layer's queries and keys (with its RoPE), so it is the same under eager, SDPA and
    FlashAttention and the model never switches to eager.

    Attributes:
        query: ``"last"``: from the last prompt token (FastV's KV-cache implementation); ``"mean"``: averaged over
            every query row (the paper's description).
        attention_layer: ``"previous"``: the attention of layer K-1, i.e. the layer that just ran (FastV, which reads
            layer K-1's attention map); ``"next"``: the attention layer K would compute.
    """

    name: ClassVar[str] = "fastv"

    layers: list[int] = field(default_factory=lambda: [2])
    query: str = "last"
    attention_layer: str = "previous"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {self.query!r}")
        if self.attention_layer not in ATTENTION_LAYERS:
            raise ValueError(f"attention_layer must be one of {ATTENTION_LAYERS}, got {self.attention_layer!r}")
        if self.attention_layer == "previous" and self.layers[0] == 0:
            raise ValueError("attention_layer='previous' needs every prune point >= 1 (no layer has run at layer 0)")

    def attention_layers(self) -> list[int]:
        return [layer - 1 if self.attention_layer == "previous" else layer for layer in self.layers]

    def attach(self, handle: PruningHandle) -> None:
        if self.attention_layer == "previous":
            self._inputs = LayerInputs(handle, [layer - 1 for layer in self.layers])

    def score(self, ctx: StageContext) -> torch.Tensor:
        if self.attention_layer == "previous":
            index, hidden = ctx.layer - 1, self._inputs.get(ctx.layer - 1, ctx)
        else:
            index, hidden = ctx.layer, ctx.hidden_states
        return attention_received(
            ctx.adapter,
            index,
            hidden,
            ctx.layer_rotary(index),
            ctx.valid,
            self.query,
            key_mask=lambda slots: ctx.allowed_keys(index, slots),
        )
