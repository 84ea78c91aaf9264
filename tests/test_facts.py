"""Families as facts (``adapters/facts.py``): every registered data entry of ``COMMON_FAMILIES`` builds an adapter
that behaves exactly as the code adapter it replaced (``tests/legacy_adapters.py``, main before issue 26's step 1):
the same module tree, counts, token sources and boxes, and a model pruned through it gives the same logits, kept
sets, KV-cache lengths and generated tokens. ``declare`` registers an entry by model type."""

from __future__ import annotations

import re

import pytest
import torch

import legacy_adapters as legacy
import piofvlm
from conftest import FixedSelection, assert_decode_equals_uncached
from piofvlm.adapters import ADAPTERS, get_adapter, registry
from piofvlm.adapters.facts import ADAPTERS_FROM_FACTS, COMMON_FAMILIES, LLAVA, FactsAdapter, Family, declare
from piofvlm.adapters.llava import LlavaAdapter
from piofvlm.adapters.parts import ClipVisionTower, EqualTokensPerImage
from piofvlm.tiny.cases import TINY_CASES, UNAVAILABLE

#: model type -> the code adapter its data entry replaced.
OLD = {
    "llava": legacy.OldLlavaAdapter,
    "vipllava": legacy.OldVipLlavaAdapter,
    "internvl": legacy.OldInternVLAdapter,
    "smolvlm": legacy.OldSmolVLMAdapter,
    "idefics3": legacy.OldSmolVLMAdapter,
    "idefics2": legacy.OldIdefics2Adapter,
    "mistral3": legacy.OldMistral3Adapter,
}
#: model type -> a method reading the family's vision side (token sources or vision attention), besides PIO.
VISION_METHOD = {
    "llava": ("visionzip", {"keep": 0.3}),
    "vipllava": ("pool", {"keep": 0.3}),  # its tiny model concatenates two feature layers: visionzip refuses
    "internvl": ("pool", {"keep": 0.3}),
    "smolvlm": ("pool", {"keep": 0.3}),
    "idefics3": ("pool", {"keep": 0.3}),
    "mistral3": ("pool", {"keep": 0.3}),
}


def test_every_entry_is_registered_and_every_converted_family_is_covered():
    registered = {t: ADAPTERS[t] for f in COMMON_FAMILIES for t in f.model_types}
    assert all(issubclass(cls, FactsAdapter) and cls.family in COMMON_FAMILIES for cls in registered.values())
    assert set(OLD) <= set(registered)  # every converted family; the others were born as entries (issue 24)
    born_as_data = set(registered) - set(OLD)
    assert born_as_data <= set(TINY_CASES) | set(UNAVAILABLE)  # so each runs in every family matrix
    assert LlavaAdapter is ADAPTERS["llava"] is ADAPTERS_FROM_FACTS["llava"] and LlavaAdapter.family is LLAVA
    assert issubclass(LlavaAdapter, EqualTokensPerImage) and issubclass(LlavaAdapter, ClipVisionTower)
    assert [cls.__name__ for cls in list(ADAPTERS_FROM_FACTS.values())[:6]] == [  # the converted ones, first
        "LlavaAdapter",
        "VipLlavaAdapter",
        "InternVLAdapter",
        "SmolVLMAdapter",
        "Idefics2Adapter",
        "Mistral3Adapter",
    ]


#: The converted families with a tiny case on the installed transformers (the others are skipped with the reason:
#: e.g. SmolVLM's / Idefics' PIL image processors need torchvision on 5.17).
CONVERTED = [
    pytest.param(t, marks=pytest.mark.skipif(t in UNAVAILABLE, reason=UNAVAILABLE.get(t, ""))) for t in sorted(OLD)
]


def _same(call_old, call_new):
    """Both calls return equal values (tensors, dataclasses of tensors, nested lists) or raise the same error."""
    try:
        old = call_old()
    except (ValueError, RuntimeError) as error:
        with pytest.raises(type(error)) as caught:
            call_new()
        # the same message, but for the class names (Old...) and ViP-LLaVA's own name where LLaVA's was printed
        assert str(caught.value).replace("vipllava:", "llava:") == re.sub(r"\bOld(\w+Adapter)", r"\1", str(error))
        return None
    new = call_new()
    _assert_equal(new, old)
    return old


def _assert_equal(new, old):
    if isinstance(old, torch.Tensor):
        assert new.dtype == old.dtype
        torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)  # unplaced boxes are NaN
    elif isinstance(old, (list, tuple)):
        assert type(new) is type(old) and len(new) == len(old)
        for a, b in zip(new, old, strict=True):
            _assert_equal(a, b)
    elif isinstance(old, dict):
        assert new.keys() == old.keys()
        for key in old:
            _assert_equal(new[key], old[key])
    elif hasattr(old, "__dataclass_fields__"):
        assert type(new) is type(old)
        for name in old.__dataclass_fields__:
            _assert_equal(getattr(new, name), getattr(old, name))
    else:
        assert new == old


@pytest.mark.parametrize("model_type", CONVERTED)
def test_the_data_entry_reads_what_the_code_adapter_read(model_type):
    m, inputs = TINY_CASES[model_type]()
    new, old = get_adapter(m), OLD[model_type](m)
    assert type(new) is ADAPTERS[model_type] and isinstance(new, FactsAdapter) and model_type in new.model_types
    for name in ("multimodal_model", "language_model", "layers", "final_norm", "lm_head", "text_config"):
        assert getattr(new, name) is getattr(old, name), name
    assert new.image_token_id == old.image_token_id and new.video_token_id == old.video_token_id
    num_visual = int(new.visual_token_mask(inputs["input_ids"]).sum())
    counts = _same(
        lambda: old.image_token_counts(num_visual, inputs), lambda: new.image_token_counts(num_visual, inputs)
    )
    assert counts is None or sum(counts) == num_visual
    for modality in ("image", "video"):
        _same(lambda: old.item_token_counts(inputs, modality), lambda: new.item_token_counts(inputs, modality))  # noqa: B023
    _same(lambda: old.visual_token_sources(inputs), lambda: new.visual_token_sources(inputs))
    sizes = [(28, 28), (40, 60), (60, 40), (33, 47)]
    _same(lambda: old.token_boxes(inputs), lambda: new.token_boxes(inputs))
    _same(lambda: old.token_boxes(inputs, sizes), lambda: new.token_boxes(inputs, sizes))
    assert new.rotary_fn() is old.rotary_fn()
    for name in ("vision_feature_layer_index", "vision_has_cls", "vision_local_layer_index"):
        _same(lambda: getattr(old, name), lambda: getattr(new, name))  # noqa: B023
    _same(old.check_attention, new.check_attention)
    if model_type == "mistral3":  # a text model with a sliding window: the same refusal
        new.text_config.sliding_window = 8
        try:
            with pytest.raises(ValueError, match="sliding window") as caught:
                old.check_attention()
            _same(old.check_attention, new.check_attention)
            assert "Mistral Small 3.x" in str(caught.value)
        finally:
            new.text_config.sliding_window = None


def _run(m, inputs, method):
    with torch.no_grad(), method(m):
        out = m(**inputs, use_cache=True)
        kept = [[k.tolist() for k in selection.kept] for selection in method.last_selection]
        generated = m.generate(
            **inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        chosen = [[k.tolist() for k in selection.kept] for selection in method.last_selection]
    cache = out.past_key_values
    lengths = [int(cache.layers[i].get_seq_length()) for i in range(len(cache.layers))]
    return out.logits, kept, lengths, generated, chosen


@pytest.mark.parametrize("model_type", CONVERTED)
@pytest.mark.parametrize("which", ["pio", "vision"])
def test_pruning_through_the_data_entry_equals_the_code_adapter(model_type, which, monkeypatch):
    """The same model and inputs pruned under the old code adapter and under the registered data entry: identical
    logits, kept sets, per-layer KV lengths and generated tokens (PIO after layer 1; a vision-side method)."""
    if which == "vision" and model_type not in VISION_METHOD:
        pytest.skip(f"{model_type}: no vision-side method runs (both adapters refuse them, checked above)")
    name, kwargs = ("pio", {"layers": [1], "keep": 0.25}) if which == "pio" else VISION_METHOD[model_type]
    m, inputs = TINY_CASES[model_type]()
    logits, kept, lengths, generated, chosen = _run(m, inputs, piofvlm.get_method(name, **kwargs))
    monkeypatch.setitem(registry.ADAPTERS, model_type, OLD[model_type])
    assert type(get_adapter(m)) is OLD[model_type]
    old_logits, old_kept, old_lengths, old_generated, _ = _run(m, inputs, piofvlm.get_method(name, **kwargs))
    assert kept == old_kept and lengths == old_lengths
    num_visual = int(get_adapter(m).visual_token_mask(inputs["input_ids"]).sum())
    assert sum(len(k) for stage in kept for k in stage[:1]) < num_visual
    torch.testing.assert_close(logits, old_logits, rtol=0, atol=0)
    assert torch.equal(generated.sequences, old_generated.sequences)
    if which == "pio" and model_type == "llava":  # cached decoding under the data entry == a no-cache forward
        monkeypatch.setitem(registry.ADAPTERS, model_type, ADAPTERS_FROM_FACTS["llava"])
        fixed = FixedSelection(layers=[1], keep=0.25, budget_scope="image", chosen=chosen)
        assert_decode_equals_uncached(m, inputs, generated, fixed, 3)


def test_declare_registers_by_model_type_once(monkeypatch):
    monkeypatch.setattr(registry, "ADAPTERS", dict(registry.ADAPTERS))
    entry = Family(("piofvlm_facts_demo",), "a demonstration entry", parts=(EqualTokensPerImage,))
    cls = declare(entry)
    assert registry.ADAPTERS["piofvlm_facts_demo"] is cls and cls.__name__ == "PiofvlmFactsDemoAdapter"
    with pytest.raises(ValueError, match="already registered"):
        declare(entry)
    assert "piofvlm_facts_demo" not in ADAPTERS  # the package's registry is untouched


def test_settings_become_class_attributes_of_the_declared_adapter(monkeypatch):
    monkeypatch.setattr(registry, "ADAPTERS", dict(registry.ADAPTERS))
    entry = Family(
        ("piofvlm_facts_demo",),
        "a demonstration entry",
        parts=(ClipVisionTower,),
        settings={"feature_layer_field": "some_field"},
        class_name="Demo",
    )
    cls = declare(entry, register=False)
    assert cls.__name__ == "Demo" and cls.feature_layer_field == "some_field" and cls.select_strategy_field
    assert ClipVisionTower.feature_layer_field == "vision_feature_layer"
