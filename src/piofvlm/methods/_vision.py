"""Shared pieces of the encoder-side methods (VisionZip, VScan): vision-attention scores per visual slot, merging."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from piofvlm.core.context import StageContext
from piofvlm.methods.shared.capture import VisionInputs, VisualMap

ATTENTION_MODES = ("auto", "cls", "mean")


def check_encoder_side(method: object, adapter: object, attention: str) -> None:
    """Raise ``ValueError`` unless ``method`` can act on the adapted model's vision tower."""
    name = type(method).__name__
    if list(method.layers) != [0]:
        raise ValueError(f"{name} acts on the vision encoder's output, i.e. before the first layer: use layers=[0]")
    try:
        adapter.vision_layers  # noqa: B018 - raises a ValueError naming what the adapter lacks
        has_cls = adapter.vision_has_cls
        adapter.vision_feature_layer_index  # noqa: B018
    except ValueError as error:
        raise ValueError(f"{name} needs the vision tower: {error}") from error
    if attention == "cls" and not has_cls:
        raise ValueError(f"{name}(attention='cls') needs a [CLS] token, which this vision encoder has not; use 'mean'")


def slot_scores(
    ctx: StageContext, vision: VisionInputs, vmap: VisualMap, layer: int, attention: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot: vision-attention score and the vision keys (mean over heads) of its patch at vision block ``layer``.

    ``attention``: ``"cls"`` = attention from the crop's [CLS] token, ``"mean"`` = attention received, averaged over
    every query of the crop; ``"auto"`` = ``"cls"`` when the encoder has a [CLS] token. Scores are averaged over
    heads. Slots without a patch (e.g. ``image_newline``) score ``-inf`` and get zero keys.

    Returns:
        ``(scores, keys)``: ``(B, S)`` fp32 and ``(B, S, hd)``.
    """
    adapter = ctx.adapter
    mode = ("cls" if adapter.vision_has_cls else "mean") if attention == "auto" else attention
    crop_scores, crop_keys = adapter.vision_token_scores(layer, vision, mode)  # (N, P), (N, P, hd)
    crop, patch = vmap.at("crop", ctx), vmap.at("patch", ctx)
    has_patch = crop >= 0
    c, p = crop.clamp(min=0), patch.clamp(min=0)
    scores = torch.where(has_patch, crop_scores[c, p].float(), float("-inf"))
    slot_keys = crop_keys[c, p] * has_patch[..., None]
    return scores, slot_keys


def merge_into(
    hidden: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, similarity_feats: torch.Tensor
) -> torch.Tensor:
    """Average each target with the sources assigned to it (each source goes to its most cosine-similar target).

    Args:
        hidden: ``(n, d)`` values to merge; sources / targets: ``(n_s,)`` / ``(n_t,)`` row indices;
        similarity_feats: ``(n, f)`` features compared by cosine similarity.

    Returns:
        ``(n_t, d)``: ``(target + sum of its sources) / (1 + number of sources)``.
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32; fp64 models keep fp64
    merged = hidden[targets].to(dtype)
    if len(sources) == 0 or len(targets) == 0:
        return merged
    feats = F.normalize(similarity_feats.to(torch.promote_types(similarity_feats.dtype, torch.float32)), dim=-1)
    assign = (feats[sources] @ feats[targets].T).argmax(-1)  # (n_s,), first maximum
    sums = merged.index_add(0, assign, hidden[sources].to(dtype))
    counts = 1 + torch.bincount(assign, minlength=len(targets)).to(merged.dtype)[:, None]
    return sums / counts


def top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values (ties to the lower index)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]
