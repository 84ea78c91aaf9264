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
from piofvlm.adapters import ADAPTERS
from piofvlm.tiny.cases import TINY_CASES
from test_methods_matrix import MATRIX, REFUSED, build

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


def assert_static_equals_dynamic(m, inputs, method, same_kept: bool = False) -> None:
    """Under ``method``: a static-cache generation equals the dynamic one (:func:`assert_same_generation`); with
    ``same_kept``, both prefills kept the same tokens."""
    with method(m):
        dynamic = generate(m, inputs)
        kept = [k.tolist() for r in method.last_selection for k in r.kept] if same_kept else None
        static = generate(m, inputs, cache_implementation="static")
    if same_kept:
        assert [k.tolist() for r in method.last_selection for k in r.kept] == kept
    assert_same_generation(static, dynamic)


def family(kind: str, attn: str = "sdpa"):
    if kind in ("llava", "llava_next"):
        return model(kind, attn), make_inputs(kind)
    return test_qwen.model(kind, attn), test_qwen.make_inputs(kind)


#: Families with sliding-window or linear-attention layers: a static cache is refused (tests/test_gemma3.py and
#: tests/test_qwen3_5.py check the error).
#: PaliGemma and Llama 4: tests/test_paligemma.py, tests/test_llama4.py.
SLIDING_KINDS = ("gemma3", "qwen3_5", "gemma4", "qwen3_5_moe", "shieldgemma2", "paligemma", "llama4")
FAMILIES = [
    ("llava", "sdpa"),
    ("llava", "eager"),
    ("llava_next", "sdpa"),
    *[(k, "sdpa") for k in test_qwen.KINDS if k not in SLIDING_KINDS],
]
#: Every family with a tiny case on this transformers (``piofvlm.tiny.cases``) but the sliding ones; ``renumber``
#: where its adapter has it.
KINDS = [kind for kind in TINY_CASES if kind not in SLIDING_KINDS]
RENUMBER_KINDS = [kind for kind in KINDS if ADAPTERS[kind].supports_renumber]
#: Families with 1-D positions. The stock M-RoPE models (Qwen-VL, GLM-4.xV) cannot decode by hand with a 2-D mask in
#: transformers 5.24 (``compute_3d_position_ids`` returns positions for the whole mask, not the new token), with or
#: without a method: ``generate()`` covers them.
ONE_D_KINDS = [kind for kind in KINDS if ADAPTERS[kind].position_batch_dim == 0]


def quick(kinds: list[str], *fast: str) -> list:
    """``kinds`` as parameters; all but ``fast`` run in the slow suite (``make test-slow``)."""
    return [pytest.param(kind, marks=[] if kind in fast else [pytest.mark.slow]) for kind in kinds]


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
    assert_static_equals_dynamic(m, inputs, method, same_kept=True)


@pytest.mark.parametrize("name", list(MATRIX))
def test_every_method_static_equals_dynamic(name):
    m, inputs = family("llava")
    method = build(name, 0.3)
    assert_static_equals_dynamic(m, inputs, method)


@pytest.mark.parametrize("kind", quick(RENUMBER_KINDS, "llava", "llava_next_video", "mistral3"))
def test_renumbered_positions_static_equals_dynamic(kind):
    m, inputs = family(kind)
    method = piofvlm.get_method("pio", layers=[2], keep=0.3, positions="renumber")
    assert_static_equals_dynamic(m, inputs, method)


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


@pytest.mark.parametrize("kind", quick(ONE_D_KINDS, "llava", "internvl", "smolvlm"))
def test_static_cache_passed_by_hand_equals_dynamic(kind):
    """Prefill and three greedy decode steps with a ``StaticCache`` and 2-D masks (no ``generate``)."""
    m, inputs = family(kind)
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "kind"),
    [(name, kind) for kind in KINDS if kind != "llava" for name in MATRIX if (name, kind) not in REFUSED],
)
def test_every_method_static_equals_dynamic_on_every_family(name, kind):
    """As :func:`test_every_method_static_equals_dynamic`, on the other families (the pairs a family refuses by
    design on these prompts, ``test_methods_matrix.REFUSED``, are tested to refuse there)."""
    m, inputs = family(kind)
    method = build(name, 0.3)
    assert_static_equals_dynamic(m, inputs, method)


@pytest.mark.parametrize("kind", [kind for kind in ("internvl", "smolvlm") if kind in TINY_CASES])
def test_encoder_side_method_on_a_static_cache_prefill(kind):
    """Regression: ``generate()`` on a static cache hands the model a 4-D mask (a ``{"full_attention": ...}`` dict
    for Qwen2-based text models, InternVL; a tensor for Llama-based ones, SmolVLM). Adapters that read
    ``attention_mask`` as the 2-D padding mask in ``visual_token_sources`` crashed (``'dict' object has no attribute
    'bool'``; a size mismatch). Found by extending the static-cache tests to every family."""
    m, inputs = family(kind)
    method = build("pool", 0.3)
    assert_static_equals_dynamic(m, inputs, method, same_kept=True)


def test_custom_4d_mask_is_still_refused():
    m, inputs = family("llava")
    mask = inputs["attention_mask"].bool()
    full = mask[:, None, None, :] & torch.ones(1, 1, mask.shape[1], 1, dtype=torch.bool).tril()
    with torch.no_grad(), piofvlm.get_method("random", keep=0.5)(m), pytest.raises(ValueError, match="4-D mask"):
        m(**{**inputs, "attention_mask": full})


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_multi_token_continuation_with_padding_on_a_static_cache_equals_dynamic(attn):
    """A continuation of several tokens at once (query rows causal among themselves) whose 2-D mask has a zero
    among the appended tokens, then single tokens, on a pruned static cache passed by hand: the same logits as on a
    dynamic cache (the static decode mask's generated keys, their causal rows and the appended padding)."""
    m, inputs = family("llava", attn)
    method = piofvlm.get_method("random", layers=[1, 3], keep=[0.5, 0.25], seed=1)
    batch = inputs["input_ids"].shape[0]
    steps = [
        (torch.tensor([[5, 6, 7]] * batch), torch.tensor([[1, 0, 1]] * batch)),
        (torch.tensor([[8]] * batch), torch.ones(batch, 1, dtype=torch.long)),
        (torch.tensor([[9, 10]] * batch), torch.tensor([[1, 1]] * batch)),
    ]

    def run(cache):
        logits, mask = [], inputs["attention_mask"]
        name = transformers_compat.cache_kwarg_name(m)
        with torch.no_grad():
            out = m(**inputs, use_cache=True, **{name: cache})
            for ids, new in steps:
                mask = torch.cat([mask, new], 1)
                out = m(
                    input_ids=ids, attention_mask=mask, use_cache=True, **{name: transformers_compat.output_cache(out)}
                )
                logits.append(out.logits[new.bool()[:1].expand(batch, -1)].view(batch, -1, out.logits.shape[-1]))
        return torch.cat(logits, 1)

    with method(m):
        dynamic = run(None)
        static = run(StaticCache(config=m.config, max_cache_len=inputs["input_ids"].shape[1] + 8))
    torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-5)
