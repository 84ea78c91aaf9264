"""Static KV cache (``cache_implementation="static"``, ``generation_config``, a ``StaticCache`` passed by hand).

Layers after a prune point write their kept tokens at the start of their own static buffer; the mechanism masks the
unused slots and maps the generated tokens' columns, so pruned static decoding equals pruned dynamic decoding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import StaticCache

import piofvlm
import test_qwen
from conftest import make_inputs, model
from piofvlm import transformers_compat
from test_methods_matrix import MATRIX, build

GREEDY = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "output_logits": True}
GREEDY["return_dict_in_generate"] = True


def generate(m, inputs, **kwargs):
    with torch.no_grad():
        out = m.generate(**inputs, **GREEDY, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


def assert_same_generation(static, dynamic) -> None:
    """Same greedy tokens, and logits equal to within 1e-5."""
    assert torch.equal(static[0], dynamic[0])
    torch.testing.assert_close(static[1], dynamic[1], rtol=0, atol=1e-5)


def family(kind: str, attn: str = "sdpa"):
    if kind in ("llava", "llava_next"):
        return model(kind, attn), make_inputs(kind)
    return test_qwen.model(kind, attn), test_qwen.make_inputs(kind)


#: Qwen3.5 (linear-attention layers) refuses static caches: tests/test_qwen3_5.py.
STATIC_KINDS = [k for k in test_qwen.KINDS if k != "qwen3_5"]
FAMILIES = [("llava", "sdpa"), ("llava", "eager"), ("llava_next", "sdpa"), *[(k, "sdpa") for k in STATIC_KINDS]]


@pytest.mark.parametrize(("kind", "attn"), FAMILIES)
def test_keep_all_static_is_identical_to_unhooked_static(kind, attn):
    m, inputs = family(kind, attn)
    reference = generate(m, inputs, cache_implementation="static")
    method = piofvlm.get_method("random", layers=[1, 2], keep=[1.0, 1.0])
    with method(m):
        hooked = generate(m, inputs, cache_implementation="static")
    assert torch.equal(hooked[0], reference[0])
    assert torch.equal(hooked[1], reference[1])


@pytest.mark.parametrize(("kind", "attn"), FAMILIES)
@pytest.mark.parametrize("name", ["pio", "random"])
def test_pruned_static_equals_pruned_dynamic(kind, attn, name):
    m, inputs = family(kind, attn)
    method = piofvlm.get_method(name, layers=[1, 3], keep=[0.5, 0.25])
    with method(m):
        dynamic = generate(m, inputs)
        kept = [k.tolist() for r in method.last_selection for k in r.kept]
        static = generate(m, inputs, cache_implementation="static")
    assert [k.tolist() for r in method.last_selection for k in r.kept] == kept
    assert_same_generation(static, dynamic)


@pytest.mark.parametrize("name", list(MATRIX))
def test_every_method_static_equals_dynamic(name):
    m, inputs = family("llava")
    method = build(name, 0.3)
    with method(m):
        dynamic = generate(m, inputs)
        static = generate(m, inputs, cache_implementation="static")
    assert_same_generation(static, dynamic)


def test_renumbered_positions_static_equals_dynamic():
    m, inputs = family("llava")
    method = piofvlm.get_method("pio", layers=[2], keep=0.3, positions="renumber")
    with method(m):
        dynamic = generate(m, inputs)
        static = generate(m, inputs, cache_implementation="static")
    assert_same_generation(static, dynamic)


def test_static_from_generation_config():
    m, inputs = family("llava")
    method = piofvlm.get_method("pio", layers=[2], keep=0.3)
    with method(m):
        dynamic = generate(m, inputs)
    static_model = copy.copy(m)  # same modules, its own generation config
    static_model.generation_config = copy.deepcopy(m.generation_config)
    static_model.generation_config.cache_implementation = "static"
    with method(static_model):
        static = generate(static_model, inputs)
    assert_same_generation(static, dynamic)


def test_static_cache_passed_by_hand_equals_dynamic():
    """Prefill and three greedy decode steps with a ``StaticCache`` and 2-D masks (no ``generate``)."""
    m, inputs = family("llava")
    method = piofvlm.get_method("pio", layers=[1, 3], keep=[0.5, 0.25])

    def loop(cache):
        logits, mask, ids = [], inputs["attention_mask"], None
        with torch.no_grad():
            name = transformers_compat.cache_kwarg_name(m)  # ``cache`` from transformers 5.24, else past_key_values
            out = m(**inputs, use_cache=True, **{name: cache})
            for _ in range(3):
                logits.append(out.logits[:, -1])
                ids = out.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(ids)], 1)
                out = m(
                    input_ids=ids,
                    attention_mask=mask,
                    use_cache=True,
                    **{name: transformers_compat.output_cache(out)},
                )
        return torch.stack(logits, 1)

    with method(m):
        dynamic = loop(None)
        static = loop(StaticCache(config=m.config, max_cache_len=inputs["input_ids"].shape[1] + 4))
    torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-5)


def test_custom_4d_mask_is_still_refused():
    m, inputs = family("llava")
    mask = inputs["attention_mask"].bool()
    full = mask[:, None, None, :] & torch.ones(1, 1, mask.shape[1], 1, dtype=torch.bool).tril()
    with torch.no_grad(), piofvlm.get_method("random", keep=0.5)(m), pytest.raises(ValueError, match="4-D mask"):
        m(**{**inputs, "attention_mask": full})
