"""A common-layout family declared as data (``adapters/facts.py``): LLaVA-1.5 written as a ``Family`` entry
(``LLAVA_AS_DATA``) builds an adapter that reads the same module tree as LLaVA's code adapter, and a model pruned
through it gives the same logits, kept sets and cached decoding. ``declare`` registers an entry by model type."""

from __future__ import annotations

import pytest
import torch

import piofvlm
from conftest import FixedSelection, assert_decode_equals_uncached
from piofvlm.adapters import ADAPTERS, get_adapter, registry
from piofvlm.adapters.facts import COMMON_FAMILIES, LLAVA_AS_DATA, FactsAdapter, Family, declare
from piofvlm.adapters.llava import LlavaAdapter
from piofvlm.adapters.parts import EqualTokensPerImage
from piofvlm.tiny.cases import TINY_CASES

DataLlava = declare(LLAVA_AS_DATA, register=False)


def test_the_adapter_is_built_from_the_data_entry():
    m, _ = TINY_CASES["llava"]()
    code, data = LlavaAdapter(m), DataLlava(m)
    assert (
        isinstance(data, FactsAdapter) and isinstance(data, EqualTokensPerImage) and not isinstance(data, LlavaAdapter)
    )
    assert type(data).family is LLAVA_AS_DATA and type(data).model_types == ("llava",)
    assert data.language_model is code.language_model is m.model.language_model
    assert data.layers is code.layers and data.num_layers == code.num_layers
    assert data.final_norm is code.final_norm and data.lm_head is code.lm_head is m.lm_head
    assert data.image_token_id == code.image_token_id == m.config.image_token_id
    assert type(get_adapter(m)) is LlavaAdapter  # not registered: llava keeps its code adapter
    assert all(ADAPTERS[model_type].family is f for f in COMMON_FAMILIES for model_type in f.model_types)


def _pruned(m, inputs):
    method = piofvlm.get_method("pio", layers=[1], keep=0.25)
    with torch.no_grad(), method(m):
        logits = m(**inputs).logits
        kept = [k.tolist() for k in method.last_selection[0].kept]
        out = m.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
        chosen = [[k.tolist() for k in method.last_selection[0].kept]]
    return method, logits, kept, out, chosen


def test_pruning_through_the_data_entry_equals_the_code_adapter(monkeypatch):
    """The same model and inputs pruned with PIO (a quarter after layer 1) under the code adapter and under the
    data entry (registered for ``llava`` for this test): identical logits, kept sets and generated tokens; cached
    decoding under the data entry equals a no-cache forward of the same kept sequence."""
    m, inputs = TINY_CASES["llava"]()
    _, code_logits, code_kept, code_out, _ = _pruned(m, inputs)
    monkeypatch.setitem(ADAPTERS, "llava", DataLlava)
    assert type(get_adapter(m)) is DataLlava
    method, logits, kept, out, chosen = _pruned(m, inputs)
    assert kept == code_kept and sum(map(len, kept)) < int(get_adapter(m).visual_token_mask(inputs["input_ids"]).sum())
    torch.testing.assert_close(logits, code_logits, rtol=0, atol=0)
    assert torch.equal(out.sequences, code_out.sequences)
    fixed = FixedSelection(layers=[1], keep=0.25, budget_scope=method.budget_scope, chosen=chosen)
    assert_decode_equals_uncached(m, inputs, out, fixed, 3)


def test_declare_registers_by_model_type_once(monkeypatch):
    monkeypatch.setattr(registry, "ADAPTERS", dict(registry.ADAPTERS))
    entry = Family(("piofvlm_facts_demo",), "a demonstration entry", parts=(EqualTokensPerImage,))
    cls = declare(entry)
    assert registry.ADAPTERS["piofvlm_facts_demo"] is cls and cls.__name__ == "PiofvlmFactsDemoAdapter"
    with pytest.raises(ValueError, match="already registered"):
        declare(entry)
    assert "piofvlm_facts_demo" not in ADAPTERS  # the package's registry is untouched
