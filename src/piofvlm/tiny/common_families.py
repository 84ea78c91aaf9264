"""Tiny models of the (nearly) common-layout families added for issue 24 (GOT-OCR 2.0, LightOnOCR, ShieldGemma 2,
...), with inputs in their processors' layouts (no hub). They join :data:`piofvlm.tiny.families.FAMILIES` (so every
shared test matrix and ``piofvlm doctor``'s self-test) through :func:`register`, which ``tiny/families.py`` calls at
its end; the helpers of that module are imported inside the functions here, so either module may be imported first.
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


# ------------------------------------------------------------------------------------------------------ ShieldGemma 2
def build_shieldgemma2(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """ShieldGemma 2 as ``AutoModelForImageTextToText`` loads it: ``Gemma3ForConditionalGeneration`` from a
    ``ShieldGemma2Config`` carrying the tiny Gemma 3's configuration (``tiny.families.build_gemma3``: SigLIP 32 px,
    16 tokens an image, local / global layers with a 16-slot window)."""
    from piofvlm.tiny.families import _model, build_gemma3

    gemma3 = build_gemma3(attn, num_layers, seed, dtype).config
    config = _class("ShieldGemma2Config")(
        text_config=gemma3.text_config.to_dict(),
        vision_config=gemma3.vision_config.to_dict(),
        mm_tokens_per_image=gemma3.mm_tokens_per_image,
        image_token_index=gemma3.image_token_id,
        boi_token_index=gemma3.boi_token_id,
        eoi_token_index=gemma3.eoi_token_id,
    )
    return _model(_class("Gemma3ForConditionalGeneration"), config, attn, seed, dtype)


# ---------------------------------------------------------------------------------------------------------- LightOnOCR
LIGHTON_TOKENS = ["<|image_pad|>", "<|vision_pad|>", "<|vision_end|>"]
LIGHTON_IMAGE_ID = 4


def build_lighton_ocr(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """LightOnOCR: Pixtral patch 4 + 2 x 2 patch merger (one token per 8 x 8 pixels, as the tiny Mistral 3) on a
    Qwen3 text model (the toy Llama's sizes, head_dim 16, per-head q / k norms)."""
    from piofvlm.tiny.families import _model, text_config

    text = text_config(num_layers).to_dict()
    text.update(model_type="qwen3", head_dim=16, layer_types=None)
    config = _class("LightOnOcrConfig")(
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 16,
            "image_size": 64,
            "patch_size": 4,
        },
        text_config=text,
        image_token_id=LIGHTON_IMAGE_ID,
        spatial_merge_size=2,
    )
    return _model(_class("LightOnOcrForConditionalGeneration"), config, attn, seed, dtype)


@functools.cache
def build_lighton_ocr_processor() -> Any:
    """The stock ``LightOnOcrProcessor`` (Pixtral's PIL image processor, images up to 64 px, sides multiples of 8)."""
    from transformers import PixtralImageProcessorPil

    from piofvlm.tiny.llava import WORDS, word_level_tokenizer

    tokenizer = word_level_tokenizer([*LIGHTON_TOKENS, *WORDS], LIGHTON_TOKENS)
    tokenizer.image_token, tokenizer.image_break_token, tokenizer.image_end_token = LIGHTON_TOKENS
    ids = tokenizer.convert_tokens_to_ids(LIGHTON_TOKENS)
    tokenizer.image_token_id, tokenizer.image_break_token_id, tokenizer.image_end_token_id = ids
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8})
    return _class("LightOnOcrProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=4, spatial_merge_size=2
    )


def lighton_ocr_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``LightOnOcrProcessor`` itself; no video: sample 1's video slot is a second
    image."""
    from piofvlm.tiny.families import _images, _prompts

    prompts = _prompts(indices, LIGHTON_TOKENS[0], None)
    return build_lighton_ocr_processor()(
        images=_images(indices, True), text=prompts, return_tensors="pt", padding=True
    )


# --------------------------------------------------------------------------------------------------------- DeepSeek-VL
DEEPSEEK_TOKENS = ["<image_placeholder>"]
DEEPSEEK_IMAGE_ID = 4


def build_deepseek_vl(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """DeepSeek-VL: a SigLIP tower at 16 px, patch 4 (4 x 4 = 16 tokens an image, 576 in the checkpoints), its MLP
    aligner and the toy Llama text model."""
    from piofvlm.tiny.families import _model, text_config

    config = _class("DeepseekVLConfig")(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
        },
        text_config=text_config(num_layers).to_dict(),
        image_token_id=DEEPSEEK_IMAGE_ID,
    )
    return _model(_class("DeepseekVLForConditionalGeneration"), config, attn, seed, dtype)


@functools.cache
def build_deepseek_vl_processor() -> Any:
    """The stock ``DeepseekVLProcessor`` with its PIL image processor (longer side to 16 px, padded to a square)."""
    from piofvlm.tiny.llava import WORDS, word_level_tokenizer

    tokenizer = word_level_tokenizer([*DEEPSEEK_TOKENS, *WORDS], DEEPSEEK_TOKENS)
    tokenizer.image_token = DEEPSEEK_TOKENS[0]
    image_processor = _class("DeepseekVLImageProcessorPil")(size={"height": 16, "width": 16}, min_size=4)
    return _class("DeepseekVLProcessor")(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16)


def deepseek_vl_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``DeepseekVLProcessor`` itself; no video: sample 1's video slot is a second
    image."""
    from piofvlm.tiny.families import _images, _prompts

    prompts = _prompts(indices, DEEPSEEK_TOKENS[0], None)
    processor = build_deepseek_vl_processor()
    return processor(images=_images(indices, True), text=prompts, return_tensors="pt", padding=True)


# ------------------------------------------------------------------------------------------------------------- Janus
JANUS_TOKENS = ["<image_placeholder>", "<begin_of_image>", "<end_of_image>"]
JANUS_IMAGE_ID = 4


def build_janus(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Janus: its SigLIP-style tower at 16 px, patch 4 (16 tokens an image, 576 in the checkpoints), MLP aligner,
    the toy Llama text model, and a small VQ-VAE with its generation heads (built, unused by text generation)."""
    from piofvlm.tiny.families import _model, text_config

    config = _class("JanusConfig")(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
            "mlp_ratio": 2.0,
            "projection_dim": 64,
            "num_image_tokens": 16,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": 32,
            "latent_channels": 32,
            "base_channels": 32,
            "channel_multiplier": [1, 1],
            "num_res_blocks": 1,
            "num_patches": 4,
            "projection_dim": 64,
            "image_token_embed_dim": 64,
        },
        text_config=text_config(num_layers).to_dict(),
        image_token_id=JANUS_IMAGE_ID,
    )
    return _model(_class("JanusForConditionalGeneration"), config, attn, seed, dtype)


@functools.cache
def build_janus_processor() -> Any:
    """The stock ``JanusProcessor`` (no default system prompt) with its PIL image processor (longer side to 16 px,
    padded to a square): an image is ``<begin_of_image>`` + 16 ``<image_placeholder>`` + ``<end_of_image>``."""
    from piofvlm.tiny.llava import WORDS, word_level_tokenizer

    tokenizer = word_level_tokenizer([*JANUS_TOKENS, *WORDS], JANUS_TOKENS)
    tokenizer.image_token, tokenizer.boi_token, tokenizer.eoi_token = JANUS_TOKENS
    image_processor = _class("JanusImageProcessorPil")(size={"height": 16, "width": 16}, min_size=4)
    return _class("JanusProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16, use_default_system_prompt=False
    )


def janus_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``JanusProcessor`` itself; no video: sample 1's video slot is a second image."""
    from piofvlm.tiny.families import _images, _prompts

    prompts = _prompts(indices, JANUS_TOKENS[0], None)
    return build_janus_processor()(images=_images(indices, True), text=prompts, return_tensors="pt", padding=True)


# -------------------------------------------------------------------------------------------------- DeepSeek-VL hybrid
def build_deepseek_vl_hybrid(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """DeepSeek-VL hybrid: the tiny DeepSeek-VL's SigLIP (16 px, 16 tokens an image) and a SAM tower at 64 px (patch
    4, windowed attention with one global layer) interpolated onto the SigLIP grid; the toy Llama text model."""
    from piofvlm.tiny.families import _model, text_config

    config = _class("DeepseekVLHybridConfig")(
        vision_config=build_deepseek_vl(num_layers=1).config.vision_config.to_dict(),
        high_res_vision_config={
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
        text_config=text_config(num_layers).to_dict(),
        image_token_id=DEEPSEEK_IMAGE_ID,
    )
    return _model(_class("DeepseekVLHybridForConditionalGeneration"), config, attn, seed, dtype)


@functools.cache
def build_deepseek_vl_hybrid_processor() -> Any:
    """The stock ``DeepseekVLHybridProcessor`` with its PIL image processor (16 px and 64 px views, both padded to
    a square)."""
    image_processor = _class("DeepseekVLHybridImageProcessorPil")(
        size={"height": 16, "width": 16}, high_res_size={"height": 64, "width": 64}, min_size=4
    )
    tokenizer = build_deepseek_vl_processor().tokenizer
    return _class("DeepseekVLHybridProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16
    )


def deepseek_vl_hybrid_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``DeepseekVLHybridProcessor`` itself (``pixel_values`` and
    ``high_res_pixel_values``); no video: sample 1's video slot is a second image."""
    from piofvlm.tiny.families import _images, _prompts

    prompts = _prompts(indices, DEEPSEEK_TOKENS[0], None)
    processor = build_deepseek_vl_hybrid_processor()
    return processor(images=_images(indices, True), text=prompts, return_tensors="pt", padding=True)


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
    if _class("LightOnOcrProcessor") is None:
        unavailable["lighton_ocr"] = f"transformers {version} has no LightOnOcrProcessor"
    else:
        families["lighton_ocr"] = TinyFamily(
            "lighton_ocr",
            build_lighton_ocr,
            lighton_ocr_inputs,
            lambda: build_lighton_ocr_processor().tokenizer,
            has_video=False,
            counts=[[16], [32, 16], [40, 16]],  # (h // 8) * (w // 8) tokens an image
        )
    if _class("DeepseekVLImageProcessorPil") is None:
        unavailable["deepseek_vl"] = f"transformers {version} has no DeepseekVLImageProcessorPil"
    else:
        families["deepseek_vl"] = TinyFamily(
            "deepseek_vl",
            build_deepseek_vl,
            deepseek_vl_inputs,
            lambda: build_deepseek_vl_processor().tokenizer,
            has_video=False,
            counts=[[16], [16, 16], [16, 16]],
        )
    if _class("DeepseekVLHybridImageProcessorPil") is None or "deepseek_vl" not in families:
        unavailable["deepseek_vl_hybrid"] = f"transformers {version} has no DeepseekVLHybridImageProcessorPil"
    else:
        families["deepseek_vl_hybrid"] = TinyFamily(
            "deepseek_vl_hybrid",
            build_deepseek_vl_hybrid,
            deepseek_vl_hybrid_inputs,
            lambda: build_deepseek_vl_hybrid_processor().tokenizer,
            has_video=False,
            counts=[[16], [16, 16], [16, 16]],
        )
    if _class("JanusImageProcessorPil") is None:
        unavailable["janus"] = f"transformers {version} has no JanusImageProcessorPil"
    else:
        families["janus"] = TinyFamily(
            "janus",
            build_janus,
            janus_inputs,
            lambda: build_janus_processor().tokenizer,
            has_video=False,
            counts=[[16], [16, 16], [16, 16]],
        )
    if _class("ShieldGemma2Config") is None:
        unavailable["shieldgemma2"] = f"transformers {version} has no ShieldGemma2Config"
    elif "gemma3" in families:  # Gemma 3's processor layout and counts
        gemma3 = families["gemma3"]
        families["shieldgemma2"] = TinyFamily(
            "shieldgemma2", build_shieldgemma2, gemma3.inputs, gemma3.tokenizer, has_video=False, counts=gemma3.counts
        )
