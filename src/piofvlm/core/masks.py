"""Attention masks for a rebuilt (pruned, left-padded) sequence, in the format of each attention implementation.

We call the same mask interface the model itself uses (``transformers.masking_utils``), so a layout that drops
nothing yields exactly the mask the model would have built.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function


def causal_padding_mask(
    config: Any, key_valid: torch.Tensor, query_length: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Causal mask over ``key_valid`` keys whose last ``query_length`` keys are the queries.

    Args:
        config: the text config (its ``_attn_implementation`` picks the format).
        key_valid: ``(B, L_kv)`` bool, False for padding keys.
        query_length: number of queries ``L_q`` (the last ``L_q`` keys).
        dtype: dtype of the hidden states (eager masks are additive in this dtype).

    Returns:
        sdpa: ``(B, 1, L_q, L_kv)`` bool or None; eager: ``(B, 1, L_q, L_kv)`` float; flash: ``(B, L_kv)`` or None.
    """
    batch_size, kv_length = key_valid.shape
    mask_interface = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    return mask_interface(
        batch_size=batch_size,
        q_length=query_length,
        kv_length=kv_length,
        q_offset=kv_length - query_length,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=key_valid,
        allow_is_causal_skip=True,
        dtype=dtype,
        config=config,
        use_vmap=False,
        device=key_valid.device,
    )
