"""Model shape presets with random weights, and the benchmark's inputs (no hub, no tokenizer).

A preset fixes the language model at a real model's width and depth and a visual-token count like the real
model's. The vision tower is a small CLIP (or Qwen ViT) whose patch grid gives that count: the language model
dominates the cost and the vision tower is the same for every method, so a full-size tower would only add a
constant. ``num_layers`` cuts the depth (CPU runs); the full depth is kept in :attr:`ModelShape.full_layers` for
the extrapolated figures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from piofvlm.adapters import ADAPTERS

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")


@dataclass(frozen=True)
class ModelShape:
    """A language-model shape plus how the visual tokens are produced.

    Attributes:
        family: ``llava`` (one square grid per image), ``llava_next`` (anyres: base view + 2x2 tiles with
            newline tokens, through the real LLaVA-NeXT code) or ``qwen2_5_vl``.
        hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, vocab_size: the language model.
        patch_grid: LLaVA: patches per side of the image (visual tokens = grid²). LLaVA-NeXT: patches per side of
            one tile (the base view). Qwen2.5-VL: merged tokens per side.
        image_hw: LLaVA-NeXT only: the image size in tile units x ``patch_grid`` (height, width), which sets the
            unpadded grid (a square image gives the maximum count).
        text_tokens: prompt tokens besides the image (the paper's KV figures imply about 60 on POPE).
        full_layers: depth of the real model (for extrapolation when ``num_layers`` is cut).
    """

    name: str
    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    patch_grid: int
    text_tokens: int = 60
    image_hw: tuple[int, int] | None = None
    full_layers: int | None = None
    rope_theta: float = 10000.0
    description: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.text_tokens < 8:
            raise ValueError(
                f"text_tokens must be >= 8 (the proxy loss needs prompt positions), got {self.text_tokens}"
            )

    def replace(self, **changes: Any) -> ModelShape:
        """A copy with fields changed (e.g. ``num_layers``); ``full_layers`` keeps the original depth."""
        full = self.full_layers or self.num_layers
        return dataclasses.replace(self, **{"full_layers": full, **changes})


_LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32)

SHAPES: dict[str, ModelShape] = {
    "llava15-7b": ModelShape(
        "llava15-7b", "llava", **_LLAMA_7B, vocab_size=32064, patch_grid=24, description="LLaVA-1.5-7B: 576 tokens"
    ),
    "llava-next-7b": ModelShape(
        "llava-next-7b",
        "llava_next",
        **_LLAMA_7B,
        vocab_size=32064,
        patch_grid=24,
        image_hw=(48, 48),
        description="LLaVA-NeXT-7B, square image: 576 + 48x49 = 2928 tokens (paper's FLOPs formula: 2880)",
    ),
    "llava-next-7b-pope": ModelShape(
        "llava-next-7b-pope",
        "llava_next",
        **_LLAMA_7B,
        vocab_size=32064,
        patch_grid=24,
        image_hw=(34, 48),
        description="LLaVA-NeXT-7B, wide image: 576 + 34x49 = 2242 tokens (~2250 implied by the paper's POPE KV)",
    ),
    "qwen2.5-vl-7b": ModelShape(
        "qwen2.5-vl-7b",
        "qwen2_5_vl",
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        vocab_size=152064,
        patch_grid=36,
        rope_theta=1000000.0,
        description="Qwen2.5-VL-7B at 1008x1008 px: 36x36 = 1296 tokens (the authors' eval setting)",
    ),
    # The deep, narrow CPU stand-in of the issue: the throwaway prototype's shape (1024 wide, 24 layers, 2916 tokens).
    "proto-1024x24": ModelShape(
        "proto-1024x24",
        "llava",
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=24,
        num_heads=8,
        num_kv_heads=8,
        vocab_size=32064,
        patch_grid=54,
        text_tokens=28,
        description="CPU stand-in: LLaVA, 1024x24 LM, 54x54 = 2916 tokens (the prototype's shape)",
    ),
    # `piofvlm bench --quick` (cut to 4 layers there): the stand-in's LM with LLaVA-1.5's 576 visual tokens.
    "quick-1024x24": ModelShape(
        "quick-1024x24",
        "llava",
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=24,
        num_heads=8,
        num_kv_heads=8,
        vocab_size=32064,
        patch_grid=24,
        text_tokens=28,
        description="CPU stand-in for `bench --quick`: LLaVA, 1024x24 LM, 24x24 = 576 tokens (LLaVA-1.5's count)",
    ),
    "next-1024x24": ModelShape(
        "next-1024x24",
        "llava_next",
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=24,
        num_heads=8,
        num_kv_heads=8,
        vocab_size=32064,
        patch_grid=24,
        image_hw=(48, 48),
        description="CPU stand-in: LLaVA-NeXT anyres (2928 tokens) on a 1024x24 LM",
    ),
    "tiny": ModelShape(
        "tiny",
        "llava",
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=128,
        patch_grid=7,
        text_tokens=12,
        description="tests: 49 tokens, 64-wide LM",
    ),
    "tiny-next": ModelShape(
        "tiny-next",
        "llava_next",
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=128,
        patch_grid=4,
        image_hw=(6, 8),
        text_tokens=12,
        description="tests: LLaVA-NeXT anyres, 16 + 6x9 = 70 tokens",
    ),
    "tiny-qwen": ModelShape(
        "tiny-qwen",
        "qwen2_5_vl",
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=256,
        patch_grid=4,
        text_tokens=12,
        rope_theta=10000.0,
        description="tests: Qwen2.5-VL, 4x4 = 16 merged tokens (M-RoPE)",
    ),
}

PATCH = 4  # CLIP patch size of the small vision towers


def available_shapes() -> list[str]:
    return sorted(SHAPES)


def get_shape(name: str, num_layers: int | None = None) -> ModelShape:
    """The preset ``name``, optionally cut to ``num_layers`` decoder layers."""
    if name not in SHAPES:
        raise ValueError(f"unknown model preset {name!r}; available presets: {', '.join(available_shapes())}")
    shape = SHAPES[name]
    if num_layers is not None:
        if num_layers < 1 or num_layers > shape.num_layers:
            raise ValueError(f"num_layers must be in [1, {shape.num_layers}] for {name}, got {num_layers}")
        shape = shape.replace(num_layers=num_layers)
    return shape


def _text_config(shape: ModelShape) -> dict[str, Any]:
    return dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=8192,
        rope_theta=shape.rope_theta,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _clip(image_px: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_px,
        patch_size=PATCH,
    )


def build_model(shape: ModelShape, dtype: torch.dtype, attn: str, device: str, seed: int = 0) -> nn.Module:
    """A random-weight model of ``shape`` (built directly in ``dtype`` on ``device``), in eval mode."""
    if shape.family == "qwen2_5_vl" and "qwen2_5_vl" not in ADAPTERS:  # pragma: no cover - registered since 0.1
        raise ValueError(
            f"preset {shape.name!r} needs the qwen2_5_vl adapter, which is not registered in this build of piofvlm "
            "(it lands with the Qwen adapters); use a LLaVA or LLaVA-NeXT preset"
        )
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if shape.family == "llava":
                from transformers import LlavaConfig, LlavaForConditionalGeneration

                config = LlavaConfig(
                    vision_config=_clip(shape.patch_grid * PATCH),
                    text_config=LlamaConfig(**_text_config(shape)),
                    image_token_id=shape.vocab_size - 1,
                    image_seq_length=shape.patch_grid**2,
                )
                model = LlavaForConditionalGeneration(config)
            elif shape.family == "llava_next":
                from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

                tile = shape.patch_grid * PATCH
                config = LlavaNextConfig(
                    vision_config=_clip(tile),
                    text_config=LlamaConfig(**_text_config(shape)),
                    image_token_id=shape.vocab_size - 1,
                    image_grid_pinpoints=[[2 * tile, 2 * tile]],
                )
                model = LlavaNextForConditionalGeneration(config)
            else:
                model = _build_qwen(shape)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


def _build_qwen(shape: ModelShape) -> nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = shape.hidden_size // shape.num_heads
    # M-RoPE sections (temporal, height, width) sum to head_dim / 2: [16, 24, 24] for Qwen2.5-VL-7B's 128.
    text = _text_config(shape)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": shape.rope_theta,
        "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
    }
    text.pop("rope_theta")
    special = {}
    if shape.vocab_size <= 151656:  # small test vocabularies: put the vision special tokens at its end
        top = shape.vocab_size
        special = {
            "image_token_id": top - 1,
            "video_token_id": top - 2,
            "vision_start_token_id": top - 3,
            "vision_end_token_id": top - 4,
        }
    config = Qwen2_5_VLConfig(
        **special,
        text_config=text,
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=shape.hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[0],
        ),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _token_ids(count: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(3, vocab - 64, (count,), generator=generator)


def build_inputs(model: nn.Module, shape: ModelShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt (batch 1): ``[bos] text image text``, random text ids, random pixels; on the model's device."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    before = 4
    after = shape.text_tokens - before - 1
    if shape.family == "llava":
        side = shape.patch_grid * PATCH
        pixel = {"pixel_values": torch.randn(1, 3, side, side, generator=generator)}
        num_visual = shape.patch_grid**2
    elif shape.family == "llava_next":
        from piofvlm.adapters.llava_next import LlavaNextAdapter

        tile = shape.patch_grid * PATCH
        unit = tile // shape.patch_grid  # pixels per patch of the 2x2-tile canvas, scaled back to image pixels
        height, width = (v * unit for v in (shape.image_hw or (2 * shape.patch_grid, 2 * shape.patch_grid)))
        pixel = {
            "pixel_values": torch.randn(1, 5, 3, tile, tile, generator=generator),
            "image_sizes": torch.tensor([[height, width]]),
        }
        num_visual = LlavaNextAdapter(model).image_token_counts(0, pixel)[0]
    else:
        grid = 2 * shape.patch_grid
        pixel = {
            "pixel_values": torch.randn(grid * grid, 3 * 2 * 14 * 14, generator=generator),
            "image_grid_thw": torch.tensor([[1, grid, grid]]),
        }
        num_visual = shape.patch_grid**2
    image_id = int(model.config.image_token_id)
    ids = [torch.tensor([1]), _token_ids(before, shape.vocab_size, generator)]
    if shape.family == "qwen2_5_vl":
        ids += [torch.tensor([model.config.vision_start_token_id]), torch.full((num_visual,), image_id)]
        ids += [torch.tensor([model.config.vision_end_token_id]), _token_ids(after - 2, shape.vocab_size, generator)]
    else:
        ids += [torch.full((num_visual,), image_id), _token_ids(after, shape.vocab_size, generator)]
    input_ids = torch.cat(ids)[None]
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixel}
    if shape.family == "qwen2_5_vl":
        inputs["mm_token_type_ids"] = (input_ids == image_id).long()
    return {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for key, value in inputs.items()
    }


def checkpoint_inputs(
    processor: Any, model: nn.Module, image_size: tuple[int, int], question: str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs for a real checkpoint: a random image of ``image_size`` (width, height) and ``question``."""
    from piofvlm.loading import build_prompt

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (image_size[1], image_size[0], 3), dtype=np.uint8))
    inputs = processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    return {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for key, value in dict(inputs).items()
        if isinstance(value, torch.Tensor)
    }


def checkpoint_name(path: str | Path) -> str:
    return Path(path).resolve().name
