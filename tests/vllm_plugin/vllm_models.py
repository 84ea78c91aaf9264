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
