"""Data passed from the mechanism to a method at a pruning stage, and what a method gives back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from piofvlm.adapters.base import ModelAdapter


@dataclass
class StageContext:
    """Everything a method may use to choose visual tokens at one pruning stage.

    Shapes: ``B`` samples, ``S`` slots of the current (left-padded) sequence, ``d`` hidden size, ``G`` budget groups.
    """

    stage: int
    #: Number of decoder layers that have run before this stage (the prune point ``K``).
    layer: int
    #: ``(B, S, d)`` residual stream entering decoder layer ``layer``.
    hidden_states: torch.Tensor
    #: ``(B, S)`` bool: real tokens (False for padding slots).
    valid: torch.Tensor
    #: ``(B, S)`` long: budget group of each visual token (an image, or the whole sample), -1 for text and padding.
    groups: torch.Tensor
    #: ``(B, S)`` long: index of each visual slot among its sample's original visual tokens (prompt order over all
    #: images, before any stage), -1 for text and padding. Lets spatial methods find a token's place in its grid.
    visual_index: torch.Tensor
    #: ``(B, G)`` long: how many visual tokens to keep in each group (0 for groups that do not exist).
    budgets: torch.Tensor
    #: The attention mask of the current layout, in the format of the model's attention implementation.
    attention_mask: Any
    #: ``(cos, sin)`` of the current layout, as the decoder layers receive them.
    position_embeddings: tuple[torch.Tensor, ...]
    #: Position ids of the current layout (``(B, S)``, or ``(*lead, B, S)`` for M-RoPE families).
    position_ids: torch.Tensor
    #: ``(B,)`` int64: a fingerprint of each sample's prompt, independent of the batch it is in (for seeding).
    sample_keys: torch.Tensor
    adapter: ModelAdapter
    model: nn.Module
    #: Per layer type (``adapter.layer_type``): the masks and rotary tables of the current layout. Empty: every
    #: layer gets :attr:`attention_mask` and :attr:`position_embeddings` (those of layer :attr:`layer`'s type).
    masks: dict[str, Any] = field(default_factory=dict)
    rotary: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    #: ``(layer_index, query_slots (B, n)) -> (B, 1, n, S)`` bool keys those queries see in that layer; None: causal.
    key_mask: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    #: Extra keyword arguments decoder layer :attr:`layer` takes in the current layout besides the hidden states,
    #: mask and rotary tables (Gemma 4's ``per_layer_input`` ``(B, S, d_ple)``, gathered with the kept tokens).
    layer_inputs: dict[str, Any] = field(default_factory=dict)

    def layer_mask(self, index: int) -> Any:
        """The attention mask decoder layer ``index`` gets in the current layout."""
        return self.masks.get(self.adapter.layer_type(index), self.attention_mask)

    def layer_rotary(self, index: int) -> tuple[torch.Tensor, ...]:
        """The ``(cos, sin)`` decoder layer ``index`` gets in the current layout."""
        return self.rotary.get(self.adapter.layer_type(index), self.position_embeddings)

    def allowed_keys(self, index: int, query_slots: torch.Tensor) -> torch.Tensor:
        """``(B, 1, n, S)`` bool: the keys the queries at ``query_slots`` ``(B, n)`` see in decoder layer ``index``
        (causal over real keys, plus e.g. Gemma 3's image blocks and sliding windows)."""
        if self.key_mask is not None:
            return self.key_mask(index, query_slots)
        key_index = torch.arange(self.valid.shape[1], device=self.valid.device)
        return self.valid[:, None, None, :] & (key_index[None, None, None, :] <= query_slots[:, None, :, None])

    @property
    def visual(self) -> torch.Tensor:
        """``(B, S)`` bool: visual tokens still present."""
        return self.groups >= 0

    def budget_groups(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(sample, budget, slots)`` for every group that has tokens and a budget > 0 (for methods whose rule
        is easiest written one group at a time); ``slots`` are the group's slot indices in sequence order."""
        for b in range(self.groups.shape[0]):
            for g in range(self.budgets.shape[1]):
                budget = int(self.budgets[b, g])
                slots = (self.groups[b] == g).nonzero()[:, 0]
                if budget > 0 and len(slots) > 0:
                    yield b, budget, slots


@dataclass
class Selection:
    """A method's decision at one stage."""

    #: ``(B, S)`` bool: visual tokens to keep. Exactly ``budgets`` per group; False on text and padding.
    keep: torch.Tensor
    #: ``(B, S)`` float scores of the visual tokens (higher = more important), or None for score-free methods.
    scores: torch.Tensor | None = None
    #: Optional ``(B, S, d)`` replacement hidden states (e.g. kept tokens with dropped ones merged into them); only
    #: kept slots are read. A merged token keeps the position of the token it was merged into.
    hidden_states: torch.Tensor | None = None


@dataclass
class StageRecord:
    """What was selected at one stage, per sample, for tests, plots and users.

    Indices count a sample's visual tokens in prompt order, over all its images (0 .. N_vis - 1), before any stage.
    """

    stage: int
    layer: int
    #: Per sample: ``(N_before,)`` visual indices present before this stage.
    candidates: list[torch.Tensor] = field(default_factory=list)
    #: Per sample: ``(k,)`` sorted visual indices kept by this stage.
    kept: list[torch.Tensor] = field(default_factory=list)
    #: Per sample: ``(N_before,)`` scores aligned with ``candidates`` (None for score-free methods).
    scores: list[torch.Tensor | None] = field(default_factory=list)

    def __repr__(self) -> str:
        """One line: the counts per sample, not the tensors (``record.kept`` etc. hold those)."""
        kept = [len(k) for k in self.kept]
        candidates = [len(c) for c in self.candidates]
        scored = "scored" if any(s is not None for s in self.scores) else "no scores"
        return f"StageRecord(stage={self.stage}, layer={self.layer}, kept={kept} of {candidates} per sample, {scored})"
