"""ShieldGemma 2 (``model_type`` ``shieldgemma2``): a Gemma 3 checkpoint type. ``AutoModelForImageTextToText`` loads
it as ``Gemma3ForConditionalGeneration`` with a ``ShieldGemma2Config`` (Gemma 3's fields: ``mm_tokens_per_image``,
image / begin / end ids, a ``gemma3_text`` text model and a SigLIP tower), so Gemma 3's adapter applies unchanged
(local / global layers, windows counted in kept slots, bidirectional image blocks; DEVELOPERS.md, "Gemma 3").

``ShieldGemma2ForImageClassification`` (what its model card loads) wraps that model as ``.model`` and reads the
yes / no logits of the last position: apply the method to ``classifier.model``; calling the classifier then prunes
(tested). Applying it to the classifier itself is refused with an error saying so.
"""

from __future__ import annotations

from torch import nn

from piofvlm.adapters.gemma3 import Gemma3Adapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class ShieldGemma2Adapter(Gemma3Adapter):
    """ShieldGemma 2: Gemma 3's adapter (see the module doc)."""

    model_types = ("shieldgemma2",)

    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "model", None)
        if not hasattr(model, "lm_head") and hasattr(inner, "lm_head"):
            raise ValueError(
                f"{type(model).__name__} wraps the {type(inner).__name__} that runs the prompt (its .model) and reads "
                "the yes / no logits of its last position: apply the method to classifier.model; calling the "
                "classifier then prunes"
            )
        super().__init__(model)
