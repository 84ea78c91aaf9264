"""Families as facts: a family that follows the common layout is a data entry here, not a subclass.

The common layout is LLaVA's: ``model.model`` receives ``input_ids`` and pixels and calls ``model.model.
language_model``, whose ``layers`` are decoder layers with 1-D rotary positions of a text model in
``LLAMA_STYLE_TEXT_MODELS``, ``norm`` and ``model.lm_head``; the visual tokens carry ``config.image_token_id``.
A :class:`Family` says where each of those is (attribute paths, only where they differ) and lists the small parts
(:mod:`piofvlm.adapters.parts`, or a family module's own part where its layout is code) that say how its images are
counted and what its vision side offers; :func:`declare` builds and registers the adapter (by ``model_type``, as
``@register_adapter`` does for the code adapters). :data:`COMMON_FAMILIES` are the registered entries:

* ``llava`` (LLaVA-1.5) and ``vipllava`` (ViP-LLaVA: several feature layers, no select strategy);
* ``internvl``, ``smolvlm`` / ``idefics3``, ``idefics2``, ``mistral3``: LLaVA's decoder side, with their tile,
  latent or grid geometry as one part each (in ``internvl.py``, ``smolvlm.py``, ``idefics2.py``, ``mistral3.py``).

Families that truly differ keep a module of code: M-RoPE, windows, per-layer inputs, hybrid stacks, image blocks
(``qwen_vl.py``, ``glm4v.py``, ``gemma3.py``, ``gemma4.py``, ``qwen3_5.py``, ``moe.py``) and the anyres packings
(``llava_next.py``, ``llava_onevision.py``, ``llava_next_video.py``: image counts and token sources run the model's
own packing code, and videos mix with images in prompt order).

Adding a common-layout family: one :class:`Family` in :data:`COMMON_FAMILIES`, its tiny model in
``tiny.families.FAMILIES``, and its tests (``tests/test_facts.py`` checks every entry against the code adapter it
replaced; DEVELOPERS.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, ClassVar

from torch import nn

from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.idefics2 import PerceiverLatents
from piofvlm.adapters.internvl import InternVLTiles
from piofvlm.adapters.mistral3 import PixtralImageGrid
from piofvlm.adapters.parts import (
    ClipVisionTower,
    EqualTokensPerImage,
    NoSlidingWindow,
    PaddedSquareGrid,
    PatchGridPerImage,
    RunsAreItems,
    SquarePatchGrid,
    TiledImageRuns,
)
from piofvlm.adapters.registry import register_adapter
from piofvlm.adapters.smolvlm import SmolVLMTiles


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
    #: Class attributes of the adapter that tune its parts (e.g. ``ClipVisionTower.feature_layer_field``).
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: The adapter class's name (default: from the first model type, ``llava_next`` -> ``LlavaNextAdapter``).
    class_name: str | None = None


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
    name = family.class_name or "".join(word.title() for word in family.model_types[0].split("_")) + "Adapter"
    namespace = {
        **family.settings,
        "model_types": family.model_types,
        "family": family,
        "__doc__": family.description,
    }
    cls = type(name, (*family.parts, FactsAdapter), {**namespace, "__module__": __name__})
    return register_adapter(cls) if register else cls


#: LLaVA-1.5 (the example of DEVELOPERS.md): equal token counts per image on a Llama, CLIP's patch grid.
LLAVA = Family(
    ("llava",),
    "LLaVA-1.5 (``LlavaForConditionalGeneration``): every image expands to the same number of placeholder tokens "
    "(576 at 336 px), one CLIP patch grid.",
    parts=(EqualTokensPerImage, SquarePatchGrid, ClipVisionTower),
)

#: The earlier name of the example entry (kept for code written against it).
LLAVA_AS_DATA = LLAVA

#: The common-layout families, registered as data (``tests/test_facts.py`` checks each against the code adapter it
#: replaced: same logits, kept sets, KV lengths, token sources and boxes).
COMMON_FAMILIES: tuple[Family, ...] = (
    LLAVA,
    Family(
        ("vipllava",),
        "ViP-LLaVA (``VipLlavaForConditionalGeneration``): LLaVA-1.5's layout, image features from several vision "
        "layers (``vision_feature_layers``), [CLS] always dropped (``adapters/vipllava.py``).",
        parts=(PatchGridPerImage, SquarePatchGrid, ClipVisionTower),
        settings={"feature_layer_field": "vision_feature_layers", "select_strategy_field": None},
        class_name="VipLlavaAdapter",
    ),
    Family(
        ("internvl",),
        "InternVL 2.5 / 3 (``InternVLForConditionalGeneration``): one contiguous run of ``<IMG_CONTEXT>`` tokens per "
        "image (or video frame); tiles are square token grids (``adapters/internvl.py``).",
        parts=(RunsAreItems, InternVLTiles),
        class_name="InternVLAdapter",
    ),
    Family(
        ("smolvlm", "idefics3"),
        "SmolVLM / Idefics3: each run of ``<image>`` tokens (a tile or a global view) is one item "
        "(``adapters/smolvlm.py``).",
        parts=(RunsAreItems, SmolVLMTiles),
        language_model="model.text_model",
        class_name="SmolVLMAdapter",
    ),
    Family(
        ("idefics2",),
        "Idefics2: each run of ``<image>`` tokens (a crop or a whole image: its perceiver latents) is one item "
        "(``adapters/idefics2.py``).",
        parts=(RunsAreItems, PerceiverLatents),
        language_model="model.text_model",
        class_name="Idefics2Adapter",
    ),
    Family(
        ("mistral3",),
        "Mistral 3 (Pixtral vision tower): ``[IMG]`` tokens are visual; ``[IMG_BREAK]`` / ``[IMG_END]`` are text; "
        "counts from ``image_sizes`` (``adapters/mistral3.py``).",
        parts=(NoSlidingWindow, PixtralImageGrid),
        settings={"sliding_window_note": "the released Mistral Small 3.x checkpoints have none"},
        class_name="Mistral3Adapter",
    ),
    # issue 24's common-layout families (ViP-LLaVA, above, keeps its vision-side settings)
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
    # LightOnOCR, read from transformers 5.24 (processing/modeling_lighton_ocr.py): ``replace_image_token`` writes an
    # image of h x w pixels as (h // (patch * merge)) * (w // (patch * merge)) image tokens in raster order, one run,
    # with no [IMG_BREAK] / [IMG_END] between rows: Mistral 3's parts apply unchanged (a run without breaks is one item
    # as a run with them). 1-D RoPE (Qwen3): positions="renumber" works. No vision-attention map: visionzip / vscan /
    # chain refuse, as for Mistral 3.
    Family(
        ("lighton_ocr",),
        "LightOnOCR (``LightOnOcrForConditionalGeneration``): Mistral 3's multimodal layout (a Pixtral tower and a "
        "2 x 2 patch merger, counts from ``image_sizes``) on a Qwen3 text model, no row-break tokens.",
        parts=(NoSlidingWindow, PixtralImageGrid),
        settings={"sliding_window_note": "the released LightOnOCR checkpoints have none"},
        class_name="LightOnOcrAdapter",
    ),
)

#: The adapter class of each entry, by its first model type.
ADAPTERS_FROM_FACTS: dict[str, type[ModelAdapter]] = {
    family.model_types[0]: declare(family) for family in COMMON_FAMILIES
}
