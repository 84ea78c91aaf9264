"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA-OneVision models and offline processors (no hub).

For tests and demos. transformers' video processors need torchvision, which this project does not install, so video
inputs are built by :func:`add_videos` (random frames, in the layout the video processors produce).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import (
    BatchFeature,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from piofvlm.tiny.llava import WORDS, random_image, text_config, word_level_tokenizer

ONEVISION = "llava_onevision"
#: Placeholders of the LLaVA-OneVision toy prompts (one token each; the processor expands images).
OV_IMAGE, OV_VIDEO = "<image>", "<video>"

QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
SPECIAL = [IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, "<image>", "<video>"]
#: Frame timestamps (Qwen3-VL writes one before each video frame).
TIMESTAMPS = [f"<{t}.0s>" for t in range(8)]
#: Stands for a video token while the processor tokenizes (it refuses video tokens without a video processor).
_VIDEO_STANDIN = "<video_standin>"
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_ID, VISION_END_ID, OV_IMAGE_ID, OV_VIDEO_ID = 4, 5, 6, 7, 8, 9
#: An image placeholder as written in a prompt.
IMAGE = f"{VISION_START} {IMAGE_PAD} {VISION_END}"
#: A video placeholder as written in a prompt (expanded by :func:`add_videos`).
VIDEO = f"{VISION_START} {VIDEO_PAD} {VISION_END}"


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer([*SPECIAL, *TIMESTAMPS, _VIDEO_STANDIN, *WORDS], SPECIAL)


def _text_config(kind: str, num_layers: int, vocab_size: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }
    if kind == "qwen3_vl":
        config["head_dim"] = 16
        config["rope_parameters"]["mrope_interleaved"] = True
    return config


def _vision_config(kind: str) -> dict[str, Any]:
    if kind == "qwen3_vl":
        return {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1],
        }
    config = {"depth": 2, "num_heads": 2, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2}
    if kind == "qwen2_vl":
        return {**config, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
    return {**config, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "fullatt_block_indexes": [1]}


_CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor),
}


def build_qwen(
    kind: str, attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A tiny random ``*ForConditionalGeneration`` of family ``kind`` (one of :data:`QWEN_KINDS`)."""
    config_cls, model_cls, _ = _CLASSES[kind]
    torch.manual_seed(seed)
    config = config_cls(
        text_config=_text_config(kind, num_layers, vocab_size=64),
        vision_config=_vision_config(kind),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    model = model_cls(config).to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


def build_qwen_processor(kind: str) -> Any:
    """The family's processor with a tiny offline tokenizer and the PIL image processor (no video processor)."""
    base = _CLASSES[kind][2]

    class OfflineProcessor(base):  # type: ignore[misc, valid-type]
        # The stock check wants the torchvision video processor class, which cannot be imported here.
        def check_argument_for_proper_class(self, *args: Any, **kwargs: Any) -> None:
            return None

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    OfflineProcessor.__name__ = base.__name__
    return OfflineProcessor(image_processor=image_processor, tokenizer=build_qwen_tokenizer(), video_processor=None)


def build_onevision(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A tiny random ``LlavaOnevisionForConditionalGeneration`` (SigLIP 28 px / patch 4: 49 tokens a view)."""
    torch.manual_seed(seed)
    text = text_config(num_layers).to_dict()
    text.update(model_type="qwen2", layer_types=None)
    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 4,
            "vision_use_head": False,
        },
        text_config=text,
        image_token_index=OV_IMAGE_ID,
        video_token_index=OV_VIDEO_ID,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


def build_onevision_processor() -> Any:
    """``LlavaOnevisionProcessor`` with the tiny offline tokenizer and the PIL image processor (no video processor)."""

    class OfflineProcessor(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, *args: Any, **kwargs: Any) -> None:
            return None

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]
    )
    OfflineProcessor.__name__ = LlavaOnevisionProcessor.__name__
    return OfflineProcessor(
        image_processor=image_processor,
        tokenizer=build_qwen_tokenizer(),
        video_processor=None,
        num_image_tokens=49,
        vision_feature_select_strategy="full",
    )


def add_videos(
    kind: str, processor: Any, prompts: list[str], images: list[Image.Image] | None, videos: list[tuple[int, int, int]]
) -> BatchFeature:
    """Processor outputs for prompts with images and videos; each video placeholder takes one video.

    Qwen families: a video is given by its grid ``(frames, height, width)`` in patches after temporal merging
    (``height`` and ``width`` even) and placeholder :data:`VIDEO`; Qwen3-VL prompts get a timestamp and their own
    vision start/end tokens per frame, as the Qwen3-VL processor writes them. LLaVA-OneVision: placeholder
    :data:`OV_VIDEO`, only ``frames`` is used (28 px frames; all videos of a batch need the same number of frames).
    A video's pixels are random but depend on its shape only, so a video is the same alone or in any batch.
    """
    placeholder = OV_VIDEO if kind == ONEVISION else VIDEO
    queue = list(videos)
    expanded = []
    for prompt in prompts:
        pieces = prompt.split(placeholder)
        text = pieces[0]
        for piece in pieces[1:]:
            frames, height, width = queue.pop(0)
            if kind == ONEVISION:
                text += " ".join([_VIDEO_STANDIN] * (frames * 16 + 1))  # 4 x 4 pooled tokens a frame, one newline
            else:
                per_frame = " ".join([_VIDEO_STANDIN] * (height * width // 4))
                if kind == "qwen3_vl":
                    frames_text = (f"{TIMESTAMPS[t]} {VISION_START} {per_frame} {VISION_END}" for t in range(frames))
                    text += " ".join(frames_text)
                else:
                    text += f"{VISION_START} {' '.join([per_frame] * frames)} {VISION_END}"
            text += piece
        expanded.append(text)
    if queue:
        raise ValueError(f"{len(videos)} videos for {len(videos) - len(queue)} video placeholders")
    inputs = processor(images=images or None, text=expanded, return_tensors="pt", padding=True)
    standin = inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(_VIDEO_STANDIN)
    inputs["input_ids"] = inputs["input_ids"].masked_fill(
        standin, OV_VIDEO_ID if kind == ONEVISION else VIDEO_TOKEN_ID
    )
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"].masked_fill(standin, 2)
    if not videos:
        return inputs

    def pixels(t: int, h: int, w: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(*shape, generator=torch.Generator().manual_seed(t * 10_000 + h * 100 + w))

    if kind == ONEVISION:
        inputs["pixel_values_videos"] = torch.stack([pixels(t, h, w, (t, 3, 28, 28)) for t, h, w in videos])
    else:
        inputs["pixel_values_videos"] = torch.cat(
            [pixels(t, h, w, (t * h * w, 3 * 2 * 14 * 14)) for t, h, w in videos]
        )
        inputs["video_grid_thw"] = torch.tensor(videos, dtype=torch.long)
    return inputs


__all__ = [
    "IMAGE",
    "ONEVISION",
    "OV_IMAGE",
    "OV_VIDEO",
    "QWEN_KINDS",
    "VIDEO",
    "add_videos",
    "build_onevision",
    "build_onevision_processor",
    "build_qwen",
    "build_qwen_processor",
    "build_qwen_tokenizer",
    "random_image",
]
