"""VScan: "Rethinking Visual Token Reduction for Efficient Large Vision-Language Models" (Zhang et al., TMLR 2026,
arXiv 2505.22654): the encoder stage, as PIO-FVLM's authors use it for their encoder-involved mode.

Idea: a *local* scan keeps the tokens a shallow vision layer's [CLS] attends to most within each spatial window, a
*global* scan adds the tokens a deep layer's [CLS] attends to most over the whole image, and every dropped token is
merged into its most similar kept token.
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
class VScan(TokenPruner):
    """VScan's encoder stage. Budget: visual tokens per image (local + global), met exactly.

    Per image, with budget ``T`` (spec A.9, the authors' ``encode_images`` / ``window_cls_selection`` /
    ``token_merging``):

    1. Local scan: each grid of the image (LLaVA-NeXT: base view and high-resolution grid) is cut into
       ``window x window`` windows; each window keeps its top ``floor(int(T * local_share) / num_windows)`` tokens by
       the [CLS] attention of vision block ``local_layer`` (heads averaged).
    2. Global scan: the remaining ``T - local`` tokens are the top tokens by the [CLS] attention of ``global_layer``
       (default: the block feeding the projector), local picks excluded.
    3. Merge: every other token with a vision patch joins its most cosine-similar kept token (on the projected
       features the LLM receives, as the authors do); a kept token becomes ``(itself + its tokens) / (1 + count)``.

    Attention is computed explicitly from each block's queries and keys. The authors apply the scans per 336 px crop
    on LLaVA-NeXT and always keep ``image_newline`` tokens outside the budget; here the budget is per image over all
    its crops, and ``image_newline`` tokens rank last and are dropped without merging unless the budget reaches them.
    VScan's second stage (text relevance inside the LLM) is not part of this method: compose it with an in-LLM method
    through :class:`~piofvlm.methods.chain.Chain` (PIO-FVLM's encoder-involved mode).

    Attributes:
        local_layer: vision block of the local scan (authors: 5 for CLIP ViT-L; Qwen2.5-VL: 7, its first
            full-attention block); None = the adapter's ``vision_local_layer_index`` (Qwen families only).
        global_layer: vision block of the global scan; None = the block whose output feeds the projector.
        window: window side, in patches (authors: 6 on a 24 x 24 grid; Qwen2.5-VL: 4).
        local_share: share of the budget given to the local scan (authors: 0.5).
        attention: ``"auto"``, ``"cls"`` or ``"mean"`` (mean attention received, for encoders without [CLS]).
    """

    name: ClassVar[str] = "vscan"

    layers: list[int] = field(default_factory=lambda: [0])
    local_layer: int | None = 5
    global_layer: int | None = None
    window: int = 6
    local_share: float = 0.5
    attention: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if isinstance(self.local_share, bool) or not 0.0 <= float(self.local_share) <= 1.0:
            raise ValueError(f"local_share must be in [0, 1], got {self.local_share!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        check_encoder_side(self, adapter, self.attention)
        num_blocks = len(adapter.vision_layers)
        if self.local_layer is None:
            adapter.vision_local_layer_index  # noqa: B018 - raises a ValueError naming what the adapter lacks
        for value, label in ((self.local_layer, "local_layer"), (self.global_layer, "global_layer")):
            if value is not None and not -num_blocks <= value < num_blocks:
                raise ValueError(
                    f"{label}={value} does not exist: the vision encoder has {num_blocks} blocks "
                    f"(valid: {-num_blocks} .. {num_blocks - 1})"
                )

    def attach(self, handle: PruningHandle) -> None:
        num_blocks = len(handle.adapter.vision_layers)
        local = handle.adapter.vision_local_layer_index if self.local_layer is None else self.local_layer
        self._local = local % num_blocks
        deep = handle.adapter.vision_feature_layer_index if self.global_layer is None else self.global_layer
        self._global = deep % num_blocks
        self._vision = VisionInputs(handle, [self._local, self._global])

    def select(self, ctx: StageContext) -> Selection:
        vmap = self._vision.visual_map(ctx)
        local_scores, _ = slot_scores(ctx, self._vision, vmap, self._local, self.attention)
        global_scores, _ = slot_scores(ctx, self._vision, vmap, self._global, self.attention)
        image, grid = vmap.at("image", ctx), vmap.at("grid", ctx)
        window_id = (vmap.at("row", ctx) // self.window) * 100_003 + vmap.at("col", ctx) // self.window
        window_key = (image * 100_003 + grid) * 10_000_019 + window_id
        keep = torch.zeros_like(ctx.groups, dtype=torch.bool)
        hidden = ctx.hidden_states.clone()
        for b, budget, slots in ctx.budget_groups():
            with_patch = torch.isfinite(local_scores[b, slots])
            chosen = torch.zeros(len(slots), dtype=torch.bool, device=slots.device)
            windows = window_key[b, slots][with_patch].unique()
            quota = int(budget * self.local_share) // max(1, len(windows))
            for key in windows.tolist():
                members = (with_patch & (window_key[b, slots] == key)).nonzero()[:, 0]
                chosen[members[top(local_scores[b, slots[members]], quota)]] = True
            remaining = budget - int(chosen.sum())
            # Tokens without a patch rank below every scored token, chosen ones below everything.
            global_rank = torch.nan_to_num(global_scores[b, slots], neginf=-1e30).masked_fill(chosen, float("-inf"))
            chosen[top(global_rank, remaining)] = True
            targets = chosen.nonzero()[:, 0]
            sources = (~chosen & with_patch).nonzero()[:, 0]
            feats = ctx.hidden_states[b, slots]
            keep[b, slots[targets]] = True
            hidden[b, slots[targets]] = merge_into(feats, sources, targets, feats).to(hidden.dtype)
        return Selection(keep=keep, scores=global_scores, hidden_states=hidden)
