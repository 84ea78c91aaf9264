"""PyramidDrop: "Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction"
(Xing et al., CVPR 2025, arXiv 2410.17247).

Idea: split the LLM into stages; at the end of each stage keep the visual tokens the last instruction token attends
to most, so the visual sequence shrinks like a pyramid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from piofvlm.budget import Keep
from piofvlm.core.context import StageContext
from piofvlm.methods.base import TokenPruner
from piofvlm.methods.shared.attention import attention_received
from piofvlm.registry import register_method


@register_method
@dataclass
class PDrop(TokenPruner):
    """PyramidDrop. Budget: per stage, visual tokens kept per image as a ratio of the *original* count (so the
    paper's lambda = 0.5 at layers 8/16/24 is ``keep=[0.5, 0.25, 0.125]``), or counts.

    Score at a stage boundary K: attention of the last prompt token (the last instruction token) to each visual
    token, averaged over heads, computed with the query/key projections and RoPE of layer K (the first layer of the
    next stage) from the hidden states entering it.
    """

    name: ClassVar[str] = "pdrop"

    layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    keep: list[Keep] | Keep = field(default_factory=lambda: [0.5, 0.25, 0.125])

    def attention_layers(self) -> list[int]:
        return list(self.layers)

    def score(self, ctx: StageContext) -> torch.Tensor:
        return attention_received(
            ctx.adapter,
            ctx.layer,
            ctx.hidden_states,
            ctx.position_embeddings,
            ctx.valid,
            query="last",
            key_mask=lambda slots: ctx.allowed_keys(ctx.layer, slots),
        )
