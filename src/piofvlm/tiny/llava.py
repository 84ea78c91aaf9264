"""Tiny random LLaVA / LLaVA-NeXT models and offline processors built from configs (no hub): for tests and demos."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

WORDS = (
    "USER : ASSISTANT what is the colour of shape in image left right top bottom a an red green blue yes no how "
    "many are there describe this picture please count objects small large circle square triangle ? . ,"
).split()
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def word_level_tokenizer(tokens: list[str], special_tokens: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer (built offline) over ``<pad> <unk> <s> </s>`` + ``tokens``; left padding."""
    vocab = {PAD_TOKEN: 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=special_tokens,
    )
    tok.padding_side = "left"
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The LLaVA toy tokenizer: ``<image>`` is id 4."""
    return word_level_tokenizer([IMAGE_TOKEN, *WORDS], [IMAGE_TOKEN])


def text_config(num_layers: int = 4, vocab_size: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=4
    )


def build_llava(attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=vision_config(), text_config=text_config(num_layers), image_token_id=4, image_seq_length=49
    )
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


def build_llava_next(attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=vision_config(),
        text_config=text_config(num_layers),
        image_token_id=4,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
    )
    model = LlavaNextForConditionalGeneration(config).to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


def build_processor(kind: str):
    tok = build_tokenizer()
    if kind == "llava":
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=4,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def random_image(seed: int, size: tuple[int, int] = (28, 28)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def save_toy_llava(directory, seed: int = 0) -> None:
    """Save a tiny random LLaVA and its processor in the hub layout, loadable with ``from_pretrained(directory)``."""
    model = build_llava(seed=seed)
    model.save_pretrained(directory)
    build_processor("llava").save_pretrained(directory)
