"""Per-layer-type inputs: attention masks and rotary tables shared by the layers of one type (default: one type,
``full_attention``, a causal mask), and per-token layer inputs gathered with the kept tokens."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from piofvlm import transformers_compat


class LayerTypeMasks:
    """One causal mask and one rotary table for every layer by default; Gemma 3 / 4 and Qwen3.5 override these."""

    #: The multimodal model hands the language model one prepared mask per layer type (a dict, Gemma 3); the
    #: mechanism then reads the 2-D padding mask of the multimodal call and rebuilds every mask itself.
    rebuilds_layer_type_masks: ClassVar[bool] = False
    #: ``(position, keyword)`` of a decoder-layer argument holding one row per token ``(B, S, ...)`` besides the
    #: hidden states (Gemma 4's ``per_layer_input``): gathered with the kept tokens after a prune point. None: none.
    per_token_layer_input: ClassVar[tuple[int, str] | None] = None

    # ------------------------------------------------------------------------------------- per-layer-type masks
    # Layers of one type share one attention mask and one rotary table. The default is one type for every layer (a
    # causal mask, one rotary table); families with local and global layers (Gemma 3) override these.
    def layer_type(self, index: int) -> str:
        """Attention type of decoder layer ``index`` (the key of its mask and rotary table)."""
        return "full_attention"

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The distinct layer types, in the order their first layer comes."""
        return tuple(dict.fromkeys(self.layer_type(i) for i in range(self.num_layers)))

    def prefill_masks(
        self,
        valid: torch.Tensor,
        source: torch.Tensor,
        dtype: torch.dtype,
        key_length: int | None,
        model_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """The attention masks of a rebuilt (pruned, left-padded) prefill, per layer type.

        Args:
            valid: ``(B, S)`` bool, real tokens of the rebuilt sequence.
            source: ``(B, S)`` long, the original prompt slot of each slot (-1 for padding).
            dtype: dtype of the hidden states (eager masks are additive).
            key_length: the static cache's key length (keys after ``S`` are unused and masked), None for a dynamic one.
            model_kwargs: the multimodal call's keyword arguments.

        Default: one causal padding mask for every layer type.
        """
        seq_len = valid.shape[1]
        if key_length is None:
            mask = transformers_compat.causal_padding_mask(self.text_config, valid, seq_len, dtype)
        else:
            key_valid = torch.nn.functional.pad(valid, (0, key_length - seq_len), value=False)
            mask = transformers_compat.causal_padding_mask(self.text_config, key_valid, seq_len, dtype, q_offset=0)
        return dict.fromkeys(self.layer_types, mask)

    def decode_mask(self, layer_type: str, key_valid: torch.Tensor, query_length: int, dtype: torch.dtype) -> Any:
        """The mask of layers of ``layer_type`` for ``query_length`` new tokens over ``key_valid`` ``(B, L_kv)``: the
        keys the layer's KV cache presents (its visible past, then the new tokens). Default: causal."""
        return transformers_compat.causal_padding_mask(self.text_config, key_valid, query_length, dtype)

    def decode_mask_over(
        self, layer_type: str, all_keys: torch.Tensor, visible: int, query_length: int, dtype: torch.dtype
    ) -> Any:
        """The decode mask of layers of ``layer_type`` when their cache presents the last ``visible`` of ``all_keys``
        ``(B, L_all)`` (every slot the layer has seen, padding included, then the ``query_length`` new tokens): for
        masks that depend on a key's absolute slot (Llama 4's chunks). Default: :meth:`decode_mask` over the visible
        keys."""
        return self.decode_mask(layer_type, all_keys[:, all_keys.shape[1] - visible :], query_length, dtype)

    @property
    def default_decode_mask(self) -> bool:
        """Whether this adapter decodes with the default mask (neither :meth:`decode_mask` nor
        :meth:`decode_mask_over` overridden: causal over the visible keys, nothing family-specific). The mechanism
        may then take the model's own decode mask where it is provably the segment's
        (``CacheLayouts._mask_as_given``)."""
        cls = type(self)
        return (
            cls.decode_mask is LayerTypeMasks.decode_mask and cls.decode_mask_over is LayerTypeMasks.decode_mask_over
        )

    def allowed_keys(
        self,
        layer_type: str,
        valid: torch.Tensor,
        source: torch.Tensor,
        query_slots: torch.Tensor,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """``(B, 1, n, S)`` bool: which keys the queries at ``query_slots`` ``(B, n)`` see in layers of
        ``layer_type`` (for the fast PIO proxy and the explicit-attention methods). Default: causal over real keys."""
        key_index = torch.arange(valid.shape[1], device=valid.device)
        return valid[:, None, None, :] & (key_index[None, None, None, :] <= query_slots[:, None, :, None])
