"""Random pruning: the sanity baseline that benchmark papers found hard to beat (UniPruneBench, arXiv 2511.02650)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from piofvlm.core.context import StageContext
from piofvlm.methods.base import TokenPruner
from piofvlm.registry import register_method


@register_method
@dataclass
class RandomPrune(TokenPruner):
    """Keep a uniformly random subset of each group's visual tokens. Budget: as :class:`TokenPruner`.

    The draw depends on ``seed``, the stage and the sample's own tokens only, so a sample gets the same tokens
    alone or in any batch.
    """

    name: ClassVar[str] = "random"

    seed: int = 0

    def score(self, ctx: StageContext) -> torch.Tensor:
        # One draw per original visual token (not per slot), so padding and earlier stages do not shift the draw.
        num_visual = int(ctx.visual_index.max().item()) + 1
        rows = []
        for key in ctx.sample_keys.tolist():
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + ctx.stage * 7919 + key) % 2**63)
            rows.append(torch.rand(num_visual, generator=generator))
        table = torch.stack(rows).to(ctx.groups.device)  # (B, N_vis)
        return table.gather(1, ctx.visual_index.clamp(min=0))  # (B, S); only visual slots are read
