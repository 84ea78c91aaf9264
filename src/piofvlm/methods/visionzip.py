"""VisionZip: "Longer is Better but Not Necessary in Vision Language Models" (Yang et al., CVPR 2025,
arXiv 2412.04467).

Idea: before the LLM, keep the *dominant* visual tokens (those the vision encoder's [CLS] attends to most) and merge
the rest into a few *contextual* tokens by key similarity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from piofvlm.core.context import Selection, StageContext
from piofvlm.core.handle import PruningHandle
from piofvlm.methods._vision import ATTENTION_MODES, check_encoder_side, merge_into, slot_scores, top
from piofvlm.methods.base import TokenPruner
from piofvlm.methods.shared.capture import VisionInputs
from piofvlm.registry import register_method


@register_method
@dataclass
class VisionZip(TokenPruner):
    """VisionZip. Budget: visual tokens per image = dominant + contextual, met exactly.

    Per image (for LLaVA-NeXT: over the whole image, i.e. the base view and every high-resolution crop together):

    1. Scores and keys come from the vision block whose output feeds the projector (the penultimate one for LLaVA),
       recomputed explicitly from that block's queries and keys (no eager attention anywhere): [CLS] attention
       averaged over heads, or the mean attention received for encoders without [CLS] (``attention``).
    2. ``c = round(contextual * budget)`` (at most budget - 1) contextual tokens, ``budget - c`` dominant tokens:
       the top scores.
    3. The other tokens with a vision patch, in sequence order, give ``c`` evenly spaced targets (VisionZip's
       ``step = n // c``); every other one is assigned to its most key-similar target and each target becomes
       ``(target + its tokens) / (1 + count)``. Targets keep their slot (and so their position).

    Deviations: the merge averages the projected features the LLM receives (VisionZip averages the vision features
    before the projector, whose MLP is not linear); with LLaVA's "default" feature strategy the [CLS] token is not a
    visual token, so dominant tokens do not include it; LLaVA-NeXT's ``image_newline`` tokens have no patch, rank
    last and are dropped (not merged) unless the budget reaches them.

    Attributes:
        contextual: share of each image's budget given to contextual (merged) tokens; VisionZip's 54 + 10 is 10/64.
        attention: ``"auto"``, ``"cls"`` or ``"mean"`` (see above).
    """

    name: ClassVar[str] = "visionzip"

    layers: list[int] = field(default_factory=lambda: [0])
    contextual: float = 10 / 64
    attention: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.contextual, bool) or not isinstance(self.contextual, (int, float)):
            raise ValueError(f"contextual is a share of the budget in [0, 1), got {self.contextual!r}")
        if not 0.0 <= self.contextual < 1.0:
            raise ValueError(f"contextual is a share of the budget in [0, 1), got {self.contextual!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        check_encoder_side(self, adapter, self.attention)

    def attach(self, handle: PruningHandle) -> None:
        self._layer = handle.adapter.vision_feature_layer_index
        self._vision = VisionInputs(handle, [self._layer])

    def select(self, ctx: StageContext) -> Selection:
        vmap = self._vision.visual_map(ctx)
        scores, keys = slot_scores(ctx, self._vision, vmap, self._layer, self.attention)
        keep = torch.zeros_like(ctx.groups, dtype=torch.bool)
        hidden = ctx.hidden_states.clone()
        for b, budget, slots in ctx.budget_groups():
            group_scores = scores[b, slots]
            with_patch = torch.isfinite(group_scores)
            contextual = min(round(self.contextual * budget), budget - 1)
            if budget > int(with_patch.sum()):  # every patch token is kept: nothing left to merge
                contextual = 0
            dominant = top(group_scores, budget - contextual)
            rest = torch.ones_like(with_patch)
            rest[dominant] = False
            rest = (rest & with_patch).nonzero()[:, 0]  # sequence order
            keep[b, slots[dominant]] = True
            if contextual == 0:
                continue
            step = max(1, len(rest) // contextual)
            is_target = torch.zeros(len(rest), dtype=torch.bool, device=rest.device)
            is_target[torch.arange(0, len(rest), step, device=rest.device)[:contextual]] = True
            targets, sources = slots[rest[is_target]], slots[rest[~is_target]]
            index = torch.cat([targets, sources])
            merged = merge_into(
                ctx.hidden_states[b, index],
                torch.arange(len(targets), len(index), device=index.device),
                torch.arange(len(targets), device=index.device),
                keys[b, index],
            )
            keep[b, targets] = True
            hidden[b, targets] = merged.to(hidden.dtype)
        return Selection(keep=keep, scores=scores, hidden_states=hidden)
