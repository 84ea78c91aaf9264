"""DivPrune: "Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al., CVPR 2025,
arXiv 2503.02175).

Idea: keep the subset of visual tokens that maximises the minimum pairwise cosine distance (a greedy max-min
diversity problem), using the visual features the LLM receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from piofvlm.core.context import Selection, StageContext
from piofvlm.methods.base import TokenPruner
from piofvlm.methods.shared.selection import group_rows, rows_to_mask
from piofvlm.registry import register_method


def max_min_diversity(features: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """DivPrune's greedy selection, batched over rows.

    First pick: the token whose nearest other token is farthest. Then repeatedly the token whose distance to the
    selected set (its minimum cosine distance to a selected token) is largest. Ties go to the lower index.

    Args:
        features: ``(P, N, d)``; valid: ``(P, N)`` bool; budgets: ``(P,)`` tokens to pick per row.

    Returns:
        ``(P, N)`` bool picked tokens.
    """
    feats = F.normalize(features.float(), dim=-1)
    distance = 1.0 - feats @ feats.transpose(1, 2)  # (P, N, N)
    pair_ok = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    nearest = distance.masked_fill(~pair_ok | eye, float("inf")).min(-1).values  # (P, N)
    nearest = torch.where(torch.isinf(nearest), 0.0, nearest)  # a row with a single token
    picked = torch.zeros_like(valid)
    min_dist = nearest.masked_fill(~valid, float("-inf"))  # first-round criterion
    rows = torch.arange(valid.shape[0], device=valid.device)
    for step in range(int(budgets.max().item()) if budgets.numel() else 0):
        active = budgets > step
        choice = min_dist.masked_fill(picked, float("-inf")).argmax(-1)  # first maximum
        picked[rows[active], choice[active]] = True
        to_choice = distance[rows, choice]  # (P, N)
        base = torch.where(picked.sum(-1, keepdim=True) == 1, torch.full_like(to_choice, float("inf")), min_dist)
        min_dist = torch.minimum(base, to_choice).masked_fill(~valid, float("-inf"))
    return picked


@register_method
@dataclass
class DivPrune(TokenPruner):
    """DivPrune. Budget: visual tokens kept per image (see :class:`TokenPruner`).

    Features: the hidden states at the prune point; at the default ``layers=[0]`` these are the post-projector visual
    embeddings, exactly DivPrune's input, and the LLM never sees the dropped tokens.
    """

    name: ClassVar[str] = "divprune"

    layers: list[int] = field(default_factory=lambda: [0])

    def select(self, ctx: StageContext) -> Selection:
        table, valid, sample = group_rows(ctx.groups, ctx.budgets.shape[1])
        features = ctx.hidden_states[sample, table.clamp(min=0)]  # (P, N, d)
        picked = max_min_diversity(features, valid, ctx.budgets.reshape(-1))
        return Selection(keep=rows_to_mask(table, picked, sample, ctx.groups.shape))
