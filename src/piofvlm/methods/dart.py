"""DART: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., EMNLP 2025, arXiv 2502.11494).

Idea: pick a few pivot tokens (largest key norm), then keep the visual tokens that duplicate the pivots least.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from piofvlm.core.context import Selection, StageContext
from piofvlm.core.handle import PruningHandle
from piofvlm.methods.base import TokenPruner
from piofvlm.methods.shared.attention import layer_keys
from piofvlm.methods.shared.capture import LayerInputs
from piofvlm.registry import register_method

KEY_LAYERS = ("previous", "next")


@register_method
@dataclass
class DART(TokenPruner):
    """DART. Budget: visual tokens kept per image, pivots included (see :class:`TokenPruner`), met exactly.

    Per image at prune point K:

    1. Pivots: the ``image_pivots`` visual tokens of the image and the ``text_pivots`` text tokens after the sample's
       last visual token (all text tokens if there are none) with the largest L1 norm of their keys (heads
       concatenated; before RoPE, so the choice does not depend on absolute positions such as left padding) in
       layer K-1 (DART's hook on the previous layer) or K.
    2. Visual pivots are kept. The rest of the budget is split over the pivots as evenly as possible (earlier pivots
       get the remainder); pivots in turn (visual pivots first, then text pivots, each by decreasing key norm) take
       their share of the remaining visual tokens with the lowest cosine similarity to them, on the final-norm of the
       hidden states (DART's ``last_layer_state``).

    The original iterates over a Python set, so its pivot order (and so its per-pivot picks) is arbitrary and its
    kept count only approximates the budget; here both are fixed.
    """

    name: ClassVar[str] = "dart"

    layers: list[int] = field(default_factory=lambda: [2])
    image_pivots: int = 4
    text_pivots: int = 4
    key_layer: str = "previous"

    def __post_init__(self) -> None:
        super().__post_init__()
        for field_name in ("image_pivots", "text_pivots"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field_name} must be an int >= 0, got {value!r}")
        if self.image_pivots + self.text_pivots == 0:
            raise ValueError("DART needs at least one pivot (image_pivots + text_pivots >= 1)")
        if self.key_layer not in KEY_LAYERS:
            raise ValueError(f"key_layer must be one of {KEY_LAYERS}, got {self.key_layer!r}")
        if self.key_layer == "previous" and self.layers[0] == 0:
            raise ValueError("key_layer='previous' needs every prune point >= 1 (no layer has run at layer 0)")

    def attention_layers(self) -> list[int]:
        return [layer - 1 if self.key_layer == "previous" else layer for layer in self.layers]

    def attach(self, handle: PruningHandle) -> None:
        if self.key_layer == "previous":
            self._inputs = LayerInputs(handle, [layer - 1 for layer in self.layers])

    def key_norms(self, ctx: StageContext) -> torch.Tensor:
        """``(B, S)`` L1 norm of each slot's pre-RoPE keys (heads concatenated)."""
        if self.key_layer == "previous":
            index, hidden = ctx.layer - 1, self._inputs.get(ctx.layer - 1, ctx)
        else:
            index, hidden = ctx.layer, ctx.hidden_states
        keys = layer_keys(ctx.adapter, index, hidden)  # (B, H_kv, S, hd), before RoPE
        return keys.float().abs().sum(dim=(1, 3))

    def select(self, ctx: StageContext) -> Selection:
        norms = self.key_norms(ctx)
        features = F.normalize(ctx.adapter.final_norm(ctx.hidden_states).float(), dim=-1)  # (B, S, d)
        keep = torch.zeros_like(ctx.groups, dtype=torch.bool)
        slots = torch.arange(ctx.groups.shape[1], device=ctx.groups.device)
        for b in range(ctx.groups.shape[0]):
            visual = ctx.groups[b] >= 0
            last_visual = int(slots[visual].max())
            text = ctx.valid[b] & ~visual
            after = text & (slots > last_visual)
            text = after if bool(after.any()) else text
            text_slots = slots[text][_top(norms[b, text], self.text_pivots)]
            for g in range(ctx.budgets.shape[1]):
                budget = int(ctx.budgets[b, g])
                if budget == 0:
                    continue
                group = slots[ctx.groups[b] == g]
                image_slots = group[_top(norms[b, group], min(self.image_pivots, budget))]
                keep[b, image_slots] = True
                pivots = torch.cat([image_slots, text_slots])
                rest = budget - len(image_slots)
                shares = [rest // len(pivots) + (1 if i < rest % len(pivots) else 0) for i in range(len(pivots))]
                for pivot, share in zip(pivots.tolist(), shares, strict=True):
                    if share == 0:
                        continue
                    candidates = group[~keep[b, group]]
                    similarity = features[b, candidates] @ features[b, pivot]  # (n,)
                    keep[b, candidates[_top(-similarity, share)]] = True
        return Selection(keep=keep, scores=norms)


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values, ties to the lower index."""
    return torch.sort(values, descending=True, stable=True).indices[:k]
