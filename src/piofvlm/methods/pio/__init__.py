"""PIO-FVLM / TRIO: token reduction guided by a layer-local inference objective (arXiv 2602.04657).

Idea: at prune point K, back-propagate a cheap proxy of the model's own next-token confidence (one decoder layer,
the final norm and the LM head; cross-entropy against its own argmax at a few prompt positions) to the hidden
states, score each visual token by the L2 norm of its gradient, then pick tokens in score order with feature-space
NMS (cosine similarity of the hidden states >= ``tau``), filling up to exactly the budget.
Needs no attention maps, so it works with SDPA and FlashAttention.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from piofvlm.core.context import Selection, StageContext
from piofvlm.methods.base import TokenPruner
from piofvlm.methods.pio.proxy_loss import proxy_gradient_norms
from piofvlm.methods.shared.selection import nms_fill_per_group, topk_per_group
from piofvlm.registry import register_method

logger = logging.getLogger(__name__)

PROXY_LAYERS = ("next", "previous", "next_attention")
OUTPUT_HEADS = ("lm_head", "input_embeddings")


@register_method
@dataclass
class PIO(TokenPruner):
    """PIO-FVLM. Budget: per stage, visual tokens kept per image (see :class:`TokenPruner`).

    Attributes:
        tau: cosine-similarity threshold of the NMS; tokens at least this similar to a picked token are suppressed
            (until the fill-up pass). The authors use 0.8.
        nms: False selects the plain top-k by gradient norm.
        proxy_layer: ``"next"``: the decoder layer that will consume the pruned sequence (layer index K; the
            authors' LLaVA choice); ``"previous"``: the layer that produced the hidden states, applied again (index
            K-1; the authors' Qwen choice); ``"next_attention"``: the first full-attention layer at or after K (on
            hybrid stacks such as Qwen3.5 it skips linear-attention layers, cheaper but not the layer that consumes
            the pruned sequence; elsewhere the same as ``"next"``).
        num_loss_positions: prompt positions whose logits enter the loss (authors: 4).
        include_last: end the loss window at the last prompt token (the authors' window stops one before it, whose
            gradient is therefore always zero).
        fast_proxy: compute the proxy at the loss positions only (exact); False runs the full reference path.
        output_head: the proxy's output head after the final norm. ``"lm_head"``: the model's own LM head;
            ``"input_embeddings"``: the input embedding matrix (``model.get_input_embeddings().weight``) as the head,
            which is what the authors' Qwen2.5-VL code runs (it patches the text decoder, which has no ``lm_head``,
            and falls back to ``embed_tokens``). The two agree when the embeddings are tied; Qwen2.5-VL-7B's are not.
    """

    name: ClassVar[str] = "pio"

    tau: float = 0.8
    nms: bool = True
    proxy_layer: str = "next"
    num_loss_positions: int = 4
    include_last: bool = False
    fast_proxy: bool = True
    output_head: str = "lm_head"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau is a cosine-similarity threshold in [-1, 1], got {self.tau!r}")
        if self.proxy_layer not in PROXY_LAYERS:
            raise ValueError(f"proxy_layer must be one of {PROXY_LAYERS}, got {self.proxy_layer!r}")
        if self.proxy_layer == "previous" and self.layers[0] == 0:
            raise ValueError("proxy_layer='previous' needs every prune point >= 1 (no layer has run at layer 0)")
        if isinstance(self.num_loss_positions, bool) or not isinstance(self.num_loss_positions, int):
            raise ValueError(f"num_loss_positions must be an int >= 1, got {self.num_loss_positions!r}")
        if self.num_loss_positions < 1:
            raise ValueError(f"num_loss_positions must be >= 1, got {self.num_loss_positions!r}")
        if self.output_head not in OUTPUT_HEADS:
            raise ValueError(f"output_head must be one of {OUTPUT_HEADS}, got {self.output_head!r}")

    @property
    def runs_previous_layer(self) -> bool:  # noqa: D102 - documented in the base class
        return self.proxy_layer == "previous"

    def proxy_layer_index(self, layer: int, adapter: Any = None) -> int:
        if self.proxy_layer == "previous":
            return layer - 1
        if self.proxy_layer == "next_attention" and adapter is not None:
            following = [i for i in range(layer, adapter.num_layers) if adapter.is_attention_layer(i)]
            if not following:
                raise ValueError(
                    f"pio proxy_layer='next_attention': no full-attention layer at or after layer {layer} in "
                    f"{adapter.model_type} models; use proxy_layer='next'"
                )
            return following[0]
        return layer

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        if self.proxy_layer == "next_attention":
            for layer in self.layers:
                self.proxy_layer_index(layer, adapter)  # refuses a prune point with no attention layer after it

    def _head(self, ctx: StageContext) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.output_head == "lm_head":
            return None
        embeddings = ctx.model.get_input_embeddings()
        return lambda hidden: F.linear(hidden, embeddings.weight)

    def score(self, ctx: StageContext) -> torch.Tensor:
        """``(B, S)`` fp32 L2 norm of the proxy-loss gradient of each slot."""
        layer_index = self.proxy_layer_index(ctx.layer, ctx.adapter)
        # At least fp32 accumulation; fp64 models keep fp64.
        scores = proxy_gradient_norms(
            ctx,
            layer_index,
            num_positions=self.num_loss_positions,
            include_last=self.include_last,
            fast=self.fast_proxy and _dense_weights(ctx, layer_index),
            head=self._head(ctx),
        )
        _check_window_reach(scores, ctx, layer_index)
        _check_gradient_flows(scores, ctx)
        return scores

    def select(self, ctx: StageContext) -> Selection:
        scores = self.score(ctx)
        if not self.nms:
            return Selection(keep=topk_per_group(scores, ctx.groups, ctx.budgets), scores=scores)
        with record_function("piofvlm.nms"):
            keep = nms_fill_per_group(scores, ctx.hidden_states, ctx.groups, ctx.budgets, float(self.tau))
        return Selection(keep=keep, scores=scores)


def _dense_weights(ctx: StageContext, layer_index: int) -> bool:
    """Whether the proxy layer's parameters are plain tensors that the fast proxy may read directly (it multiplies
    by ``v_proj.weight``). Quantized weights (torchao, bitsandbytes, quanto tensor subclasses) and offloaded ones
    (accelerate leaves them on the meta device until the module runs) take the reference path, which calls the
    modules."""
    for parameter in ctx.adapter.layers[layer_index].parameters():
        if type(parameter) not in (torch.Tensor, torch.nn.Parameter) or parameter.device.type == "meta":
            return False
    return True


def _check_window_reach(scores: torch.Tensor, ctx: StageContext, layer_index: int) -> None:
    """A sliding-window proxy layer (Gemma 3/4 local layers) lets the loss positions (the last prompt tokens) see only
    the last ``window`` slots: visual tokens further back get a zero gradient. All of a sample's visual tokens out of
    reach is refused (``ValueError``, with the real reason); some of them is logged as a warning (they are ranked
    last)."""
    window_of = getattr(ctx.adapter, "window", None)
    window = window_of(ctx.adapter.layer_type(layer_index)) if callable(window_of) else None
    if window is None:
        return
    visual = ctx.groups >= 0
    zero = visual & (scores == 0)
    blind = [b for b in range(scores.shape[0]) if bool(visual[b].any()) and bool(zero[b][visual[b]].all())]
    where = (
        f"PIO's proxy layer {layer_index} is a sliding-window layer (window {window} slots): its loss positions, the "
        "last prompt tokens, see only the visual tokens within that window"
    )
    fix = (
        "prune at a layer whose proxy layer is a full-attention one (layer_types[k] == 'full_attention'), or put "
        "less text after the image"
    )
    if blind:
        raise ValueError(f"{where}, and the text after the image of sample(s) {blind} is longer than that: {fix}")
    partial = [(b, int(zero[b].sum()), int(visual[b].sum())) for b in range(scores.shape[0]) if bool(zero[b].any())]
    if partial:
        counts = ", ".join(f"sample {b}: {n} of {total}" for b, n, total in partial)
        logger.warning("%s; visual tokens out of reach score 0 and are ranked last (%s): %s", where, counts, fix)


def _check_gradient_flows(scores: torch.Tensor, ctx: StageContext) -> None:
    """Refuse a selection from all-zero gradient scores: the proxy's backward did not reach the hidden states (some
    quantized weights have no backward on some devices), so the kept set would be the tie order, silently."""
    visual = ctx.groups >= 0
    dead_rows = visual.any(1) & ~((scores != 0) & visual).any(1)  # one device sync, not two per sample
    dead = dead_rows.nonzero()[:, 0].tolist()
    if not dead:
        return
    quantization = getattr(getattr(ctx.model, "config", None), "quantization_config", None)
    if isinstance(quantization, dict):
        library = quantization.get("quant_method")
    else:
        library = getattr(quantization, "quant_method", None)
    library = getattr(library, "value", library)
    cause = (
        f"the model's {library} quantized weights give no gradient on this device (bitsandbytes 4-bit on the CPU, "
        "torchao dynamic-activation int8)"
        if library
        else "the proxy layer or LM head gives no gradient"
    )
    raise RuntimeError(
        f"PIO's proxy-loss gradient is zero for every visual token of sample(s) {dead} at layer {ctx.layer}: {cause}, "
        "so the scores cannot rank the tokens. Load weight-only 8-bit or 4-bit weights that have a backward "
        "(torchao Int8WeightOnlyConfig, optimum-quanto int8/int4, bitsandbytes 8-bit), or use a method without "
        "gradients (fastv, dart, pdrop, divprune, random)"
    )
