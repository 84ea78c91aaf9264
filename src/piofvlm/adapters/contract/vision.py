"""The vision side of a family: the vision tower the encoder-side methods read (``visionzip``, ``vscan``, ``chain``),
the source of each visual token (``pool``), and where each token lies on its image (overlays)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from piofvlm.adapters.boxes import TokenBoxes


class VisionTower:
    """Defaults raise a ``ValueError`` saying what is missing, so a method can report which capability a family
    lacks."""

    # Families that support encoder-side methods override these; the defaults raise a ValueError saying what is
    # missing, so a method can report which capability a family lacks.
    def _no_vision(self, what: str) -> ValueError:
        return ValueError(
            f"{what} is not available for {self.model_type} models: "
            f"{type(self).__name__} does not implement it (see piofvlm.adapters.base.ModelAdapter)"
        )

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder module."""
        raise self._no_vision("vision_tower")

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's transformer blocks, in order."""
        raise self._no_vision("vision_layers")

    @property
    def vision_feature_layer_index(self) -> int:
        """Index in :attr:`vision_layers` of the block whose output feeds the projector (>= 0)."""
        raise self._no_vision("vision_feature_layer_index")

    @property
    def vision_local_layer_index(self) -> int:
        """Default shallow block of VScan's local scan (``local_layer=None``)."""
        raise self._no_vision("vision_local_layer_index (VScan's default local_layer)")

    @property
    def vision_has_cls(self) -> bool:
        """Whether each vision-encoder input starts with a [CLS] token that is not a visual token of the prompt."""
        raise self._no_vision("vision_has_cls")

    def vision_attention(self, layer_index: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit self-attention of vision block ``layer_index`` from the hidden states entering it.

        Args:
            layer_index: index in :attr:`vision_layers`.
            hidden_states: ``(N_crops, T, d_v)`` input of that block (T includes a [CLS] token if there is one).

        Returns:
            ``(probs, keys)``: ``(N_crops, H, T, T)`` fp32 attention probabilities and ``(N_crops, T, hd)`` keys
            averaged over heads (VisionZip's merge metric).
        """
        raise self._no_vision("vision_attention")

    def vision_token_scores(self, layer_index: int, vision: Any, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision-attention score and merge keys of every visual token source at vision block ``layer_index``.

        Args:
            layer_index: index in :attr:`vision_layers`.
            vision: the :class:`~piofvlm.methods.shared.capture.VisionInputs` of the current call.
            mode: ``"cls"`` (attention from the [CLS] token) or ``"mean"`` (attention received, mean over queries);
                heads are averaged.

        Returns:
            ``(scores, keys)``: ``(N, P)`` fp32 and ``(N, P, hd)``, indexed by the ``crop`` and ``patch`` of
            :meth:`visual_token_sources`. Default: one row per vision-encoder crop, one column per patch.
        """
        probs, keys = self.vision_attention(layer_index, vision.layer_input(layer_index))  # (N, H, T, T), (N, T, hd)
        offset = 1 if self.vision_has_cls else 0
        scores = probs[:, :, 0, offset:].mean(1) if mode == "cls" else probs.mean(1).mean(1)[:, offset:]
        return scores, keys[:, offset:]

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """For each image of the batch, in order, where each of its visual tokens comes from.

        Returns one dict per image with ``(N_img,)`` long tensors: ``crop`` (input of the vision tower's batch),
        ``patch`` (patch index within the crop, not counting [CLS]), ``grid``/``row``/``col`` (place in the image's
        token grid(s)); ``crop``/``patch`` are -1 for tokens without a vision-encoder patch (e.g. row separators).
        """
        raise self._no_vision("visual_token_sources")


class Overlays:
    """Where each visual token lies on its image (default: not known, a ``ValueError``)."""

    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Where each visual token of each image / video of a call lies on it (what overlays draw from).

        Args:
            model_kwargs: the processor's outputs for the call (``input_ids``, ``attention_mask``, pixel inputs and
                their sizes / grids), as given to the model.
            source_sizes: ``(width, height)`` of each picture given to the processor (a video: of its frames), in
                flat prompt order; needed where the layout depends on them and the inputs do not say it (InternVL's
                and SmolVLM's tile grids).

        Returns:
            One :class:`~piofvlm.adapters.boxes.TokenBoxes` per image or video in flat (sample-major) prompt order;
            its boxes count every visual token of the item (see :mod:`piofvlm.adapters.boxes`).

        Default: a ``ValueError``; families that can say it override this.
        """
        raise ValueError(
            f"overlays are not available for {self.model_type} models: {type(self).__name__} does not say where its "
            "visual tokens lie on the image (ModelAdapter.token_boxes); draw kept-token counts instead, or teach the "
            "adapter its layout"
        )

    def visual_slots(self, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """``(B, S)`` bool: the visual tokens of a call's prompts (not under ``attention_mask == 0``)."""
        visual = self.visual_token_mask(model_kwargs["input_ids"])
        if model_kwargs.get("attention_mask") is not None:
            visual = visual & model_kwargs["attention_mask"].bool().to(visual.device)
        return visual.cpu()
