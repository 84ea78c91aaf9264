"""Position ids and rotary tables after tokens are dropped: their layouts, recomputation and renumbering."""

from __future__ import annotations

from typing import ClassVar

import torch


class Positions:
    """1-D positions ``(B, S)`` by default; M-RoPE families override the layouts and renumbering."""

    #: Position ids are laid out as ``(*lead, B, S)``; this is the index of ``B`` (1 for M-RoPE's ``(3, B, S)``).
    position_batch_dim: ClassVar[int] = 0
    #: The rotary tables (cos, sin) are laid out as ``(*lead, B, S, *rest)``; this is the index of ``B``.
    rotary_batch_dim: ClassVar[int] = 0
    #: Whether ``positions="renumber"`` is well defined for this family.
    supports_renumber: ClassVar[bool] = True

    def default_position_ids(self, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """Positions the language model would use when the caller passes none: ``(1, S)``."""
        return torch.arange(seq_len, device=device)[None]

    def rotary_embeddings(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor, layer_type: str = "full_attention"
    ) -> tuple[torch.Tensor, ...]:
        """Recompute ``position_embeddings`` (cos, sin) of layers of ``layer_type`` for new position ids (used by
        ``positions="renumber"``, and for a layer type whose first layer comes after the prune point)."""
        return self.language_model.rotary_emb(hidden_states, position_ids=position_ids)

    def renumber_positions(self, position_ids: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Subtract a per-slot ``shift`` of shape ``(B, S)`` from position ids of layout ``(*lead, B, S)``."""
        return position_ids - shift

    def layer_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The ``position_ids`` argument the decoder layers get, from the language model's ``position_ids``."""
        return position_ids
