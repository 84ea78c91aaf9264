"""LightOnOCR (``LightOnOcrForConditionalGeneration``): Mistral 3's multimodal layout (a Pixtral tower and a 2 x 2
patch merger, counts from ``image_sizes``) on a Qwen3 text model.

Read from transformers 5.24 (``processing_lighton_ocr.py``, ``modeling_lighton_ocr.py``): ``replace_image_token``
writes an image of ``h x w`` pixels as ``(h // (patch * merge)) * (w // (patch * merge))`` image tokens in raster
order, one contiguous run: unlike Pixtral's processor, no ``[IMG_BREAK]`` / ``[IMG_END]`` text between the rows.
Mistral 3's adapter therefore applies unchanged (its counts, ``pool`` grids and token boxes come from
``image_sizes``; a run without breaks is one item as a run with them). 1-D RoPE (Qwen3): ``positions="renumber"``
works. No vision-attention map: ``visionzip``/``vscan``/``chain`` refuse, as for Mistral 3.
"""

from __future__ import annotations

from piofvlm.adapters.mistral3 import Mistral3Adapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class LightOnOcrAdapter(Mistral3Adapter):
    """LightOnOCR: Mistral 3's adapter (see the module doc)."""

    model_types = ("lighton_ocr",)
