"""Attention masks for a rebuilt (pruned, left-padded) sequence, in the format of each attention implementation.

We call the same mask interface the model itself uses (``transformers.masking_utils``, reached through
:mod:`piofvlm.transformers_compat`), so a layout that drops nothing yields exactly the mask the model would have built.
"""

from __future__ import annotations

from piofvlm.transformers_compat import causal_padding_mask

__all__ = ["causal_padding_mask"]
