"""Families as facts: a family that follows the common layout is a data entry here, not a subclass.

The common layout is LLaVA's: ``model.model`` receives ``input_ids`` and pixels and calls ``model.model.
language_model``, whose ``layers`` are decoder layers with 1-D rotary positions of a text model in
``LLAMA_STYLE_TEXT_MODELS``, ``norm`` and ``model.lm_head``; the visual tokens carry ``config.image_token_id``.
A :class:`Family` says where each of those is (attribute paths, only where they differ) and lists the small parts
(:mod:`piofvlm.adapters.parts`) that say how its images are counted; :func:`declare` builds and registers the
adapter (by ``model_type``, as ``@register_adapter`` does for the code adapters).

Families that truly differ (M-RoPE, windows, per-layer inputs, hybrid stacks, image blocks) keep a module of code.

Adding a common-layout family: one :class:`Family` in :data:`COMMON_FAMILIES`, its tiny model in
``tiny.families.FAMILIES``, and its tests (see ``tests/test_facts.py``, which checks :data:`LLAVA_AS_DATA` against
LLaVA's code adapter, and DEVELOPERS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

from torch import nn

from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.parts import EqualTokensPerImage, PaddedSquareGrid, TiledImageRuns
from piofvlm.adapters.registry import register_adapter


@dataclass(frozen=True)
class Family:
    """The facts of one common-layout family (paths are attribute paths, dotted)."""

    model_types: tuple[str, ...]
    #: What the family is, for the adapter's docstring and error messages.
    description: str
    #: Parts giving what the common layout leaves open (how many tokens each image has, ...), first wins.
    parts: tuple[type, ...] = ()
    #: From the ``*ForConditionalGeneration`` model: the multimodal model, its language model, the LM head.
    multimodal_model: str = "model"
    language_model: str = "model.language_model"
    lm_head: str = "lm_head"
    #: From the language model: the decoder layers and the final norm.
    layers: str = "layers"
    final_norm: str = "norm"
    #: The config attribute holding the image placeholder id.
    image_token_id: str = "image_token_id"


class FactsAdapter(ModelAdapter):
    """A :class:`ModelAdapter` whose module tree and image token id are read from a :class:`Family`."""

    family: ClassVar[Family]

    @property
    def multimodal_model(self) -> nn.Module:
        return attrgetter(self.family.multimodal_model)(self.model)

    @property
    def language_model(self) -> nn.Module:
        return attrgetter(self.family.language_model)(self.model)

    @property
    def layers(self) -> nn.ModuleList:
        return attrgetter(self.family.layers)(self.language_model)

    @property
    def final_norm(self) -> nn.Module:
        return attrgetter(self.family.final_norm)(self.language_model)

    @property
    def lm_head(self) -> nn.Module:
        return attrgetter(self.family.lm_head)(self.model)

    @property
    def image_token_id(self) -> int:
        return int(attrgetter(self.family.image_token_id)(self.model.config))


def declare(family: Family, register: bool = True) -> type[ModelAdapter]:
    """Build the adapter class of ``family`` (its parts, then :class:`FactsAdapter`) and register it (by
    ``model_type``, unless ``register`` is false)."""
    name = "".join(word.title() for word in family.model_types[0].split("_")) + "Adapter"
    namespace = {"model_types": family.model_types, "family": family, "__doc__": family.description}
    cls = type(name, (*family.parts, FactsAdapter), {**namespace, "__module__": __name__})
    return register_adapter(cls) if register else cls


#: LLaVA-1.5 written as data: what a common-layout entry looks like. Not registered (``llava`` keeps its code adapter,
#: which also draws token boxes and serves the encoder-side methods); ``tests/test_facts.py`` checks that a model
#: pruned through it equals the code adapter, logit for logit and kept set for kept set.
LLAVA_AS_DATA = Family(
    ("llava",),
    "LLaVA-1.5 (``LlavaForConditionalGeneration``) as a data entry: equal token counts per image on a Llama.",
    parts=(EqualTokensPerImage,),
)

#: The common-layout families registered as data (ViP-LLaVA, the first candidate, needs vision-side behaviour, its
#: feature layers, so it keeps the code adapter of ``adapters/vipllava.py``).
COMMON_FAMILIES: tuple[Family, ...] = (
    Family(
        ("got_ocr2", "pp_chart2table"),
        "GOT-OCR 2.0 and PP-Chart2Table (``GotOcr2ForConditionalGeneration``): a fixed number of tokens per tile of a "
        "SAM-style ViT on a Qwen2; an image's tiles (``crop_to_patches``) form one run of ``<imgpad>``, its item "
        "(``pool`` pools each tile's grid).",
        parts=(TiledImageRuns,),
    ),
    Family(
        ("deepseek_vl",),
        "DeepSeek-VL (``DeepseekVLForConditionalGeneration``): a SigLIP tower (``model.model.vision_model``) and an "
        "MLP aligner, the same number of tokens per image (576) on a Llama; images padded to a square.",
        parts=(PaddedSquareGrid,),
    ),
    Family(
        ("janus",),
        "Janus / Janus-Pro (``JanusForConditionalGeneration``), image understanding: DeepSeek-VL's layout (a SigLIP "
        "tower and an MLP aligner, 576 tokens per image between ``<begin_of_image>`` / ``<end_of_image>``, images "
        "padded to a square) on a Llama; its image-generation path (``generation_mode='image'``) is not pruned.",
        parts=(PaddedSquareGrid,),
    ),
    Family(
        ("deepseek_vl_hybrid",),
        "DeepSeek-VL hybrid (``DeepseekVLHybridForConditionalGeneration``): DeepSeek-VL's layout with a SAM tower at "
        "high resolution whose features are interpolated onto the SigLIP grid and fused by the aligner (576 tokens "
        "per image, both views padded to a square) on a Llama.",
        parts=(PaddedSquareGrid,),
    ),
)

ADAPTERS_FROM_FACTS: dict[str, type[ModelAdapter]] = {
    family.model_types[0]: declare(family) for family in COMMON_FAMILIES
}
