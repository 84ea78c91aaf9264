"""The pictures behind the tiny cases' inputs (:data:`piofvlm.tiny.cases.TINY_CASES`), for overlays and their tests.

:func:`tiny_pictures` gives, per image or video of a family's tiny case in flat prompt order, the picture its
processor was given: a PIL image, or a video's frames (a list of PIL images). The tiny videos are random inputs in
the video processors' layouts (they need torchvision); where a case has no frame pixels of its own (Qwen, OneVision)
its frames here are stand-ins of the video's frame size.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from piofvlm.tiny import families as toy_families
from piofvlm.tiny import llava as toy
from piofvlm.tiny import qwen as toy_qwen

#: A picture of an item: an image, or a video's frames.
Picture = Image.Image | list[Image.Image]


def frames_to_images(frames: torch.Tensor) -> list[Image.Image]:
    """``(F, 3, H, W)`` values in [0, 1] -> ``F`` RGB images."""
    array = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in array]


def _stand_in_frames(count: int, size: tuple[int, int], seed: int) -> list[Image.Image]:
    return [toy.random_image(seed + t, size) for t in range(count)]


def tiny_pictures(model_type: str) -> list[Picture]:
    """The pictures of ``TINY_CASES[model_type]()``'s items, in flat prompt order (samples 0 then 1)."""
    if model_type in ("llava", "llava_next"):
        return [toy.random_image(0, (28, 28)), toy.random_image(1, (40, 60))]
    if model_type in toy_qwen.QWEN_KINDS:  # video grid (2, 4, 6) patches of 14 px: frames 84 x 56
        images = [toy_qwen.random_image(0, (112, 112)), toy_qwen.random_image(1, (168, 84))]
        return [*images, _stand_in_frames(4, (6 * 14, 4 * 14), 500)]
    if model_type == toy_qwen.ONEVISION:
        return [
            toy_qwen.random_image(0, (28, 28)),
            toy_qwen.random_image(1, (40, 60)),
            _stand_in_frames(2, (28, 28), 500),
        ]
    family = toy_families.FAMILIES[model_type]
    pictures: list[Picture] = []
    for i in (0, 1):
        _, sizes, videos = toy_families.SAMPLES[i]
        pictures += [toy.random_image(10 * i + j, size) for j, size in enumerate(sizes)]
        for count in videos:
            if family.has_video:
                pictures.append(frames_to_images(toy_families._frames(i, count)))
            elif model_type == "internvl":  # frames written as images: one item each
                pictures += frames_to_images(toy_families._frames(i, count))
            else:  # the video slot holds a second image
                pictures.append(toy.random_image(10 * i + 9, (32, 32)))
    return pictures


def source_sizes(pictures: list[Picture]) -> list[tuple[int, int]]:
    """``(width, height)`` of each picture (a video: of its first frame), for ``ModelAdapter.token_boxes``."""
    return [(picture[0] if isinstance(picture, list) else picture).size for picture in pictures]
