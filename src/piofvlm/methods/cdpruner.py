"""CDPruner: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
(Zhang et al., NeurIPS 2025, arXiv 2506.10967).

Idea: pick the visual tokens that maximise a determinantal point process whose kernel combines their similarity
with their relevance to the instruction, so the kept set is both diverse and relevant.
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

#: Relative size (to a row's largest kernel diagonal) under which a marginal gain is treated as zero.
EXHAUSTED = 1e-5


def conditional_dpp_map(kernel: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Greedy MAP inference of a DPP (Chen et al., NeurIPS 2018, incremental Cholesky), batched over rows.

    Args:
        kernel: ``(P, N, N)`` positive semi-definite kernel; valid: ``(P, N)`` bool; budgets: ``(P,)``.

    Returns:
        ``(P, N)`` bool picked items (each step picks the largest marginal gain; ties to the lower index).
    """
    rows, num = valid.shape
    kernel = kernel.double()
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone().masked_fill(~valid, float("-inf"))  # (P, N)
    # Gains below this are rounding noise of an exhausted kernel (its rank is at most the feature size): they count
    # as zero, so the remaining picks follow the index instead of noise that differs between batch and single runs.
    noise = EXHAUSTED * gains.clamp(min=0).amax(-1, keepdim=True)  # (P, 1)
    basis = torch.zeros(rows, int(budgets.max().item()) if budgets.numel() else 0, num, dtype=torch.float64)
    basis = basis.to(kernel.device)
    picked = torch.zeros_like(valid)
    index = torch.arange(rows, device=valid.device)
    for step in range(basis.shape[1]):
        active = budgets > step
        choice = gains.argmax(-1)  # (P,)
        picked[index[active], choice[active]] = True
        chosen_basis = basis[index, :step, choice]  # (P, step)
        update = kernel[index, choice] - torch.einsum("ps,psn->pn", chosen_basis, basis[:, :step])
        denom = gains[index, choice][:, None]
        # A pick with no gain left (the kernel is exhausted) adds no direction; later picks follow the index.
        update = torch.where(denom > 1e-12, update / denom.clamp(min=1e-12).sqrt(), 0.0)
        basis[:, step] = update
        gains = torch.nan_to_num(gains - update**2, nan=-1e300, neginf=-1e300)
        gains = torch.where(gains < noise, 0.0, gains).masked_fill(picked | ~valid, float("-inf"))
    return picked


@register_method
@dataclass
class CDPruner(TokenPruner):
    """CDPruner. Budget: visual tokens kept per image (see :class:`TokenPruner`).

    Per image: relevance ``r_i`` = the mean cosine similarity of visual token ``i`` with the instruction's tokens,
    negated as in the authors' code (``negate``), min-max normalised over the image; similarity ``S`` = cosine of the
    visual features; kernel ``L = diag(r) S diag(r)``; the budget is filled by greedy DPP MAP inference.

    Deviation: the original takes relevance from CLIP's image embeddings and CLIP's *text tower* on the instruction.
    A stock HF VLM has no text tower, so both the visual features and the instruction are taken from the hidden
    states at the prune point; at the default ``layers=[0]`` these are the post-projector visual features and the
    LLM's own input embeddings of the prompt's text tokens (the whole text of the prompt, template included).
    """

    name: ClassVar[str] = "cdpruner"

    layers: list[int] = field(default_factory=lambda: [0])
    negate: bool = True

    def relevance(self, ctx: StageContext) -> torch.Tensor:
        """``(B, S)`` raw relevance (mean cosine to the text tokens, negated if ``negate``)."""
        feats = F.normalize(ctx.hidden_states.float(), dim=-1)
        text = (ctx.valid & (ctx.groups < 0)).float()  # (B, S)
        text_mean = torch.einsum("bsd,bs->bd", feats, text) / text.sum(1, keepdim=True).clamp(min=1)
        relevance = feats @ text_mean[..., None]  # mean of cosines = cosine with the mean of unit vectors
        relevance = relevance[..., 0]
        return -relevance if self.negate else relevance

    def select(self, ctx: StageContext) -> Selection:
        relevance = self.relevance(ctx)
        table, valid, sample = group_rows(ctx.groups, ctx.budgets.shape[1])
        cell = table.clamp(min=0)
        rel = relevance[sample, cell].masked_fill(~valid, float("inf"))
        low = rel.min(-1, keepdim=True).values
        rel = rel.masked_fill(~valid, float("-inf"))
        high = rel.max(-1, keepdim=True).values
        rel = ((rel - low) / (high - low + 1e-6)).masked_fill(~valid, 0.0)  # (P, N)
        feats = F.normalize(ctx.hidden_states[sample, cell].float(), dim=-1)
        kernel = rel[:, :, None] * (feats @ feats.transpose(1, 2)) * rel[:, None, :]
        picked = conditional_dpp_map(kernel, valid, ctx.budgets.reshape(-1))
        return Selection(keep=rows_to_mask(table, picked, sample, ctx.groups.shape), scores=relevance)
