"""Checkpoints for the vLLM plugin's end-to-end tests of families other than LLaVA-1.5, saved to a folder vLLM loads.

No trained LLaVA-NeXT or Qwen-VL exists here. :func:`save_llava_next` builds a LLaVA-NeXT from the shipped testbed
(its vision tower, projector and language model are LLaVA-1.5-shaped, trained; the anyres grid pinpoints and the
``image_newline`` embedding, seeded random, are added), so its answers are the testbed's skill on a new layout.
:func:`next_image` gives the test samples different sizes (so anyres gives them different counts).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

#: Crops of 336 px: a square image takes one tile (528 tokens), a 2:1 one two (784); others are unpadded.
NEXT_PINPOINTS = [[336, 336], [336, 672], [672, 336]]
#: (width, height) of test sample i: i % len(NEXT_SIZES).
NEXT_SIZES = [(336, 336), (504, 336), (336, 504), (672, 336), (400, 300), (300, 460), (336, 672)]


def next_image(image: Image.Image, index: int) -> Image.Image:
    """The testbed's 336 px image of sample ``index`` resized to ``NEXT_SIZES[index % 7]``."""
    size = NEXT_SIZES[index % len(NEXT_SIZES)]
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def save_llava_next(directory: str | Path, seed: int = 0) -> Path:
    """Save the testbed as a ``LlavaNextForConditionalGeneration`` (weights, tokenizer, processor) in ``directory``."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from piofvlm.testbed import model as testbed_model

    directory = Path(directory)
    base, processor = testbed_model.load_testbed()
    config = LlavaNextConfig(
        vision_config=base.config.vision_config.to_dict(),
        text_config=base.config.text_config.to_dict(),
        image_token_index=base.config.image_token_id,
        image_grid_pinpoints=NEXT_PINPOINTS,
        vision_feature_layer=base.config.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act=base.config.projector_hidden_act,
        multimodal_projector_bias=base.config.multimodal_projector_bias,
        tie_word_embeddings=True,
        pad_token_id=base.config.pad_token_id,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or [m for m in missing if "image_newline" not in m and "lm_head" not in m]:
        raise RuntimeError(f"testbed -> LLaVA-NeXT: missing {missing}, unexpected {unexpected}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        scale = base.get_input_embeddings().weight.std()
        model.model.image_newline.copy_(torch.randn(config.text_config.hidden_size, generator=generator) * scale)
    model.save_pretrained(directory)
    clip = processor.image_processor
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=NEXT_PINPOINTS,
        image_mean=clip.image_mean,
        image_std=clip.image_std,
    )
    LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=base.config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=processor.chat_template,
    ).save_pretrained(directory)
    return directory


#: (width, height) of Qwen2.5-VL test sample i (multiples of 28: the merged grid is (h / 28) x (w / 28)).
QWEN_SIZES = [(112, 112), (168, 112), (112, 196), (224, 112), (140, 84), (84, 168), (196, 196)]


def qwen_image(image: Image.Image, index: int) -> Image.Image:
    """The testbed's image of sample ``index`` resized to ``QWEN_SIZES[index % 7]``."""
    return image.resize(QWEN_SIZES[index % len(QWEN_SIZES)], Image.Resampling.BICUBIC)


def qwen_prompt(question: str) -> str:
    """A raw Qwen-style prompt for the tiny word-level tokenizer (one image placeholder, then the question)."""
    from piofvlm.tiny.qwen import IMAGE

    return f"{IMAGE} {question}"


def save_qwen2_5_vl(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Qwen2.5-VL (the layout of :mod:`piofvlm.tiny.qwen`, with a head size vLLM's CPU attention
    supports: 32) with its tokenizer and processor (image + video processors) in ``directory``."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from piofvlm.tiny import qwen

    directory = Path(directory)
    torch.manual_seed(seed)
    text = {
        "vocab_size": 64,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 128,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=qwen.IMAGE_TOKEN_ID,
        video_token_id=qwen.VIDEO_TOKEN_ID,
        vision_start_token_id=qwen.VISION_START_ID,
        vision_end_token_id=qwen.VISION_END_ID,
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    pixels = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}
    image_processor = Qwen2VLImageProcessor(**pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(**pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
    Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=qwen.build_qwen_tokenizer(), video_processor=video_processor
    ).save_pretrained(directory)
    return directory


def save_qwen3_vl(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Qwen3-VL (the layout of :mod:`piofvlm.tiny.qwen`: interleaved M-RoPE, deepstack from both
    vision blocks into decoder layers 0 and 1; head size 32, which vLLM's CPU attention supports) with its tokenizer
    and processor (image + video processors) in ``directory``."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from piofvlm.tiny import qwen

    directory = Path(directory)
    torch.manual_seed(seed)
    text = {
        "vocab_size": 64,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 1024,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 6, 6],
            "mrope_interleaved": True,
        },
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 128,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=qwen.IMAGE_TOKEN_ID,
        video_token_id=qwen.VIDEO_TOKEN_ID,
        vision_start_token_id=qwen.VISION_START_ID,
        vision_end_token_id=qwen.VISION_END_ID,
        tie_word_embeddings=False,
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    pixels = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}
    image_processor = Qwen2VLImageProcessor(**pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=qwen.build_qwen_tokenizer(), video_processor=video_processor
    ).save_pretrained(directory)
    return directory
