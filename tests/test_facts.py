"""A common-layout family declared as data (``adapters/facts.py``): VipLLaVA, from one ``Family`` entry.

Besides these, the family joins every matrix through ``toy_families.FAMILIES`` (as LLaVA's twin: the quick tests in
the fast suite, the whole matrices in the slow one) and ``test_methods_matrix.REFUSED`` (encoder-side methods).
"""

from __future__ import annotations

import torch

import piofvlm
from conftest import FixedSelection, assert_decode_equals_uncached
from piofvlm.adapters import ADAPTERS, get_adapter
from piofvlm.adapters.facts import COMMON_FAMILIES, FactsAdapter
from piofvlm.toy_families import FAMILIES

VIP = FAMILIES["vipllava"]


def test_the_adapter_is_built_from_the_data_entry():
    m = VIP.build(num_layers=3)
    adapter = get_adapter(m)
    assert isinstance(adapter, FactsAdapter) and type(adapter) is ADAPTERS["vipllava"]
    assert type(adapter).family in COMMON_FAMILIES
    assert adapter.language_model is m.model.language_model
    assert adapter.layers is m.model.language_model.layers and adapter.num_layers == 3
    assert adapter.final_norm is m.model.language_model.norm and adapter.lm_head is m.lm_head
    assert adapter.image_token_id == m.config.image_token_id == 4


def test_kept_counts_batch_equals_single_and_cached_decode():
    """A quarter of each image's 49 tokens is kept after layer 1; each sample of the batch gets the logits, kept set
    and tokens it gets alone; cached decoding equals a no-cache forward of the same kept sequence."""
    m = VIP.build(num_layers=3)
    batch = VIP.inputs((0, 1, 2))
    method = piofvlm.get_method("pio", layers=[1], keep=0.25)
    with torch.no_grad(), method(m):
        logits = m(**batch).logits[:, -1]
        kept = [k.tolist() for k in method.last_selection[0].kept]
        assert [len(k) for k in kept] == [sum(round(c / 4) for c in counts) for counts in VIP.counts]
        for i in range(3):
            single = VIP.inputs((i,))
            torch.testing.assert_close(m(**single).logits[:, -1], logits[i : i + 1], rtol=1e-4, atol=1e-5)
            assert [k.tolist() for k in method.last_selection[0].kept] == [kept[i]]
        out = m.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
        chosen = [[k.tolist() for k in method.last_selection[0].kept]]
    fixed = FixedSelection(layers=[1], keep=0.25, budget_scope=method.budget_scope, chosen=chosen)
    assert_decode_equals_uncached(m, batch, out, fixed, 3)
