"""One tiny, ready-to-run case per supported family: a random model built from a config and a left-padded batch of
two prompts with images (and a video where the family takes one). Used by ``piofvlm doctor``'s self-test; nothing
is downloaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from piofvlm.tiny import families as toy_families
from piofvlm.tiny import llava as toy
from piofvlm.tiny import qwen as toy_qwen

#: ``(model, inputs)``: an eval-mode fp32 model (sdpa) and processor outputs for a batch of two prompts.
TinyCase = tuple[torch.nn.Module, dict[str, Any]]


def _llava(kind: str) -> TinyCase:
    model = (toy.build_llava if kind == "llava" else toy.build_llava_next)(num_layers=3)
    prompts = [
        "USER : <image> what is the colour of the circle ? ASSISTANT :",
        "USER : <image> how many ? ASSISTANT :",
    ]
    images = [toy.random_image(0, (28, 28)), toy.random_image(1, (40, 60))]
    return model, dict(toy.build_processor(kind)(images=images, text=prompts, return_tensors="pt", padding=True))


def _qwen(kind: str) -> TinyCase:
    model = toy_qwen.build_qwen(kind, num_layers=3)
    prompts = [
        f"USER : {toy_qwen.IMAGE} what is the colour of the circle ? ASSISTANT :",
        f"USER : {toy_qwen.IMAGE} left {toy_qwen.VIDEO} how many ? ASSISTANT :",
    ]
    images = [toy_qwen.random_image(0, (112, 112)), toy_qwen.random_image(1, (168, 84))]
    inputs = toy_qwen.add_videos(kind, toy_qwen.build_qwen_processor(kind), prompts, images, [(2, 4, 6)])
    return model, dict(inputs)


def _onevision() -> TinyCase:
    model = toy_qwen.build_onevision(num_layers=3)
    prompts = [
        f"USER : {toy_qwen.OV_IMAGE} what is the colour of the circle ? ASSISTANT :",
        f"USER : {toy_qwen.OV_IMAGE} left {toy_qwen.OV_VIDEO} how many ? ASSISTANT :",
    ]
    images = [[toy_qwen.random_image(0, (28, 28))], [toy_qwen.random_image(1, (40, 60))]]
    processor = toy_qwen.build_onevision_processor()
    return model, dict(toy_qwen.add_videos(toy_qwen.ONEVISION, processor, prompts, images, [(2, 0, 0)]))


#: ``config.model_type`` -> a function building that family's tiny case.
TINY_CASES: dict[str, Callable[[], TinyCase]] = {
    "llava": lambda: _llava("llava"),
    "llava_next": lambda: _llava("llava_next"),
    "llava_onevision": _onevision,
    "qwen2_vl": lambda: _qwen("qwen2_vl"),
    "qwen2_5_vl": lambda: _qwen("qwen2_5_vl"),
    "qwen3_vl": lambda: _qwen("qwen3_vl"),
    # the families of issue 13 (InternVL, LLaVA-NeXT-Video, Mistral 3, SmolVLM, ...): their standard samples 0 and 1
    **{kind: functools.partial(toy_families.tiny_case, kind) for kind in toy_families.FAMILIES},
}
#: Supported families without a tiny case on the installed transformers, with the reason (doctor reports them).
UNAVAILABLE: dict[str, str] = dict(toy_families.UNAVAILABLE)
