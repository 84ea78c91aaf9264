"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): natively multimodal, a hybrid decoder of Gated DeltaNet
linear-attention layers and gated full-attention layers (3 of 4 layers are linear in the released checkpoints,
``config.text_config.layer_types``).

The multimodal side is Qwen3-VL's (the same processor, video written frame by frame with timestamps, 3-D M-RoPE from
``get_rope_index`` with ``mm_token_type_ids``, kept positions, ``rope_deltas`` for decoding, ``positions="renumber"``
refused) without deepstack, so this adapter extends :class:`~piofvlm.adapters.qwen_vl.Qwen3VLAdapter`. What differs,
as of transformers 5.24:

* **Linear-attention layers** (``layer.linear_attn``, ``Qwen3_5GatedDeltaNet``) have no KV cache and no attention
  map: a causal depthwise conv (``conv_state`` ``(B, conv_dim, kernel)``) then the gated delta rule
  (``recurrent_state`` ``(B, H_v, d_k, d_v)``). They take a 2-D padding mask (``create_recurrent_attention_mask``:
  the inputs of padded slots are zeroed, so left padding leaves the states untouched), not the causal mask. After a
  prune point the mechanism hands them the padding mask of the rebuilt sequence (:meth:`prefill_masks`), so their state
  after the prefill is the state of the kept sequence; during decoding their mask is left alone (a generated token is
  never padding). Their cache holds no sequence, so the cache length transformers reads comes from the first
  full-attention layer (see ``PruningHandle._pad_length_layer_cache``).
* **Full-attention layers** project queries and an output gate together (``q_proj`` gives ``2 * H * hd``); the
  attention output is multiplied by ``sigmoid(gate)`` before ``o_proj`` (:meth:`attention_queries`). RoPE is
  partial (``partial_rotary_factor``, the first ``cos.shape[-1]`` dims) and applied Llama-style
  (``modeling_qwen3_5.apply_rotary_pos_emb``); RMS norms are zero-centred (``1 + weight``), which the fast paths
  call as modules, so nothing more is needed.
* **PIO proxy on a linear-attention layer.** The proxy is the next layer (``proxy_layer="next"``, the layer that will
  consume the pruned sequence), whatever its kind: this is the faithful choice, and the default. On a linear layer
  the fast path cannot restrict the token mixer to the loss positions (the recurrence carries every earlier token),
  so it runs the Gated DeltaNet over the whole sequence and only the residual, MLP, final norm and LM head at the loss
  positions (:meth:`token_mixer`): exact, the same gradient as the reference path. ``proxy_layer="next_attention"``
  instead takes the next full-attention layer (skipping the linear layers in between), cheaper but not the layer that
  will consume the pruned sequence. Measured on the CPU at a 1/8-width stand-in, 1024 tokens
  (``benchmarks/qwen3_5_proxy.py``, ``docs/methods.md``): the default costs 5.9 GFLOPs (about 0.8 of a linear
  layer's forward) and 2-3x a linear layer's forward in time on transformers' pure-PyTorch delta rule;
  ``"next_attention"`` 0.58 GFLOPs, 4-16x less time (512-2048 tokens). The default stays the faithful one;
  ``"next_attention"`` is the cheap alternative where the DeltaNet backward is slow.
* **Prune points**: any layer (before a linear or a full-attention layer, layer 0 included).
* **Attention-reading methods** (FastV, PyramidDrop, SparseVLM, DART's keys) need a layer's queries and keys: at a
  linear-attention layer they refuse with an error naming the method, the family and the full-attention layers
  (:meth:`check_attention_map`); at full-attention layers they run.
* **Static caches** are refused (``transformers_compat.static_cache_length``: a static cache of this model mixes
  ``LinearAttentionLayer`` and ``StaticLayer``); use the default dynamic cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.adapters.qwen_vl import Qwen3VLAdapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3.5: Qwen3-VL's multimodal mechanism on a hybrid linear / full-attention decoder (see the module doc)."""

    model_types = ("qwen3_5",)

    def rotary_fn(self):  # noqa: D102 - documented in the base class
        return transformers_compat.rotary_function("qwen3_5")

    def rotary_embeddings(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor, layer_type: str = "full_attention"
    ) -> tuple[torch.Tensor, ...]:
        """One table for every layer type, from the M-RoPE rows (the text model drops the text row of 4-row ids)."""
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return self.language_model.rotary_emb(hidden_states, position_ids=position_ids)

    # ------------------------------------------------------------------------------------ hybrid layer stack
    def layer_type(self, index: int) -> str:
        """``"linear_attention"`` or ``"full_attention"`` (``text_config.layer_types``): the key of its mask."""
        return str(self.text_config.layer_types[index])

    def is_attention_layer(self, index: int) -> bool:
        return self.layer_type(index) != "linear_attention"

    def prefill_masks(
        self,
        valid: torch.Tensor,
        source: torch.Tensor,
        dtype: torch.dtype,
        key_length: int | None,
        model_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """Full-attention layers: the causal mask; linear-attention layers: the 2-D padding mask of the rebuilt
        sequence, as the text model builds it (``create_recurrent_attention_mask``)."""
        masks = super().prefill_masks(valid, source, dtype, key_length, model_kwargs)
        if "linear_attention" in masks:
            masks["linear_attention"] = transformers_compat.recurrent_padding_mask(self.text_config, valid)
        return masks

    def token_mixer(self, index: int, normed: torch.Tensor, mask: Any) -> torch.Tensor:
        """The Gated DeltaNet of linear layer ``index`` over the whole (left-padded) sequence, without a cache:
        ``(B, S, d)``."""
        if self.is_attention_layer(index):
            return super().token_mixer(index, normed, mask)
        return self.layers[index].linear_attn(normed, attention_mask=mask, cache=None)

    def attention_queries(self, attn: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q_proj`` gives each head's query and gate side by side (``Qwen3_5Attention.forward``)."""
        batch_size, num = normed.shape[:2]
        query, gate = torch.chunk(attn.q_proj(normed).view(batch_size, num, -1, attn.head_dim * 2), 2, dim=-1)
        return query, gate.reshape(batch_size, num, -1)
