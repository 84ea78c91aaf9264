"""``labels=`` under a method: the causal-LM loss over the kept sequence (README "Production paths")."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from piofvlm.core.threads import PerThread

if TYPE_CHECKING:
    from piofvlm.adapters.base import ModelAdapter
    from piofvlm.methods.base import TokenPruner

logger = logging.getLogger(__name__)


class LabelsOverKept:
    """The labels side of :class:`~piofvlm.core.handle.PruningHandle`: takes ``labels`` from the model call (the model
    never sees them) and computes the loss over the kept positions. Owns the calling thread's labels."""

    # Set by the handle (PruningHandle.__init__).
    method: TokenPruner
    model: nn.Module
    adapter: ModelAdapter
    _labels: PerThread[tuple[torch.Tensor, torch.Tensor, Any] | None] = PerThread(lambda: None)  # labels, ids, items
    _final_source: PerThread[torch.Tensor | None] = PerThread(lambda: None)  # (B, S') prompt slot after last stage

    # ------------------------------------------------------------------------------------------------- labels
    def _take_labels(self, module: nn.Module, args: tuple, kwargs: dict):
        """``labels=`` are applied to the pruned logits by :meth:`_loss_over_kept`; the model never sees them."""
        self._labels = None
        if kwargs.get("labels") is None:
            return None
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or tuple(input_ids.shape) != tuple(labels.shape):
            raise ValueError(
                "labels under a piofvlm method need input_ids of the same shape (the loss follows the kept tokens)"
            )
        self._labels = (labels, input_ids, kwargs.get("num_items_in_batch"))
        return args, kwargs

    def _loss_over_kept(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The causal-LM loss over the kept sequence: the logits at a kept slot predict the label of the prompt slot
        after it (``-100`` where that slot is a visual token, kept or not, or padding), as the unpruned model's
        logits at that slot would."""
        if self._labels is None:
            return
        (labels, input_ids, num_items), self._labels = self._labels, None
        source, logits = self._final_source, getattr(output, "logits", None)
        if source is None or logits is None or logits.shape[1] != source.shape[1]:
            raise ValueError(
                "labels under a piofvlm method need the logits of every kept position: call the model on the whole "
                "prompt with an empty cache and logits_to_keep=0"
            )
        source = source.to(labels.device)
        following = (source + 1).clamp(max=labels.shape[1] - 1)
        text = ~self.adapter.visual_token_mask(input_ids.to(labels.device))
        usable = (source >= 0) & (source + 1 < labels.shape[1]) & text.gather(1, following)
        targets = torch.where(usable, labels.gather(1, following), -100)
        output["loss"] = module.loss_function(
            logits=logits,
            labels=None,
            vocab_size=logits.shape[-1],
            shift_labels=targets,
            num_items_in_batch=num_items,
        )
