"""Tiny models of the common-layout families added for issue 24 (GOT-OCR 2.0, ...), with inputs in their processors'
layouts (no hub). They join :data:`piofvlm.tiny.families.FAMILIES` (so every shared test matrix and ``piofvlm
doctor``'s self-test) through :func:`register`, which ``tiny/families.py`` calls at its end; the helpers of that module
are imported inside the functions here, so either module may be imported first.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import BatchFeature

    from piofvlm.tiny.families import TinyFamily


def _class(name: str) -> Any:
    """``transformers.<name>``, or ``None`` where the installed release has no such class."""
    import transformers

    return getattr(transformers, name, None)


# -------------------------------------------------------------------------------------------------------- GOT-OCR 2.0
GOT_TOKENS = ["<img>", "</img>", "<imgpad>", "<|im_start|>", "<|im_end|>"]
GOT_IMAGE_ID = 6
#: ``<imgpad>`` tokens per 64 px crop of the tiny GOT-OCR 2.0 (256 per 1024 px crop in the checkpoints).
GOT_TOKENS_PER_CROP = 16


def build_got_ocr2(
    attn: str = "sdpa",
    num_layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    model_type: str = "got_ocr2",
) -> torch.nn.Module:
    """GOT-OCR 2.0 (``GotOcr2ForConditionalGeneration``): a SAM-style ViT (64 px crops, patch 4, windowed attention
    with one global layer) whose 16 x 16 patch grid two stride-2 convolutions of the projector bring to 4 x 4 = 16
    tokens a crop, and a Qwen2 text model. ``model_type="pp_chart2table"`` builds PP-Chart2Table (the same classes
    from ``PPChart2TableConfig``)."""
    from piofvlm.tiny.families import _model, _qwen2_text

    config_class = _class("PPChart2TableConfig" if model_type == "pp_chart2table" else "GotOcr2Config")
    config = config_class(
        vision_config={
            "hidden_size": 32,
            "output_channels": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 4,
            "window_size": 4,
            "global_attn_indexes": [1],
            "mlp_dim": 64,
        },
        text_config=_qwen2_text(num_layers),
        image_token_index=GOT_IMAGE_ID,
        image_seq_length=GOT_TOKENS_PER_CROP,
    )
    return _model(_class("GotOcr2ForConditionalGeneration"), config, attn, seed, dtype)


@functools.cache
def build_got_ocr2_processor() -> Any:
    """The stock ``GotOcr2Processor`` with the PIL image processor (64 px crops); :func:`got_ocr2_inputs` turns on its
    multi-crop mode (``crop_to_patches``: up to 4 tiles and a thumbnail, written as one run of ``<imgpad>``)."""
    from transformers import GotOcr2ImageProcessorPil, GotOcr2Processor

    from piofvlm.tiny.llava import WORDS, word_level_tokenizer

    image_processor = GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}, min_patches=1, max_patches=4)
    tokenizer = word_level_tokenizer([*GOT_TOKENS, *WORDS], GOT_TOKENS)
    return GotOcr2Processor(image_processor=image_processor, tokenizer=tokenizer)


def got_ocr2_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``GotOcr2Processor`` itself, each image written ``<img><imgpad></img>`` (the
    processor's prompt layout) and cut into crops (``crop_to_patches=True``): one run of 16 tokens per crop, all the
    crops of an image in one run. GOT-OCR 2.0 has no video input: sample 1's video slot is a second image."""
    from piofvlm.tiny.families import _images, _prompts

    return build_got_ocr2_processor()(
        images=_images(indices, True),
        text=_prompts(indices, "<img><imgpad></img>", None),
        return_tensors="pt",
        padding=True,
        num_image_tokens=GOT_TOKENS_PER_CROP,
        crop_to_patches=True,
        max_patches=4,
    )


def register(families: dict[str, TinyFamily], unavailable: dict[str, str]) -> None:
    """Add this module's families to ``families`` (or their reason to ``unavailable`` where the installed
    transformers cannot build them)."""
    from piofvlm import transformers_compat
    from piofvlm.tiny.families import TinyFamily

    version = transformers_compat.TRANSFORMERS_VERSION
    for kind, needed in (("got_ocr2", "GotOcr2Config"), ("pp_chart2table", "PPChart2TableConfig")):
        if _class(needed) is None:
            unavailable[kind] = f"transformers {version} has no {needed}"
            continue
        families[kind] = TinyFamily(
            kind,
            functools.partial(build_got_ocr2, model_type=kind),
            got_ocr2_inputs,
            lambda: build_got_ocr2_processor().tokenizer,
            has_video=False,
            counts=[[16], [48, 16], [48, 16]],  # crops (and thumbnail) x 16 tokens, one item per image
        )
