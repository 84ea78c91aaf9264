"""What the fast PIO proxy and the explicit-attention methods recompute of a decoder layer: the rotary function, the
queries, the layer's tail after attention, and the arguments a layer needs when called alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from piofvlm import transformers_compat

#: Text models whose decoder layers are laid out like Llama's and rotate with Llama's ``apply_rotary_pos_emb``.
LLAMA_STYLE_TEXT_MODELS = ("llama", "mistral", "ministral", "qwen2", "qwen3")


def llama_layer_output(layer: nn.Module, hidden: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
    """Llama's pre-norm block tail at some slots: ``hidden + attn``, then ``+ mlp(post_attention_layernorm(.))``."""
    residual = hidden + attn_output
    norm, mlp = transformers_compat.layer_post_attention_norm(layer), transformers_compat.layer_mlp(layer)
    return residual + mlp(norm(residual))


class FastProxySupport:
    """Defaults: Llama's layer (pre-norm, ``q/k/v/o_proj``, Llama's rotary) for the text models of
    :data:`LLAMA_STYLE_TEXT_MODELS`, no fast proxy otherwise."""

    def proxy_layer_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments a decoder layer needs when the reference proxy calls it alone, without a cache
        (Gemma 4: an empty ``shared_kv_states`` for the layers that store their keys there). Default: none."""
        return {}

    def rotary_fn(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
        """The family's own ``apply_rotary_pos_emb(q, k, cos, sin)``, or ``None`` if the fast proxy cannot be used.

        Default: Llama's for the text models of :data:`LLAMA_STYLE_TEXT_MODELS` (pre-norm decoder layers with
        ``input_layernorm``, ``self_attn`` ``q/k/v/o_proj`` (+ optional per-head ``q_norm``/``k_norm``),
        ``post_attention_layernorm`` and ``mlp``: the layout the fast proxy and the explicit-attention methods
        recompute), else ``None`` (the reference proxy path; attention-based methods refuse with an error).
        """
        if getattr(self.text_config, "model_type", None) in LLAMA_STYLE_TEXT_MODELS:
            return transformers_compat.rotary_function("llama")
        return None

    def attention_queries(self, attn: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query states ``(B, n, H, hd)`` of attention module ``attn`` (before per-head norms and RoPE) at normed
        inputs ``(B, n, d)``, and the output gate ``(B, n, H * hd)`` the attention output is multiplied by (after a
        sigmoid) before ``o_proj``, or None. Default: ``q_proj`` alone, no gate."""
        parts = transformers_compat.attention_parts(attn)
        return parts.q_proj(normed).view(*normed.shape[:2], -1, parts.head_dim), None

    def decoder_layer_output(self, layer: nn.Module, hidden: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """What decoder ``layer`` outputs at some slots, from its input there and its attention output (after
        ``o_proj``), both ``(B, n, d)``: the fast proxy's tail of the layer. Default: Llama's pre-norm block
        (``hidden + attn``, then ``+ mlp(post_attention_layernorm(.))``); families with other norms override it."""
        return llama_layer_output(layer, hidden, attn_output)
