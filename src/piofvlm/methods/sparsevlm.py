"""SparseVLM: "Visual Token Sparsification for Efficient Vision-Language Model Inference" (Zhang et al., ICML 2025,
arXiv 2410.04417), v1 core.

Idea: let the text tokens that attend to the image most ("raters") vote on the visual tokens by their attention,
drop the least-voted ones, and recycle the best of the dropped tokens into a few merged tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from piofvlm.core.context import Selection, StageContext
from piofvlm.methods._vision import merge_into, top
from piofvlm.methods.base import TokenPruner
from piofvlm.methods.shared.attention import layer_attention
from piofvlm.registry import register_method


@register_method
@dataclass
class SparseVLM(TokenPruner):
    """SparseVLM (v1 core). Budget: visual tokens per image, **recycled tokens included**, met exactly.

    At prune point K, with the attention of layer K computed explicitly from its queries and keys (heads averaged):

    1. Raters: the sample's text tokens whose mean attention to its visual tokens is at least the mean over its
       text tokens.
    2. Score of a visual token: its attention from the raters, averaged over raters.
    3. Per image with budget ``k``: ``c = round(recycle * k)`` recycled tokens (0 when nothing is dropped) and the top
       ``k - c`` scores are kept. Of the dropped tokens, the best-scored ``recycle_pool`` share (at least ``c``) is
       recycled: its ``c`` best tokens become centres, every other recycled token joins its most cosine-similar
       centre (hidden states), and each centre becomes the mean of its cluster, in the centre's slot and position.

    Deviations from v1: the number dropped per stage is the budget, not the rank of the attention matrix; centres are
    the best-scored recycled tokens rather than density-peak cluster centres; recycled tokens count towards the budget.
    """

    name: ClassVar[str] = "sparsevlm"

    layers: list[int] = field(default_factory=lambda: [2])
    recycle: float = 0.1
    recycle_pool: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("recycle", "recycle_pool"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")

    def attention_layers(self) -> list[int]:
        return list(self.layers)

    def rater_scores(self, ctx: StageContext) -> torch.Tensor:
        """``(B, S)`` mean attention of each slot from the raters (only visual slots are meaningful)."""
        visual = ctx.groups >= 0
        text = ctx.valid & ~visual
        no_text = (text.sum(1) == 0).nonzero()[:, 0].tolist()
        if no_text:
            raise ValueError(
                f"sparsevlm rates visual tokens by the attention they receive from the prompt's text tokens, and "
                f"sample(s) {no_text} have none (a prompt of image tokens only); add the question to the prompt, or "
                "use a method that needs no text (e.g. pio, fastv, divprune)"
            )
        num_text = int(text.sum(1).max())
        # Text slots per sample, padded with the last slot (masked below).
        order = torch.sort((~text).long(), dim=1, stable=True).indices[:, :num_text]  # (B, T) text slots first
        row_ok = text.gather(1, order)  # (B, T)
        allowed = ctx.allowed_keys(ctx.layer, order)
        probs = layer_attention(
            ctx.adapter, ctx.layer, ctx.hidden_states, ctx.position_embeddings, ctx.valid, order, allowed
        )
        probs = torch.nan_to_num(probs.mean(1))  # (B, T, S)
        to_visual = (probs * visual[:, None, :]).sum(-1) / visual.sum(1, keepdim=True).clamp(min=1)  # (B, T)
        mean = (to_visual * row_ok).sum(1, keepdim=True) / row_ok.sum(1, keepdim=True).clamp(min=1)
        raters = row_ok & (to_visual >= mean)
        return (probs * raters[..., None]).sum(1) / raters.sum(1, keepdim=True).clamp(min=1)  # (B, S)

    def select(self, ctx: StageContext) -> Selection:
        scores = self.rater_scores(ctx)
        keep = torch.zeros_like(ctx.groups, dtype=torch.bool)
        hidden = ctx.hidden_states.clone()
        for b, budget, slots in ctx.budget_groups():
            recycled = min(round(self.recycle * budget), budget - 1) if budget < len(slots) else 0
            order = top(scores[b, slots], len(slots))
            keep[b, slots[order[: budget - recycled]]] = True
            if recycled == 0:
                continue
            dropped = order[budget - recycled :]
            pool = dropped[: max(recycled, math.ceil(self.recycle_pool * len(dropped)))]
            feats = ctx.hidden_states[b, slots[pool]]
            centres = torch.arange(recycled, device=pool.device)
            members = torch.arange(recycled, len(pool), device=pool.device)
            keep[b, slots[pool[:recycled]]] = True
            hidden[b, slots[pool[:recycled]]] = merge_into(feats, members, centres, feats).to(hidden.dtype)
        return Selection(keep=keep, scores=scores, hidden_states=hidden)
