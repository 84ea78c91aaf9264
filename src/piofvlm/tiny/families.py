"""Tiny random models of the families added for issue 13, with inputs in their processors' layouts (no hub).

Each family has a :class:`TinyFamily`: a builder (random weights from a config), an offline processor where one can be
built without torchvision (video processors need it, SmolVLM's processor needs ``num2words``: those inputs are
written here in the processor's layout), and three standard samples mirroring ``tests/test_qwen.py``: one image; an
image and a video (a second image where the family has no video); two images of different sizes. :func:`tiny_case`
gives ``(model, inputs)`` for ``piofvlm.tiny.cases.TINY_CASES`` (``piofvlm doctor``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import (
    BatchFeature,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessorPil,
    Glm4vProcessor,
    Glm46VConfig,
    Glm46VForConditionalGeneration,
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlavaNextImageProcessorPil,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessorPil,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
)

from piofvlm import transformers_compat
from piofvlm.tiny import qwen as toy_qwen
from piofvlm.tiny.llava import WORDS, random_image, text_config, word_level_tokenizer

#: Placeholder of an image / a video in the standard prompts; replaced by each family's own placeholder.
IMAGE, VIDEO = "{image}", "{video}"
#: (prompt, image sizes (width, height), video frames) of the standard samples.
SAMPLES: list[tuple[str, list[tuple[int, int]], list[int]]] = [
    (f"USER : {IMAGE} what is the colour of the circle ? ASSISTANT :", [(32, 32)], []),
    (f"USER : {IMAGE} left {VIDEO} how many ? ASSISTANT :", [(64, 32)], [2]),
    (
        f"USER : {IMAGE} right {IMAGE} describe this picture please , count the small objects . ASSISTANT :",
        [(40, 60), (32, 32)],
        [],
    ),
]


@dataclass(frozen=True)
class TinyFamily:
    """A tiny model of one family and its standard inputs."""

    model_type: str
    build: Callable[..., torch.nn.Module]  # (attn="sdpa", num_layers=4, seed=0, dtype=float32) -> model
    inputs: Callable[[tuple[int, ...]], BatchFeature]  # standard samples ``indices`` -> a left-padded batch
    tokenizer: Callable[[], Any]
    #: Whether the family has a video placeholder of its own (else sample 1's "video" is a second image).
    has_video: bool
    #: Visual tokens of each item (image / video / frame, in prompt order) of each standard sample.
    counts: list[list[int]]
    #: Text token ids that may sit between the visual tokens of one item (Mistral 3's ``[IMG_BREAK]``).
    joiners: tuple[int, ...] = ()


def _model(cls: type, config: Any, attn: str, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


def _qwen2_text(num_layers: int) -> dict[str, Any]:
    text = text_config(num_layers).to_dict()
    text.update(model_type="qwen2", layer_types=None)
    return text


def _prompts(indices: tuple[int, ...], image: str, video: str | None) -> list[str]:
    return [SAMPLES[i][0].replace(IMAGE, image).replace(VIDEO, video or image) for i in indices]


def _images(indices: tuple[int, ...], as_video_image: bool) -> list[Image.Image]:
    """The images of the samples in prompt order; a video slot becomes a 32 px image when ``as_video_image``."""
    images = []
    for i in indices:
        prompt, sizes, frames = SAMPLES[i]
        sized = [random_image(10 * i + j, size) for j, size in enumerate(sizes)]
        if frames and as_video_image:
            sized.append(random_image(10 * i + 9, (32, 32)))
        images += sized
    return images


def _frames(i: int, count: int, side: int = 32) -> torch.Tensor:
    """``(count, 3, side, side)`` random frames of sample ``i``'s video (the same alone or in any batch)."""
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(1000 + i))


# --------------------------------------------------------------------------------------------------------- InternVL
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
INTERNVL_IMAGE_ID = 6


def build_internvl(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """InternVL with a 32 px / patch 4 tower: 8 x 8 patches, 4 x 4 = 16 tokens a tile after the pixel shuffle."""
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 4,
        },
        text_config=_qwen2_text(num_layers),
        image_token_id=INTERNVL_IMAGE_ID,
        image_seq_length=16,
    )
    return _model(InternVLForConditionalGeneration, config, attn, seed, dtype)


@functools.cache
def build_internvl_processor() -> InternVLProcessor:
    """``InternVLProcessor`` (GOT-OCR2 tiling, up to 4 tiles + thumbnail), tiny tokenizer, no video processor."""
    tokenizer = word_level_tokenizer([*INTERNVL_TOKENS, *WORDS], INTERNVL_TOKENS)
    tokenizer.start_image_token, tokenizer.end_image_token, tokenizer.context_image_token = INTERNVL_TOKENS[:3]
    tokenizer.video_token = INTERNVL_TOKENS[3]
    ids = tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS[:3])
    tokenizer.start_image_token_id, tokenizer.end_image_token_id, tokenizer.context_image_token_id = ids

    class OfflineProcessor(InternVLProcessor):
        def check_argument_for_proper_class(self, *args: Any, **kwargs: Any) -> None:
            return None  # the stock check wants the torchvision video processor

    OfflineProcessor.__name__ = InternVLProcessor.__name__
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    return OfflineProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, image_seq_length=16
    )


def internvl_inputs(indices: tuple[int, ...] = (0, 1, 2), use_processor: bool | None = None) -> BatchFeature:
    """The standard samples. Without videos the processor itself runs (``use_processor=None``); a video is written
    as the processor writes one (``FrameN: <img> ... </img>`` per frame, the frames' pixels at their place among the
    images' tiles), so prompts with a video are laid out here (``use_processor=False`` forces this path)."""
    processor = build_internvl_processor()
    has_video = any(SAMPLES[i][2] for i in indices)
    if not has_video and use_processor is not False:
        return processor(
            images=_images(indices, False),
            text=_prompts(indices, "<IMG_CONTEXT>", None),
            return_tensors="pt",
            padding=True,
        )
    context = processor.image_token
    prompts, pixels = [], []
    for i in indices:
        prompt, sizes, frames = SAMPLES[i]
        tiles = processor.image_processor(
            images=[random_image(10 * i + j, s) for j, s in enumerate(sizes)], return_tensors="pt"
        )
        per_image = list(tiles["pixel_values"].split(tiles["num_patches"].tolist()))
        text, images, videos = "", iter(zip(per_image, tiles["num_patches"], strict=True)), iter(frames)
        for piece in _split_keep(prompt):
            if piece == IMAGE:
                image_pixels, patches = next(images)
                text += f"<img>{context * (16 * int(patches))}</img>"
                pixels.append(image_pixels)
            elif piece == VIDEO:
                count = next(videos)
                text += "\n".join(f"Frame{t + 1}: <img>{context * 16}</img>" for t in range(count))
                pixels.append(_frames(i, count))
            else:
                text += piece
        prompts.append(text)
    inputs = processor.tokenizer(prompts, return_tensors="pt", padding=True)
    return BatchFeature({**inputs, "pixel_values": torch.cat(pixels)})


def _split_keep(prompt: str) -> list[str]:
    """``prompt`` cut before and after every :data:`IMAGE` / :data:`VIDEO` placeholder, placeholders kept."""
    pieces = [prompt]
    for placeholder in (IMAGE, VIDEO):
        pieces = [part for piece in pieces for part in _interleave(piece.split(placeholder), placeholder)]
    return [piece for piece in pieces if piece]


def _interleave(parts: list[str], separator: str) -> list[str]:
    out = [parts[0]]
    for part in parts[1:]:
        out += [separator, part]
    return out


# ------------------------------------------------------------------------------------------------- LLaVA-NeXT-Video
LNV_TOKENS = ["<image>", "<video>"]
LNV_IMAGE_ID, LNV_VIDEO_ID = 4, 5
LNV_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
#: Stands for a video token while the processor tokenizes (it refuses video tokens without a video processor).
VIDEO_STANDIN = "<video_standin>"


def build_llava_next_video(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """CLIP 32 px / patch 4 (8 x 8 patches a view), anyres up to 64 px; videos pooled 2 x 2: 16 tokens a frame."""
    config = LlavaNextVideoConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 4,
        },
        text_config=text_config(num_layers).to_dict(),
        image_token_index=LNV_IMAGE_ID,
        video_token_index=LNV_VIDEO_ID,
        image_grid_pinpoints=LNV_PINPOINTS,
        spatial_pool_stride=2,
    )
    return _model(LlavaNextVideoForConditionalGeneration, config, attn, seed, dtype)


@functools.cache
def build_llava_next_video_processor() -> LlavaNextVideoProcessor:
    """``LlavaNextVideoProcessor`` with the PIL image processor; videos: :func:`llava_next_video_inputs`."""

    class OfflineProcessor(LlavaNextVideoProcessor):
        def check_argument_for_proper_class(self, *args: Any, **kwargs: Any) -> None:
            return None

    OfflineProcessor.__name__ = LlavaNextVideoProcessor.__name__
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=LNV_PINPOINTS
    )
    return OfflineProcessor(
        video_processor=None,
        image_processor=image_processor,
        tokenizer=word_level_tokenizer([*LNV_TOKENS, *WORDS, VIDEO_STANDIN], LNV_TOKENS),
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def llava_next_video_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """Images through the processor; a video's ``<video>`` expanded to ``frames * 16`` tokens as
    ``replace_video_token`` does, its frames in ``pixel_values_videos`` ``(videos, frames, 3, 32, 32)``."""
    processor = build_llava_next_video_processor()
    prompts = []
    for i in indices:
        prompt = SAMPLES[i][0].replace(IMAGE, "<image>")
        for frames in SAMPLES[i][2]:
            prompt = prompt.replace(VIDEO, " ".join(["<video>"] * (frames * 16)), 1)
        prompts.append(prompt)
    # The processor refuses video tokens without a video processor: they stand in as another word while it runs.
    standin = [p.replace("<video>", VIDEO_STANDIN) for p in prompts]
    inputs = processor(images=_images(indices, False), text=standin, return_tensors="pt", padding=True)
    standin_id = processor.tokenizer.convert_tokens_to_ids(VIDEO_STANDIN)
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == standin_id, LNV_VIDEO_ID)
    videos = [_frames(i, frames) for i in indices for frames in SAMPLES[i][2]]
    if videos:
        inputs["pixel_values_videos"] = torch.stack(videos)
    return inputs


# ---------------------------------------------------------------------------------------------------------- Mistral 3
MISTRAL3_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL3_IMAGE_ID = 4


def build_mistral3(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Pixtral patch 4 + 2 x 2 patch merger: one ``[IMG]`` token per 8 x 8 pixels; a Mistral text model."""
    text = text_config(num_layers).to_dict()
    text.update(model_type="mistral", sliding_window=None, head_dim=16)
    config = Mistral3Config(
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
        image_token_index=MISTRAL3_IMAGE_ID,
        spatial_merge_size=2,
        projector_hidden_act="gelu",
    )
    return _model(Mistral3ForConditionalGeneration, config, attn, seed, dtype)


@functools.cache
def build_mistral3_image_processor() -> PixtralImageProcessorPil:
    """Pixtral's PIL image processor (images up to 64 px, sides multiples of 8). ``PixtralProcessor`` itself needs
    torchvision, so :func:`mistral3_inputs` writes its text layout (``replace_image_token``)."""
    return PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8})


@functools.cache
def build_mistral3_tokenizer() -> Any:
    return word_level_tokenizer([*MISTRAL3_TOKENS, *WORDS], MISTRAL3_TOKENS)


def mistral3_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """As ``PixtralProcessor`` lays them out: per image ``rows`` rows of ``cols`` ``[IMG]`` tokens, each row closed by
    ``[IMG_BREAK]`` except the last, closed by ``[IMG_END]``. Mistral 3 has no video placeholder: sample 1's video
    slot is a second image."""
    images = _images(indices, True)
    pixels = build_mistral3_image_processor()(images=images, return_tensors="pt")
    sizes = iter(pixels["image_sizes"].tolist())
    prompts = []
    for prompt in _prompts(indices, IMAGE, None):
        pieces = prompt.split(IMAGE)
        text = pieces[0]
        for piece in pieces[1:]:
            height, width = next(sizes)
            rows = [["[IMG]"] * (width // 8) + ["[IMG_BREAK]"] for _ in range(height // 8)]
            tokens = [token for row in rows for token in row]
            tokens[-1] = "[IMG_END]"
            text += "".join(tokens) + piece
        prompts.append(text)
    inputs = build_mistral3_tokenizer()(prompts, return_tensors="pt", padding=True)
    return BatchFeature({**inputs, "pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]})


# ------------------------------------------------------------------------------------------------ SmolVLM / Idefics3
SMOLVLM_TOKENS = [
    "<fake_token_around_image>",
    "<global-img>",
    "<image>",
    *(f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)),
]
SMOLVLM_IMAGE_ID = 6
#: The tiny vision tower of SmolVLM and Idefics3: 32 px / patch 4 (8 x 8 patches); pixel shuffle 2 gives 16 tokens.
PIXEL_SHUFFLE_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 4,
}


def _pixel_shuffle_model(
    config_cls: type, model_cls: type, attn: str, num_layers: int, seed: int, dtype: torch.dtype
) -> torch.nn.Module:
    """A SmolVLM-layout model (SmolVLM, Idefics3) with :data:`PIXEL_SHUFFLE_TOWER` and the toy Llama text model."""
    config = config_cls(
        vision_config=dict(PIXEL_SHUFFLE_TOWER),
        text_config=text_config(num_layers).to_dict(),
        image_token_id=SMOLVLM_IMAGE_ID,
        scale_factor=2,
    )
    return _model(model_cls, config, attn, seed, dtype)


def build_smolvlm(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """SigLIP-style 32 px / patch 4 tower (8 x 8 patches), pixel shuffle 2: 16 ``<image>`` tokens a tile."""
    return _pixel_shuffle_model(SmolVLMConfig, SmolVLMForConditionalGeneration, attn, num_layers, seed, dtype)


@functools.cache
def build_smolvlm_image_processor() -> SmolVLMImageProcessorPil:
    """Tiles of 32 px, images resized to at most 64 px (up to 2 x 2 tiles + the global view)."""
    return SmolVLMImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, return_row_col_info=True
    )


@functools.cache
def build_smolvlm_tokenizer() -> Any:
    return word_level_tokenizer([*SMOLVLM_TOKENS, *WORDS], SMOLVLM_TOKENS)


def smolvlm_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """As ``SmolVLMProcessor`` lays them out (it needs ``num2words``, not installed here): each image expanded by its
    ``get_image_prompt_string``; pixel values ``(B, tiles, 3, 32, 32)`` zero-padded. SmolVLM writes a video as frames
    of images with timestamps; the standard sample 1 uses a second image instead."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    processor = build_smolvlm_image_processor()
    images = [[random_image(10 * i + j, s) for j, s in enumerate(SAMPLES[i][1])] for i in indices]
    for sample, i in zip(images, indices, strict=True):
        if SAMPLES[i][2]:
            sample.append(random_image(10 * i + 9, (32, 32)))
    pixels = processor(images=images, return_tensors="pt")
    prompts = []
    for b, prompt in enumerate(_prompts(indices, IMAGE, None)):
        pieces = prompt.split(IMAGE)
        text = pieces[0]
        for j, piece in enumerate(pieces[1:]):
            rows, cols = pixels["rows"][b][j], pixels["cols"][b][j]
            text += get_image_prompt_string(rows, cols, 16, "<fake_token_around_image>", "<image>", "<global-img>")
            text += piece
        prompts.append(text)
    inputs = build_smolvlm_tokenizer()(prompts, return_tensors="pt", padding=True)
    return BatchFeature(
        {**inputs, "pixel_values": pixels["pixel_values"], "pixel_attention_mask": pixels["pixel_attention_mask"]}
    )


def build_idefics3(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Idefics3 with the same tiny tower as :func:`build_smolvlm`: 16 ``<image>`` tokens a tile, Llama text model."""
    return _pixel_shuffle_model(Idefics3Config, Idefics3ForConditionalGeneration, attn, num_layers, seed, dtype)


@functools.cache
def build_idefics3_processor() -> Idefics3Processor:
    """The stock ``Idefics3Processor`` (it needs neither torchvision nor ``num2words``): 32 px tiles, images resized
    to at most 64 px. It adds ``<end_of_utterance>`` to the tokenizer, so it owns its tokenizer (cached)."""
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    tokenizer = word_level_tokenizer([*SMOLVLM_TOKENS, *WORDS], SMOLVLM_TOKENS)
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16)


def idefics3_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``Idefics3Processor`` itself; sample 1's video slot is a second image (Idefics3
    has no video input)."""
    images = [[random_image(10 * i + j, s) for j, s in enumerate(SAMPLES[i][1])] for i in indices]
    for sample, i in zip(images, indices, strict=True):
        if SAMPLES[i][2]:
            sample.append(random_image(10 * i + 9, (32, 32)))
    return build_idefics3_processor()(
        images=images, text=_prompts(indices, "<image>", None), return_tensors="pt", padding=True
    )


# ---------------------------------------------------------------------------------------------------- GLM-4.xV
GLM_TOKENS = [
    "<|image|>",
    "<|video|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]
GLM_IMAGE_ID = 4
#: Frame timestamps (seconds) the processor writes after each video frame; a stand-in for video tokens.
GLM_TIMESTAMPS = [str(t) for t in range(8)]
GLM_VIDEO_STANDIN = "<glm_video_standin>"
#: Tokens of each image of the standard samples (dynamic resolution: 36 to 45 tokens).
GLM_COUNTS = [[36], [45, 36], [40, 36]]
#: Video-only samples (stock GLM-4.xV takes no image and video in one call): grids ``(frames, h, w)`` in patches
#: after temporal merging: 12, 9 and 12 tokens (frames of 6, 9 and 4 tokens).
GLM_VIDEOS: list[tuple[int, int, int]] = [(2, 4, 6), (1, 6, 6), (3, 4, 4)]


def build_glm4v(
    attn: str = "sdpa",
    num_layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    model_type: str = "glm4v",
) -> torch.nn.Module:
    """GLM-4.1V (``model_type="glm4v"``) or GLM-4.6V (``"glm46v"``, the same text model): 14 px patches merged 2 x 2;
    head_dim 32 with ``partial_rotary_factor`` 0.5 (16 rotated dims, M-RoPE sections 2/3/3)."""
    names = ("image", "video", "image_start", "image_end", "video_start", "video_end")
    ids = dict(zip(names, range(4, 10), strict=True))
    config_cls, model_cls = (
        (Glm4vConfig, Glm4vForConditionalGeneration)
        if model_type == "glm4v"
        else (Glm46VConfig, Glm46VForConditionalGeneration)
    )
    config = config_cls(
        text_config={
            "model_type": "glm4v_text",
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "pad_token_id": 0,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "partial_rotary_factor": 0.5,
            },
        },
        vision_config={
            "model_type": "glm4v_vision",
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "image_size": 28,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
        },
        **{f"{name}_token_id": value for name, value in ids.items()},
    )
    return _model(model_cls, config, attn, seed, dtype)


@functools.cache
def build_glm4v_processor() -> Glm4vProcessor:
    """``Glm4vProcessor`` with the PIL image processor (images scaled up to at least 168 x 168 px) and no video
    processor (it needs torchvision): :func:`glm4v_video_inputs` writes videos in its layout."""

    class OfflineProcessor(Glm4vProcessor):
        def check_argument_for_proper_class(self, *args: Any, **kwargs: Any) -> None:
            return None  # the stock check wants the torchvision video processor

    OfflineProcessor.__name__ = Glm4vProcessor.__name__
    tokenizer = word_level_tokenizer([*GLM_TOKENS, *WORDS, *GLM_TIMESTAMPS, GLM_VIDEO_STANDIN], GLM_TOKENS)
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": 2 * 168 * 168, "longest_edge": 2 * 28 * 28 * 400})
    return OfflineProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


def glm4v_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``Glm4vProcessor``; sample 1's video slot is a second image (stock GLM-4.xV takes
    no image and video in one call; videos: :func:`glm4v_video_inputs`)."""
    return build_glm4v_processor()(
        images=_images(indices, True), text=_prompts(indices, "<|image|>", None), return_tensors="pt", padding=True
    )


def glm4v_video_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """Video-only prompts with the videos :data:`GLM_VIDEOS` ``[i]``, as ``Glm4vProcessor.replace_video_token``
    writes them: ``<|begin_of_video|>`` + per frame ``<|begin_of_image|>`` + ``<|image|>`` x ``h * w / 4`` +
    ``<|end_of_image|>`` + its timestamp, then ``<|end_of_video|>``; ``mm_token_type_ids`` 2 on the frames' tokens."""
    processor = build_glm4v_processor()
    prompts = []
    for i in indices:
        frames, height, width = GLM_VIDEOS[i]
        tokens = " ".join([GLM_VIDEO_STANDIN] * (height * width // 4))
        video = " ".join(f"<|begin_of_image|> {tokens} <|end_of_image|> {GLM_TIMESTAMPS[t]}" for t in range(frames))
        prompts.append(f"USER : <|begin_of_video|> {video} <|end_of_video|> how many ? ASSISTANT :")
    inputs = processor(text=prompts, return_tensors="pt", padding=True)
    standin = inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(GLM_VIDEO_STANDIN)
    inputs["input_ids"] = inputs["input_ids"].masked_fill(standin, GLM_IMAGE_ID)
    inputs["mm_token_type_ids"] = torch.where(standin, 2, 0)
    grids = [GLM_VIDEOS[i] for i in indices]
    inputs["pixel_values_videos"] = torch.cat(
        [
            torch.rand(t * h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(t * 10_000 + h * 100 + w))
            for t, h, w in grids
        ]
    )
    inputs["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return inputs


# ---------------------------------------------------------------------------------------------------------- Gemma 3
GEMMA3_TOKENS = ["<image_soft_token>", "<start_of_image>", "<end_of_image>"]
GEMMA3_IMAGE_ID, GEMMA3_BOI_ID, GEMMA3_EOI_ID = 4, 5, 6
#: Sliding window of the tiny Gemma 3's local layers: shorter than every standard prompt (36-51 tokens), so pruning
#: changes what a window covers; long enough that the last prompt tokens still see an image (PIO's proxy at a local
#: layer).
GEMMA3_WINDOW = 16


def build_gemma3(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Gemma 3 with a SigLIP 32 px / patch 4 tower (8 x 8 patches, pooled 2 x 2: 16 tokens an image), local and global
    layers alternating (local first), a 16-slot window, local and global RoPE bases 10^4 and 10^6."""
    config = Gemma3Config(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 4,
        },
        text_config={
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "max_position_embeddings": 1024,
            "sliding_window": GEMMA3_WINDOW,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        mm_tokens_per_image=16,
        image_token_id=GEMMA3_IMAGE_ID,
        boi_token_index=GEMMA3_BOI_ID,
        eoi_token_index=GEMMA3_EOI_ID,
    )
    return _model(Gemma3ForConditionalGeneration, config, attn, seed, dtype)


@functools.cache
def build_gemma3_processor() -> Gemma3Processor:
    """``Gemma3Processor`` (PIL image processor, 32 px, no pan-and-scan) over the tiny tokenizer: an image is written
    ``<start_of_image>`` + 16 ``<image_soft_token>`` + ``<end_of_image>``, with ``token_type_ids`` 1 on the image
    tokens (the bidirectional blocks)."""
    tokenizer = word_level_tokenizer([*GEMMA3_TOKENS, *WORDS], GEMMA3_TOKENS)
    tokenizer.image_token, tokenizer.boi_token, tokenizer.eoi_token = GEMMA3_TOKENS
    tokenizer.image_token_id, tokenizer.boi_token_id, tokenizer.eoi_token_id = (
        GEMMA3_IMAGE_ID,
        GEMMA3_BOI_ID,
        GEMMA3_EOI_ID,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16)


def gemma3_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``Gemma3Processor``; Gemma 3 has no video: sample 1's video is a second image."""
    processor = build_gemma3_processor()
    images = [[random_image(10 * i + j, size) for j, size in enumerate(SAMPLES[i][1])] for i in indices]
    for i, sample_images in zip(indices, images, strict=True):
        if SAMPLES[i][2]:
            sample_images.append(random_image(10 * i + 9, (32, 32)))
    return processor(
        images=images, text=_prompts(indices, "<start_of_image>", None), return_tensors="pt", padding=True
    )


# ---------------------------------------------------------------------------------------------------------- Gemma 4
GEMMA4_TOKENS = ["<|image|>", "<|image>", "<image|>"]
GEMMA4_IMAGE_ID, GEMMA4_BOI_ID, GEMMA4_EOI_ID = 4, 5, 6
#: Sliding window of the tiny Gemma 4's local layers (shorter than every standard prompt, as Gemma 3's).
GEMMA4_WINDOW = 16
GEMMA4_PATCH, GEMMA4_POOL = 4, 2
#: Per sample: each image's patch grid (height, width) after the processor's aspect-preserving resize; an image is
#: ``h * w / POOL**2`` soft tokens (variable counts, as Gemma 4's processor gives).
GEMMA4_GRIDS: list[list[tuple[int, int]]] = [[(8, 8)], [(8, 16), (8, 8)], [(12, 8), (8, 8)]]
GEMMA4_COUNTS = [[h * w // GEMMA4_POOL**2 for h, w in grids] for grids in GEMMA4_GRIDS]


def gemma4_layer_types(num_layers: int) -> list[str]:
    """``num_layers`` computing layers, local and global alternating and ending on a global one, then one KV-shared
    global layer (Gemma 4 forces the last layer global) that reads the keys of the last computing one."""
    types = ["full_attention" if (num_layers - 1 - i) % 2 == 0 else "sliding_attention" for i in range(num_layers)]
    return [*types, "full_attention"]


def build_gemma4(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Gemma 4 with a tiny vision tower (4 px patches pooled 2 x 2), ``num_layers`` computing decoder layers (local and
    global alternating, a 16-slot window, bidirectional image blocks in local layers) plus one KV-shared layer
    (``num_kv_shared_layers=1``: it reads the last global layer's keys), per-layer inputs of 8 dims a layer."""
    layer_types = gemma4_layer_types(num_layers)
    config = Gemma4Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "patch_size": GEMMA4_PATCH,
            "pooling_kernel_size": GEMMA4_POOL,
            "position_embedding_size": 64,
        },
        text_config={
            "vocab_size": 64,
            "vocab_size_per_layer_input": 64,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": len(layer_types),
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "global_head_dim": 32,
            "hidden_size_per_layer_input": 8,
            "num_kv_shared_layers": 1,
            "max_position_embeddings": 1024,
            "sliding_window": GEMMA4_WINDOW,
            "layer_types": layer_types,
            "use_bidirectional_attention": "vision",
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        audio_config=None,
        image_token_id=GEMMA4_IMAGE_ID,
        boi_token_id=GEMMA4_BOI_ID,
        eoi_token_id=GEMMA4_EOI_ID,
        video_token_id=7,
        audio_token_id=8,
    )
    return _model(Gemma4ForConditionalGeneration, config, attn, seed, dtype)


@functools.cache
def build_gemma4_tokenizer() -> Any:
    return word_level_tokenizer([*GEMMA4_TOKENS, "<|video|>", "<|audio|>", *WORDS], GEMMA4_TOKENS)


def gemma4_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples in ``Gemma4Processor``'s layout, hand-built (its processor also needs a video processor
    and a feature extractor): an image is ``<|image>`` + ``<|image|>`` x soft tokens + ``<image|>``,
    ``mm_token_type_ids`` 1 on the soft tokens; ``pixel_values`` ``(images, max_patches, 3 * patch**2)`` and
    ``image_position_ids`` ``(images, max_patches, 2)`` (x, y) per patch, padding patches at (-1, -1)."""
    tokenizer = build_gemma4_tokenizer()
    prompts, grids = [], []
    for i in indices:
        parts = SAMPLES[i][0].replace(VIDEO, IMAGE).split(IMAGE)
        text = parts[0]
        for (h, w), part in zip(GEMMA4_GRIDS[i], parts[1:], strict=True):
            soft = " ".join([GEMMA4_TOKENS[0]] * (h * w // GEMMA4_POOL**2))
            text += f"{GEMMA4_TOKENS[1]} {soft} {GEMMA4_TOKENS[2]}" + part
        prompts.append(text)
        grids += [(h, w, 10 * i + j) for j, (h, w) in enumerate(GEMMA4_GRIDS[i])]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == GEMMA4_IMAGE_ID).long()
    max_patches = max(h * w for grid in GEMMA4_GRIDS for h, w in grid)
    pixels = torch.zeros(len(grids), max_patches, 3 * GEMMA4_PATCH**2)
    positions = torch.full((len(grids), max_patches, 2), -1, dtype=torch.long)
    for n, (h, w, seed) in enumerate(grids):  # an image's pixels depend on its sample and place only
        generator = torch.Generator().manual_seed(seed)
        pixels[n, : h * w] = torch.rand(h * w, 3 * GEMMA4_PATCH**2, generator=generator)
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        positions[n, : h * w] = torch.stack([x.flatten(), y.flatten()], -1)
    inputs["pixel_values"] = pixels
    inputs["image_position_ids"] = positions
    return BatchFeature(dict(inputs))


# ------------------------------------------------------------------------------------------------------- Qwen3.5
#: The tiny Qwen3.5's decoder: linear attention and full attention alternate, so prune points, PIO proxies and
#: attention-reading methods meet both kinds in the standard matrices. The released checkpoints' pattern (3 linear
#: : 1 full) is ``layer_types=None`` (``full_attention_interval`` 4), used by ``tests/test_qwen3_5.py``.
QWEN3_5_LAYER_TYPES = ("linear_attention", "full_attention")
#: Per sample: images (16 tokens; 18 and a 2-frame video of 12; 15 and 8), as Qwen3-VL's standard samples.
QWEN3_5_COUNTS = [[16], [18, 12], [15, 8]]
QWEN3_5_SAMPLES: list[tuple[str, list[tuple[int, int]], list[tuple[int, int, int]]]] = [
    ("USER : {image} what is the colour of the circle ? ASSISTANT :", [(112, 112)], []),
    ("USER : {image} left {video} how many ? ASSISTANT :", [(168, 84)], [(2, 4, 6)]),
    (
        "USER : {image} right {image} describe this picture please , count the small objects . ASSISTANT :",
        [(84, 140), (112, 56)],
        [],
    ),
]


def build_qwen3_5(
    attn: str = "sdpa",
    num_layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layer_types: list[str] | None = None,
) -> torch.nn.Module:
    """Qwen3.5 with Qwen3-VL's tiny vision tower (14 px patches merged 2 x 2, no deepstack); head_dim 32 with
    ``partial_rotary_factor`` 0.5 (16 rotated dims, interleaved M-RoPE sections 2/3/3) and gated attention; Gated
    DeltaNet layers with 2 key / 4 value heads of 16 dims and a conv kernel of 4. ``layer_types``: default
    :data:`QWEN3_5_LAYER_TYPES` repeated; ``[]`` for the checkpoints' 3 : 1 pattern."""
    if layer_types is None:
        layer_types = [QWEN3_5_LAYER_TYPES[i % 2] for i in range(num_layers)]
    config = Qwen3_5Config(
        text_config={
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 1024,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "layer_types": list(layer_types) or None,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
                "partial_rotary_factor": 0.5,
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
        },
        image_token_id=toy_qwen.IMAGE_TOKEN_ID,
        video_token_id=toy_qwen.VIDEO_TOKEN_ID,
        vision_start_token_id=toy_qwen.VISION_START_ID,
        vision_end_token_id=toy_qwen.VISION_END_ID,
    )
    model = _model(Qwen3_5ForConditionalGeneration, config, attn, seed, dtype)
    # Slow decays (A in [0.01, 0.1], a state keeps a token for tens of steps) instead of the init's [0.01, 16]: with
    # the init most heads forget a token within a few steps, the proxy gradient of far visual tokens through a linear
    # layer falls to rounding noise (1e-10) and PIO's ranking through it would be a draw of ties.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "linear_attn"):
                rates = torch.empty(layer.linear_attn.A_log.shape).uniform_(0.01, 0.1, generator=generator)
                layer.linear_attn.A_log.copy_(rates.log())
    return model


def qwen3_5_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``Qwen3VLProcessor`` (Qwen3.5's processor) with the PIL image processor; a video
    is written as that processor writes it (per frame a timestamp and its own vision start / end tokens), its random
    frames in ``pixel_values_videos`` (``toy_qwen.add_videos``; the video processor needs torchvision)."""
    samples = [QWEN3_5_SAMPLES[i] for i in indices]
    prompts = [prompt.format(image=toy_qwen.IMAGE, video=toy_qwen.VIDEO) for prompt, _, _ in samples]
    images = [random_image(10 * i + j, size) for i in indices for j, size in enumerate(QWEN3_5_SAMPLES[i][1])]
    videos = [grid for _, _, grids in samples for grid in grids]
    return toy_qwen.add_videos("qwen3_vl", toy_qwen.build_qwen_processor("qwen3_vl"), prompts, images, videos)


# -------------------------------------------------------------------------------------------------------- registry
FAMILIES: dict[str, TinyFamily] = {
    "internvl": TinyFamily(
        "internvl",
        build_internvl,
        internvl_inputs,
        lambda: build_internvl_processor().tokenizer,
        has_video=False,  # a video is frames written as images: each frame is an item of its own
        counts=[[16], [48, 16, 16], [48, 16]],
    ),
    "llava_next_video": TinyFamily(
        "llava_next_video",
        build_llava_next_video,
        llava_next_video_inputs,
        lambda: build_llava_next_video_processor().tokenizer,
        has_video=True,
        counts=[[136], [200, 32], [240, 136]],
    ),
    "mistral3": TinyFamily(
        "mistral3",
        build_mistral3,
        mistral3_inputs,
        build_mistral3_tokenizer,
        has_video=False,
        counts=[[16], [32, 16], [40, 16]],
        joiners=(5,),  # [IMG_BREAK]: text inside an image's tokens
    ),
    "smolvlm": TinyFamily(
        "smolvlm",
        build_smolvlm,
        smolvlm_inputs,
        build_smolvlm_tokenizer,
        has_video=False,
        counts=[[16] * 5, [16] * 8, [16] * 10],  # every tile and global view is an item
    ),
    "idefics3": TinyFamily(
        "idefics3",
        build_idefics3,
        idefics3_inputs,
        lambda: build_idefics3_processor().tokenizer,
        has_video=False,
        counts=[[16] * 5, [16] * 8, [16] * 10],  # as SmolVLM: every tile and global view is an item
    ),
    "gemma3": TinyFamily(
        "gemma3",
        build_gemma3,
        gemma3_inputs,
        lambda: build_gemma3_processor().tokenizer,
        has_video=False,
        counts=[[16], [16, 16], [16, 16]],
    ),
    "gemma4": TinyFamily(
        "gemma4",
        build_gemma4,
        gemma4_inputs,
        build_gemma4_tokenizer,
        has_video=False,
        counts=GEMMA4_COUNTS,
    ),
    **{
        kind: TinyFamily(
            kind,
            functools.partial(build_glm4v, model_type=kind),
            glm4v_inputs,
            lambda: build_glm4v_processor().tokenizer,
            has_video=False,  # videos come alone: glm4v_video_inputs
            counts=GLM_COUNTS,
        )
        for kind in ("glm4v", "glm46v")
    },
    "qwen3_5": TinyFamily(
        "qwen3_5",
        build_qwen3_5,
        qwen3_5_inputs,
        toy_qwen.build_qwen_tokenizer,
        has_video=True,
        counts=QWEN3_5_COUNTS,
    ),
}


#: Families whose tiny inputs cannot be built offline with the installed transformers, with the reason; they are left
#: out of :data:`FAMILIES` (so of the tests and of ``piofvlm doctor``'s self-test) on that release.
UNAVAILABLE: dict[str, str] = {}
for _kind, _processor in (("smolvlm", SmolVLMImageProcessorPil), ("idefics3", Idefics3ImageProcessorPil)):
    if not transformers_compat.pil_image_processor_usable(_processor):
        UNAVAILABLE[_kind] = (
            f"transformers {transformers_compat.TRANSFORMERS_VERSION}'s {_processor.__name__} needs torchvision "
            "(not installable here), so its tiny inputs cannot be built"
        )
        FAMILIES.pop(_kind)
if (_reason := transformers_compat.gemma4_unsupported_reason()) is not None:
    UNAVAILABLE["gemma4"] = _reason
    FAMILIES.pop("gemma4")


def tiny_case(model_type: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(model, inputs)`` for ``piofvlm.tiny.cases.TINY_CASES``: the family's tiny model (3 decoder layers) and its
    standard samples 0 and 1 (one image; an image and a video, or a second image), left-padded."""
    family = FAMILIES[model_type]
    return family.build(num_layers=3), dict(family.inputs((0, 1)))


# ------------------------------------------------------------------------------ MoE flagships (issue 24)
#: The tiny MoE feed-forward of the MoE flagships: 4 experts of 32 dims, top-2 routing (every layer MoE unless said).
MOE_EXPERTS, MOE_TOP_K, MOE_DIM = 4, 2, 32


def _decisive_routers(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Router weights at std 0.5 (the init's 0.02 leaves top-k margins near rounding on these 64-dim states, so a
    batch-vs-single or fast-vs-reference comparison could flip a routing decision by rounding alone). The experts
    run transformers' default ``grouped_mm`` kernel, ``eager`` in fp64 (``torch._grouped_mm`` takes no doubles)."""
    if next(model.parameters()).dtype == torch.float64 and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and not isinstance(gate, torch.nn.Linear):
                gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator) * 0.5)
    return model


def _transformers_class(name: str) -> Any:
    """``transformers.<name>``, or ``None`` where the installed release has no such class."""
    import transformers

    return getattr(transformers, name, None)


def build_qwen3_vl_moe(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Qwen3-VL-MoE: the tiny Qwen3-VL of ``tiny.qwen`` (interleaved M-RoPE, head_dim 16, deepstack after layers 0
    and 1) with an MoE block of :data:`MOE_EXPERTS` experts, top-:data:`MOE_TOP_K`, in every layer (as the
    checkpoints: ``mlp_only_layers=[]``, ``decoder_sparse_step=1``)."""
    text = toy_qwen._text_config("qwen3_vl", num_layers, vocab_size=64)
    text.update(
        num_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K, moe_intermediate_size=MOE_DIM, decoder_sparse_step=1
    )
    config = _transformers_class("Qwen3VLMoeConfig")(
        text_config=text,
        vision_config=toy_qwen._vision_config("qwen3_vl"),
        image_token_id=toy_qwen.IMAGE_TOKEN_ID,
        video_token_id=toy_qwen.VIDEO_TOKEN_ID,
        vision_start_token_id=toy_qwen.VISION_START_ID,
        vision_end_token_id=toy_qwen.VISION_END_ID,
    )
    model = _model(_transformers_class("Qwen3VLMoeForConditionalGeneration"), config, attn, seed, dtype)
    return _decisive_routers(model, seed)


def build_qwen3_5_moe(
    attn: str = "sdpa",
    num_layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layer_types: list[str] | None = None,
) -> torch.nn.Module:
    """Qwen3.5-MoE: the tiny Qwen3.5 of :func:`build_qwen3_5` (linear and gated full attention alternating, slow
    DeltaNet decays) with an MoE block of :data:`MOE_EXPERTS` experts, top-:data:`MOE_TOP_K`, and a sigmoid-gated
    shared expert of 32 dims in every layer."""
    dense = build_qwen3_5(attn, num_layers, seed, dtype, layer_types)  # its config, as a dict
    text = dense.config.text_config.to_dict()
    for key in ("model_type", "intermediate_size", "architectures", "dtype", "transformers_version"):
        text.pop(key, None)
    text.update(
        num_experts=MOE_EXPERTS,
        num_experts_per_tok=MOE_TOP_K,
        moe_intermediate_size=MOE_DIM,
        shared_expert_intermediate_size=MOE_DIM,
    )
    vision = dense.config.vision_config.to_dict()
    vision.pop("model_type", None)
    config = _transformers_class("Qwen3_5MoeConfig")(
        text_config=text,
        vision_config=vision,
        image_token_id=toy_qwen.IMAGE_TOKEN_ID,
        video_token_id=toy_qwen.VIDEO_TOKEN_ID,
        vision_start_token_id=toy_qwen.VISION_START_ID,
        vision_end_token_id=toy_qwen.VISION_END_ID,
    )
    model = _model(_transformers_class("Qwen3_5MoeForConditionalGeneration"), config, attn, seed, dtype)
    generator = torch.Generator().manual_seed(seed)  # slow decays, as build_qwen3_5 (see there)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "linear_attn"):
                rates = torch.empty(layer.linear_attn.A_log.shape).uniform_(0.01, 0.1, generator=generator)
                layer.linear_attn.A_log.copy_(rates.log().to(layer.linear_attn.A_log.dtype))
    return _decisive_routers(model, seed)


def build_glm4v_moe(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """GLM-4.5V: the tiny GLM-4.1V of :func:`build_glm4v` (its vision tower, token ids, M-RoPE sections and partial
    rotary) on a pre-norm decoder whose first layer is dense and the others MoE (``first_k_dense_replace=1``, as
    the checkpoint): :data:`MOE_EXPERTS` routed experts in 2 groups of which each token's best group is taken
    (``n_group=2``, ``topk_group=1``: the group-limited routing GLM's router implements), top-:data:`MOE_TOP_K`
    within it, sigmoid scores, one shared expert; attention biases on q/k/v as the checkpoint."""
    dense = build_glm4v(attn, num_layers, seed, dtype)
    text = dense.config.text_config.to_dict()
    for key in ("model_type", "architectures", "dtype", "transformers_version"):
        text.pop(key, None)
    text.update(
        n_routed_experts=MOE_EXPERTS,
        num_experts_per_tok=MOE_TOP_K,
        moe_intermediate_size=MOE_DIM,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        attention_bias=True,
    )
    vision = dense.config.vision_config.to_dict()
    vision.pop("model_type", None)
    ids = {
        key: getattr(dense.config, key)
        for key in (
            "image_token_id",
            "video_token_id",
            "image_start_token_id",
            "image_end_token_id",
            "video_start_token_id",
            "video_end_token_id",
        )
    }
    config = _transformers_class("Glm4vMoeConfig")(text_config=text, vision_config=vision, **ids)
    model = _model(_transformers_class("Glm4vMoeForConditionalGeneration"), config, attn, seed, dtype)
    return _decisive_routers(model, seed)


_MOE_FAMILIES: dict[str, TinyFamily] = {
    "qwen3_vl_moe": TinyFamily(
        "qwen3_vl_moe",
        build_qwen3_vl_moe,
        qwen3_5_inputs,  # Qwen3-VL's processor layout, as Qwen3.5's
        toy_qwen.build_qwen_tokenizer,
        has_video=True,
        counts=QWEN3_5_COUNTS,
    ),
    "qwen3_5_moe": TinyFamily(
        "qwen3_5_moe",
        build_qwen3_5_moe,
        qwen3_5_inputs,
        toy_qwen.build_qwen_tokenizer,
        has_video=True,
        counts=QWEN3_5_COUNTS,
    ),
    "glm4v_moe": TinyFamily(
        "glm4v_moe",
        build_glm4v_moe,
        glm4v_inputs,
        lambda: build_glm4v_processor().tokenizer,
        has_video=False,  # videos come alone: glm4v_video_inputs
        counts=GLM_COUNTS,
    ),
}
for _kind, _class_name in (
    ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"),
    ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration"),
    ("glm4v_moe", "Glm4vMoeForConditionalGeneration"),
):
    if _transformers_class(_class_name) is None:
        UNAVAILABLE[_kind] = f"transformers {transformers_compat.TRANSFORMERS_VERSION} has no {_class_name}"
    else:
        FAMILIES[_kind] = _MOE_FAMILIES[_kind]


# ---------------------------------------------------------------------------------------------------- ViP-LLaVA
def build_vipllava(
    attn: str = "sdpa",
    num_layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    feature_layers: int | list[int] | None = None,
) -> torch.nn.Module:
    """ViP-LLaVA with the tiny LLaVA's CLIP tower (28 px, patch 4: 49 tokens an image, [CLS] dropped) and Llama text
    model; features from vision layers ``feature_layers`` (default ``[-2, -1]``, concatenated; the checkpoints take
    five)."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    from piofvlm.tiny import llava as toy

    config = VipLlavaConfig(
        vision_config=toy.vision_config(),
        text_config=toy.text_config(num_layers),
        image_token_id=4,
        vision_feature_layers=[-2, -1] if feature_layers is None else feature_layers,
        projector_layernorm_eps=1e-5,
    )
    return _model(VipLlavaForConditionalGeneration, config, attn, seed, dtype)


def vipllava_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``LlavaProcessor`` (ViP-LLaVA's; CLIP resize and 28 px center crop); no video:
    sample 1's video is a second image."""
    from piofvlm.tiny import llava as toy

    return toy.build_processor("llava")(
        images=_images(indices, True), text=_prompts(indices, "<image>", None), return_tensors="pt", padding=True
    )


def build_vipllava_tokenizer() -> Any:
    from piofvlm.tiny import llava as toy

    return toy.build_tokenizer()


FAMILIES["vipllava"] = TinyFamily(
    "vipllava",
    build_vipllava,
    vipllava_inputs,
    build_vipllava_tokenizer,
    has_video=False,
    counts=[[49], [49, 49], [49, 49]],
)


# ----------------------------------------------------------------------------------------------------- Idefics2
#: Perceiver latents per image of the tiny Idefics2 (64 in the checkpoints).
IDEFICS2_LATENTS = 16


def build_idefics2(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Idefics2 with :data:`PIXEL_SHUFFLE_TOWER` (32 px, patch 4), a one-block perceiver resampler to
    :data:`IDEFICS2_LATENTS` latents and a Mistral text model (the toy Llama's sizes)."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    text = text_config(num_layers).to_dict()
    text.update(model_type="mistral", sliding_window=None)
    config = Idefics2Config(
        vision_config=dict(PIXEL_SHUFFLE_TOWER),
        perceiver_config={
            "hidden_size": text["hidden_size"],
            "resampler_n_latents": IDEFICS2_LATENTS,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 16,
            "num_key_value_heads": 1,
        },
        text_config=text,
        image_token_id=SMOLVLM_IMAGE_ID,
    )
    return _model(Idefics2ForConditionalGeneration, config, attn, seed, dtype)


@functools.cache
def build_idefics2_processor() -> Any:
    """The stock ``Idefics2Processor`` (PIL image processor, 32 px images, no splitting: one run of latents an
    image); it adds ``<end_of_utterance>`` to the tokenizer, so it owns its tokenizer (cached)."""
    from transformers import Idefics2ImageProcessorPil, Idefics2Processor

    image_processor = Idefics2ImageProcessorPil(
        size={"longest_edge": 32, "shortest_edge": 32}, do_image_splitting=False
    )
    tokenizer = word_level_tokenizer([*SMOLVLM_TOKENS, *WORDS], SMOLVLM_TOKENS)
    return Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IDEFICS2_LATENTS)


def idefics2_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples through ``Idefics2Processor`` itself; sample 1's video slot is a second image (Idefics2
    has no video input)."""
    images = [[random_image(10 * i + j, s) for j, s in enumerate(SAMPLES[i][1])] for i in indices]
    for sample, i in zip(images, indices, strict=True):
        if SAMPLES[i][2]:
            sample.append(random_image(10 * i + 9, (32, 32)))
    return build_idefics2_processor()(
        images=images, text=_prompts(indices, "<image>", None), return_tensors="pt", padding=True
    )


if _transformers_class("Idefics2ImageProcessorPil") is not None and transformers_compat.pil_image_processor_usable(
    _transformers_class("Idefics2ImageProcessorPil")
):
    FAMILIES["idefics2"] = TinyFamily(
        "idefics2",
        build_idefics2,
        idefics2_inputs,
        lambda: build_idefics2_processor().tokenizer,
        has_video=False,
        counts=[[IDEFICS2_LATENTS], [IDEFICS2_LATENTS] * 2, [IDEFICS2_LATENTS] * 2],
    )
else:
    UNAVAILABLE["idefics2"] = (
        f"transformers {transformers_compat.TRANSFORMERS_VERSION}'s Idefics2ImageProcessorPil needs torchvision "
        "(not installable here), so its tiny inputs cannot be built"
    )


# ------------------------------------------------------------------------------ common-layout families of issue 24
from piofvlm.tiny import common_families as _common_families  # noqa: E402  (its functions import this module's helpers)

_common_families.register(FAMILIES, UNAVAILABLE)
# ---------------------------------------------------------------------------------------------------- PaliGemma
PALIGEMMA_IMAGE_ID = 4
#: Visual tokens of every tiny PaliGemma image: SigLIP at 32 px, patch 8 (4 x 4 patches, no pooling).
PALIGEMMA_TOKENS = 16
#: Sliding window of the tiny PaliGemma 2's local layers: shorter than every standard prompt (27-45 tokens), so the
#: generated (suffix) tokens' windows count kept slots; the prefix is not cut by it (see adapters/paligemma.py).
PALIGEMMA_WINDOW = 16


def build_paligemma(
    attn: str = "sdpa",
    num_layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    text_model: str = "gemma2",
    attn_softcap: float | None = 50.0,
) -> torch.nn.Module:
    """PaliGemma 2 (``text_model="gemma2"``, the checkpoints' text model: local and global layers alternating, local
    first, a 16-slot window, sandwich norms, ``final_logit_softcapping`` 30 and ``attn_logit_softcapping``
    ``attn_softcap`` (50 as the checkpoints); its text model always runs eager attention, ``attn`` sets the vision
    tower's) or PaliGemma (``text_model="gemma"``: Gemma's pre-norm layers, all global, ``attn`` everywhere), with a
    SigLIP 32 px / patch 8 tower: :data:`PALIGEMMA_TOKENS` tokens an image."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text: dict[str, Any] = {
        "model_type": text_model,
        "vocab_size": 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    if text_model == "gemma2":
        text.update(
            query_pre_attn_scalar=16,
            sliding_window=PALIGEMMA_WINDOW,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            attn_logit_softcapping=attn_softcap,
            final_logit_softcapping=30.0,
        )
    config = PaliGemmaConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "vision_use_head": False,
        },
        text_config=text,
        image_token_index=PALIGEMMA_IMAGE_ID,
        vocab_size=64,
        projection_dim=64,
        hidden_size=64,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).to(dtype).eval()
    # Gemma 2 has no sdpa attention in transformers (softcapping): its text model runs eager, as the checkpoints load
    model.set_attn_implementation({"text_config": "eager" if text_model == "gemma2" else attn, "vision_config": attn})
    return model


@functools.cache
def build_paligemma_processor() -> Any:
    """The stock ``PaliGemmaProcessor`` with ``SiglipImageProcessorPil`` (32 px) over the tiny tokenizer (``<image>``
    id 4): it expands each ``<image>`` to :data:`PALIGEMMA_TOKENS` tokens, puts ``<bos>`` after the last image and
    ``\\n`` after the prompt, and returns ``token_type_ids`` (0: the bidirectional prefix)."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = PALIGEMMA_TOKENS
    tokenizer = word_level_tokenizer(["<image>", *WORDS], ["<image>"])
    tokenizer.image_token, tokenizer.image_token_id = "<image>", PALIGEMMA_IMAGE_ID
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def paligemma_inputs(indices: tuple[int, ...] = (0, 1, 2), images_first: bool = False) -> BatchFeature:
    """The standard samples through ``PaliGemmaProcessor`` (``<image>`` where the samples put their images; sample
    1's video is a second image); ``images_first``: the checkpoints' own layout instead, every image before the
    prompt (the processor's prompt without placeholders). The processor's ``labels`` (all -100 without a suffix)
    are dropped."""
    processor = build_paligemma_processor()
    images = [[random_image(10 * i + j, s) for j, s in enumerate(SAMPLES[i][1])] for i in indices]
    for sample, i in zip(images, indices, strict=True):
        if SAMPLES[i][2]:
            sample.append(random_image(10 * i + 9, (32, 32)))
    if images_first:
        text = [SAMPLES[i][0].replace(f" {VIDEO}", "").replace(f" {IMAGE}", "") for i in indices]
    else:
        text = _prompts(indices, "<image>", None)
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    inputs.pop("labels", None)
    return inputs


FAMILIES["paligemma"] = TinyFamily(
    "paligemma",
    build_paligemma,
    paligemma_inputs,
    lambda: build_paligemma_processor().tokenizer,
    has_video=False,
    counts=[[PALIGEMMA_TOKENS], [PALIGEMMA_TOKENS] * 2, [PALIGEMMA_TOKENS] * 2],
)


# ------------------------------------------------------------------------------------------------------- Llama 4
LLAMA4_TOKENS = ["<|patch|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|tile_x_separator|>"]
LLAMA4_TOKENS.append("<|tile_y_separator|>")
LLAMA4_IMAGE_ID, LLAMA4_BOI_ID, LLAMA4_EOI_ID = 4, 5, 6
#: Tokens of one tile (or the global view): 32 px, patch 4 (8 x 8 patches), pixel shuffle 0.5 -> 16.
LLAMA4_TILE_TOKENS = 16
#: Chunk size of the tiny Llama 4's chunked layers: shorter than the standard prompts with two images (70-87 tokens),
#: so chunks cut them and pruning moves the boundaries; long enough that the last prompt tokens' chunk holds visual
#: tokens (PIO's proxy at a chunked layer sees only the keys of its loss positions' chunk).
LLAMA4_CHUNK = 48
#: Per sample: each image's tiles (rows, columns) as ``Llama4ImageProcessor`` splits it (32 px tiles; one tile: no
#: global view); sample 1's video slot is a second image.
LLAMA4_TILES: list[list[tuple[int, int]]] = [[(1, 1)], [(1, 2), (1, 1)], [(2, 1), (1, 1)]]
LLAMA4_COUNTS = [[LLAMA4_TILE_TOKENS * (h * w + (h * w > 1)) for h, w in tiles] for tiles in LLAMA4_TILES]


def build_llama4(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Llama 4 with a tiny vision tower (32 px tiles, patch 4, pixel shuffle 0.5: 16 tokens a tile) and text model:
    chunked RoPE layers with L2 QK-norm and a NoPE global layer every 4th (as the checkpoints), chunks of
    :data:`LLAMA4_CHUNK` slots, MoE feed-forwards (4 experts, top-1 sigmoid router, a shared expert) on every other
    layer (as Maverick; Scout: every layer), dense ones between; routers at std 0.5 (decisive top-1 choices)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    config = Llama4Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 128,  # also the pixel-shuffled width (4 x hidden_size) the projector MLP takes
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 4,
            "vision_output_dim": 64,
            "projector_input_dim": 64,
            "projector_output_dim": 64,
            "pixel_shuffle_ratio": 0.5,
        },
        text_config={
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 32,
            "intermediate_size_mlp": 128,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 2,
            "attention_chunk_size": LLAMA4_CHUNK,
            "max_position_embeddings": 1024,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        boi_token_index=LLAMA4_BOI_ID,
        eoi_token_index=LLAMA4_EOI_ID,
        image_token_index=LLAMA4_IMAGE_ID,
    )
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():  # not model.to(dtype): the vision tower's complex rotary buffer would lose its imaginary
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)
    model.set_attn_implementation(attn)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.language_model.model.layers:
            router = getattr(layer.feed_forward, "router", None)
            if router is not None:
                router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * 0.5)
    return model


@functools.cache
def build_llama4_tokenizer() -> Any:
    return word_level_tokenizer([*LLAMA4_TOKENS, *WORDS], LLAMA4_TOKENS)


def _llama4_image(tiles: tuple[int, int]) -> str:
    """``Llama4Processor._prompt_split_image``: the tiles row by row (x separators inside a row, a y separator after
    it), then ``<|image|>`` and the global view; one tile: ``<|image|>`` and its patches only."""
    patches = " ".join(["<|patch|>"] * LLAMA4_TILE_TOKENS)
    rows, cols = tiles
    text = "<|image_start|>"
    if rows * cols > 1:
        for _ in range(rows):
            text += " <|tile_x_separator|> ".join([f" {patches} "] * cols) + " <|tile_y_separator|>"
    return f"{text} <|image|> {patches} <|image_end|>"


def llama4_inputs(indices: tuple[int, ...] = (0, 1, 2)) -> BatchFeature:
    """The standard samples in ``Llama4Processor``'s layout, hand-built (``Llama4ImageProcessor`` needs torchvision):
    each image as :func:`_llama4_image` writes it, ``pixel_values`` ``(tiles, 3, 32, 32)`` with each image's tiles
    then its global view (random, seeded by sample and place)."""
    tokenizer = build_llama4_tokenizer()
    prompts, pixels = [], []
    for i in indices:
        parts = SAMPLES[i][0].replace(VIDEO, IMAGE).split(IMAGE)
        text = parts[0]
        for j, (tiles, part) in enumerate(zip(LLAMA4_TILES[i], parts[1:], strict=True)):
            text += f" {_llama4_image(tiles)} " + part
            chunks = tiles[0] * tiles[1] + (tiles[0] * tiles[1] > 1)
            generator = torch.Generator().manual_seed(100 * i + j)
            pixels.append(torch.rand(chunks, 3, 32, 32, generator=generator))
        prompts.append(text)
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    inputs.pop("token_type_ids", None)
    inputs["pixel_values"] = torch.cat(pixels)
    return BatchFeature(dict(inputs))


if (_reason := transformers_compat.llama4_unsupported_reason()) is not None:
    UNAVAILABLE["llama4"] = _reason
else:
    FAMILIES["llama4"] = TinyFamily(
        "llama4",
        build_llama4,
        llama4_inputs,
        build_llama4_tokenizer,
        has_video=False,
        counts=LLAMA4_COUNTS,
        joiners=(LLAMA4_TOKENS.index("<|tile_x_separator|>") + 4, LLAMA4_TOKENS.index("<|tile_y_separator|>") + 4, 7),
    )
