from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from piofvlm.doctor import ReplaySelection  # noqa: E402
from piofvlm.tiny import llava as tiny_models  # noqa: E402

PROMPTS = [
    "USER : <image> what is the colour of the circle ? ASSISTANT :",
    "USER : <image> how many ? ASSISTANT :",
    "USER : <image> describe this picture please , count the small objects in the image . ASSISTANT :",
]
IMAGE_SIZES = [(28, 28), (40, 60), (56, 30)]


@functools.cache
def model(kind: str, attn: str = "sdpa", num_layers: int = 4, dtype: torch.dtype = torch.float32):
    build = tiny_models.build_llava if kind == "llava" else tiny_models.build_llava_next
    return build(attn=attn, num_layers=num_layers, dtype=dtype)


@functools.cache
def processor(kind: str):
    return tiny_models.build_processor(kind)


def make_inputs(kind: str, indices=(0, 1, 2), prompts=None, images=None):
    prompts = prompts or [PROMPTS[i] for i in indices]
    images = images or [tiny_models.random_image(i, IMAGE_SIZES[i]) for i in indices]
    return processor(kind)(images=images, text=prompts, return_tensors="pt", padding=True)


def single_inputs(kind: str, i: int):
    return make_inputs(kind, indices=(i,))


#: Test method: keeps the visual indices given per stage and per sample (``chosen``, relative to the original ones).
FixedSelection = ReplaySelection


#: Families that run exactly the code of another one (same adapter, same text-model class): the parametrized
#: invariant matrices run them in the slow suite, except the tests named in ``QUICK_FOR_TWINS``.
TWIN_FAMILIES = {"glm46v": "glm4v", "pp_chart2table": "got_ocr2", "shieldgemma2": "gemma3"}
QUICK_FOR_TWINS = ("test_toy_inputs_and_item_counts", "test_keep_all_is_identical", "test_self_test_passes")


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 - pytest hook
    import pytest

    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        family = params.get("kind", params.get("model_type"))
        if family in TWIN_FAMILIES and not item.originalname.startswith(QUICK_FOR_TWINS):
            item.add_marker(pytest.mark.slow)


def assert_decode_equals_uncached(m, inputs, generated, fixed: FixedSelection, new_tokens: int) -> None:
    """The cached logits of ``generated`` (``output_logits=True``) equal, step by step, a no-cache forward of the
    generated sequences under ``fixed`` (the same kept visual tokens); greedy tokens agree."""
    import torch.nn.functional as F

    full = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    full["attention_mask"] = F.pad(inputs["attention_mask"], (0, new_tokens), value=1)
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], (0, new_tokens))
    with torch.no_grad(), fixed(m):
        logits = m(input_ids=generated.sequences, use_cache=False, **full).logits
    for step in range(new_tokens):
        cached, uncached = generated.logits[step], logits[:, -new_tokens - 1 + step]
        torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)
        assert torch.equal(cached.argmax(-1), uncached.argmax(-1))
