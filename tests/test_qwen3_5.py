"""Qwen3.5: what the family matrices of test_qwen.py / test_methods_matrix.py do not cover. Hybrid stacks: the state of
the linear-attention layers after a pruned prefill, decoding with the checkpoints' 3 : 1 pattern, attention-reading
methods at linear and full-attention layers, the gated queries, the PIO proxy through a linear layer, static caches."""

from __future__ import annotations

import functools

import pytest
import torch

import piofvlm
from conftest import FixedSelection, assert_decode_equals_uncached
from piofvlm import transformers_compat
from piofvlm.adapters import get_adapter
from piofvlm.methods.pio import proxy_loss
from piofvlm.methods.shared.attention import layer_attention
from piofvlm.tiny.families import build_qwen3_5, qwen3_5_inputs
from test_pio import capture_context
from test_qwen import SUPPRESS, expected_kept, visual_counts

SLOW = pytest.mark.slow
#: The released checkpoints' pattern: layers 0-2 linear attention, layer 3 full attention.
THREE_TO_ONE: list[str] = []


#: ``model(pattern)``: layer types of the tiny Qwen3.5 (``None``: the family default, linear and full alternating).
PATTERNS: dict[str, list[str] | None] = {
    "3:1": THREE_TO_ONE,
    "1:1": None,
    "full_first": ["full_attention", "linear_attention", "linear_attention", "linear_attention"],
}


@functools.cache
def model(pattern: str = "3:1", attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    return build_qwen3_5(attn=attn, dtype=dtype, layer_types=PATTERNS[pattern])


def lm_inputs(m, inputs) -> dict:
    """The language model's ``inputs_embeds`` and 3-D ``position_ids`` of an unhooked call."""
    captured = {}
    hook = m.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True
    )
    try:
        with torch.no_grad():
            m(**inputs)
    finally:
        hook.remove()
    return captured


def kept_sequence_run(m, inputs, prune_layer: int, keep_slot: torch.Tensor):
    """Independent of piofvlm: the stock model's hidden states entering ``prune_layer`` (one unpadded sample), the
    ``keep_slot`` slots gathered, then the stock decoder layers from ``prune_layer`` on with a fresh cache. Returns
    ``(cache, last-position logits)``."""
    from transformers import DynamicCache

    lm = m.model.language_model
    position_ids = lm_inputs(m, inputs)["position_ids"][..., keep_slot]  # (3, 1, S')
    with torch.no_grad():
        hidden = m(**inputs, output_hidden_states=True).hidden_states[prune_layer][:, keep_slot]
        cache = DynamicCache(config=lm.config)
        rotary = lm.rotary_emb(hidden, position_ids)
        for index in range(prune_layer, len(lm.layers)):
            layer = lm.layers[index]
            hidden = layer(
                hidden,
                position_embeddings=rotary,
                attention_mask=None,  # one unpadded sample: causal attention, no padding for the linear layers
                **{transformers_compat.cache_kwarg_name(layer): cache},
                use_cache=True,
            )
        logits = m.lm_head(lm.norm(hidden))[:, -1]
    return cache, logits


@pytest.mark.parametrize(
    ("pattern", "prune_layer"), [("3:1", 1), pytest.param("3:1", 3, marks=SLOW), pytest.param("1:1", 2, marks=SLOW)]
)
def test_linear_states_after_pruning_equal_a_run_on_the_kept_sequence(pattern, prune_layer):
    """Padded batch of 3, a fixed selection at one prune point: each linear-attention layer after it holds the conv and
    recurrent state of the stock layers run on that sample's kept sequence alone; the layers before it hold the
    state of the unpruned prompt; the logits agree."""
    m = model(pattern)
    inputs = qwen3_5_inputs()
    counts = [sum(c) for c in visual_counts("qwen3_5", inputs)]
    chosen = [[list(range(n % 3, n, 3))[:5] for n in counts]]  # 5 visual tokens of each sample, 3 apart
    fixed = FixedSelection(layers=[prune_layer], keep=5, budget_scope="sample", chosen=chosen)
    with torch.no_grad(), fixed(m):
        out = m(**inputs, use_cache=True)
    cache = transformers_compat.output_cache(out)
    adapter = get_adapter(m)
    for b in range(3):
        single = qwen3_5_inputs((b,))
        visual = adapter.visual_token_mask(single["input_ids"])[0]
        keep_slot = ~visual
        keep_slot[visual.nonzero()[chosen[0][b], 0]] = True
        expected_cache, expected_logits = kept_sequence_run(m, single, prune_layer, keep_slot)
        with torch.no_grad():
            unpruned = transformers_compat.output_cache(m(**single, use_cache=True))
        for index in range(adapter.num_layers):
            if adapter.is_attention_layer(index):
                continue
            got = [s[b] for s in transformers_compat.linear_attention_states(cache, index)]
            source = expected_cache if index >= prune_layer else unpruned
            want = [s[0] for s in transformers_compat.linear_attention_states(source, index)]
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.logits[b, -1], expected_logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("layers", "keep"),
    [([2], [0.3]), pytest.param([1, 3], [0.6, 0.3], marks=SLOW), pytest.param([0], [0.5], marks=SLOW)],
)
def test_decode_continuity_three_to_one(layers, keep):
    """The checkpoints' pattern: pruned before linear layers and before the only attention layer (which
    transformers reads the cache length from: it is left-padded), cached decoding == a no-cache forward."""
    m = model("3:1")
    inputs = qwen3_5_inputs()
    method = piofvlm.get_method("pio", layers=layers, keep=keep)
    with torch.no_grad(), method(m):
        generated = m.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            suppress_tokens=SUPPRESS,
        )
    cache = generated.past_key_values
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 3  # the prompt length, padded, + decoded
    chosen = [[k.tolist() for k in record.kept] for record in method.last_selection]
    fixed = FixedSelection(layers=layers, keep=keep, chosen=chosen)
    assert_decode_equals_uncached(m, inputs, generated, fixed, 4)


@SLOW  # the quick suite checks keep-all on the 1:1 model (tests/test_qwen.py)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_three_to_one_is_identical(attn):
    m = model("3:1", attn)
    inputs = qwen3_5_inputs()
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = m(**inputs).logits
        reference_gen = m.generate(**inputs, max_new_tokens=4, do_sample=False)
        with piofvlm.get_method("pio", layers=[1, 3], keep=[1.0, 1.0])(m):
            pruned = m(**inputs).logits
            pruned_gen = m.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(pruned[valid], reference[valid])
    assert torch.equal(pruned_gen, reference_gen)


@pytest.mark.parametrize(
    ("name", "fields", "layer"),
    [
        ("fastv", {"layers": [2]}, 1),
        ("fastv", {"layers": [2], "attention_layer": "next"}, 2),
        ("pdrop", {"layers": [1, 3], "keep": [0.5, 0.25]}, 1),
        ("sparsevlm", {"layers": [1]}, 1),
        ("dart", {"layers": [3]}, 2),
    ],
)
def test_attention_methods_refuse_linear_layers(name, fields, layer):
    m = model("3:1")
    before = len(m._forward_pre_hooks)
    message = (
        rf"{name} reads the attention map .* decoder layer {layer}, which in qwen3_5 models is a linear-attention"
    )
    with pytest.raises(ValueError, match=message + r".*full-attention layers are \[3\]"):
        piofvlm.get_method(name, **fields).apply(m)
    assert len(m._forward_pre_hooks) == before


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("fastv", {"layers": [3], "attention_layer": "next"}),
        pytest.param("sparsevlm", {"layers": [3]}, marks=SLOW),
        pytest.param("dart", {"layers": [3], "key_layer": "next", "image_pivots": 2, "text_pivots": 2}, marks=SLOW),
        pytest.param("pdrop", {"layers": [3], "keep": 0.3}, marks=SLOW),
    ],
)
def test_attention_methods_run_at_the_attention_layer(name, fields):
    m = model("3:1")
    inputs = qwen3_5_inputs()
    fields = {"keep": 0.3, **fields}
    method = piofvlm.get_method(name, **fields)
    with torch.no_grad(), method(m):
        out = m(**inputs)
    assert torch.isfinite(out.logits).all()
    expected = [sum(expected_kept(0.3, n) for n in sample) for sample in visual_counts("qwen3_5", inputs)]
    assert [len(k) for k in method.last_selection[-1].kept] == expected


def test_explicit_attention_equals_the_models_attention_map():
    """The gated queries (``q_proj`` gives query and gate side by side): the explicit attention of layer 3 equals
    the attention weights the eager model returns there."""
    m = model("3:1", "eager")
    inputs = qwen3_5_inputs((1,))
    lm = m.model.language_model
    with torch.no_grad():
        out = m(**inputs, output_hidden_states=True, output_attentions=True)
        hidden = out.hidden_states[3]
        position_ids = lm_inputs(m, inputs)["position_ids"]
        rotary = lm.rotary_emb(hidden, position_ids)
        valid = torch.ones(hidden.shape[:2], dtype=torch.bool)
        slots = torch.tensor([[hidden.shape[1] - 1, 10]])
        probs = layer_attention(get_adapter(m), 3, hidden, rotary, valid, slots)
    attentions = [a for a in out.attentions if a is not None]
    assert len(attentions) == 1  # only the full-attention layer has a map
    torch.testing.assert_close(probs, attentions[0][:, :, slots[0]].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("pattern", "layer"), [("1:1", 1), ("1:1", 2), pytest.param("3:1", 3, marks=SLOW)])
def test_fast_proxy_equals_reference_fp64(pattern, layer):
    """Gated full-attention proxy (layers 1, 3) and linear-attention proxy (layer 2): same gradient, padded batch."""
    m = model(pattern, dtype=torch.float64)
    inputs = qwen3_5_inputs()
    for key in ("pixel_values", "pixel_values_videos"):
        inputs[key] = inputs[key].to(torch.float64)
    ctx = capture_context(m, inputs, layer=layer)
    fast = proxy_loss.proxy_gradient(ctx, layer, fast=True)
    reference = proxy_loss.proxy_gradient(ctx, layer, fast=False)
    assert (fast - reference)[ctx.valid].abs().max().item() < 1e-10
    assert fast[ctx.valid].abs().max().item() > 1e-6  # the gradient reaches the tokens
    assert all(p.grad is None for p in m.parameters())


def test_next_attention_proxy_skips_linear_layers():
    """``proxy_layer="next_attention"`` at prune point 1 of the 3 : 1 model back-propagates through layer 3 (the hidden
    states entering layer 1 fed to layer 3); ``"next"`` through layer 1 itself."""
    m = model("3:1")
    inputs = qwen3_5_inputs()
    ctx = capture_context(m, inputs, layer=1)
    for proxy, index in (("next_attention", 3), ("next", 1)):
        method = piofvlm.get_method("pio", layers=[1], keep=0.3, proxy_layer=proxy)
        with torch.no_grad(), method(m):
            m(**inputs)
        expected = proxy_loss.proxy_gradient(ctx, index).norm(dim=-1)
        for b, scores in enumerate(method.last_selection[0].scores):
            torch.testing.assert_close(scores, expected[b][ctx.groups[b] >= 0].float(), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="no full-attention layer at or after layer 1"):
        piofvlm.get_method("pio", layers=[1], proxy_layer="next_attention").apply(model("full_first"))


def test_static_cache_is_refused():
    m = model("1:1")
    inputs = qwen3_5_inputs((0,))
    with pytest.raises(ValueError, match=r"static KV caches .*LinearAttentionLayer.*linear-attention layers"):
        with torch.no_grad(), piofvlm.get_method("random", layers=[1], keep=0.5)(m):
            m.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("layers", [[2], pytest.param([1, 3], marks=SLOW)])
def test_second_turn_on_the_returned_cache_equals_no_cache_reference(layers):
    """A follow-up (several tokens: the linear layers continue their states, the attention layers their pruned KV)
    on the cache of a pruned generation == a no-cache forward of the whole conversation keeping the same tokens."""
    from test_reliability import extended_mask, pruned_conversation

    m = model("3:1")
    inputs = qwen3_5_inputs((0, 2))
    keep = [0.4] * len(layers)
    method = piofvlm.get_method("random", layers=layers, keep=keep)
    records, ids, logits = pruned_conversation(m, inputs, method)
    chosen = [[k.tolist() for k in record.kept] for record in records]
    added = ids.shape[1] - inputs["input_ids"].shape[1]
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    rest["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, added))
    with torch.no_grad(), FixedSelection(layers=layers, keep=keep, chosen=chosen)(m):
        expected = m(input_ids=ids, attention_mask=extended_mask(inputs, ids), use_cache=False, **rest).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
