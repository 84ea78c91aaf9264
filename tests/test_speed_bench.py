"""The speed benchmark's references (issue 25) compute what they claim, and the decode plan of a pruned cache.

* the direct bound (``bench.speed.direct_prefill``) is the unhooked model's prefill on the kept sequence: with every
  slot kept it equals the unhooked model, with a method's kept slots it equals the method's prefill;
* the decode tax's ``direct`` reference (the unhooked model on a plain cache holding the pruned cache's keys and
  values) decodes exactly what the hooked model decodes, so the tax compares equal work;
* the decode plan (once per cache layout) names, per layer, the segment whose mask it takes, checked against the
  layers the cache holds.
No timing is asserted here: speed goals live in the benchmark (``python -m piofvlm.bench.speed``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import piofvlm
from piofvlm import transformers_compat
from piofvlm.adapters.registry import get_adapter
from piofvlm.bench import flops as fl
from piofvlm.bench import speed
from piofvlm.bench.shapes import build_inputs, build_model, get_shape
from piofvlm.core.cache import _LAYOUT_ATTR


@pytest.fixture(scope="module")
def tiny():
    shape = get_shape("tiny-next")
    model = build_model(shape, torch.float32, "sdpa", "cpu")
    return model, build_inputs(model, shape)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=True, logits_to_keep=1).logits


def _kept_slots(model, inputs, method) -> torch.Tensor:
    """Prompt slots kept by ``method``'s single stage (text tokens and the kept visual ones), from its record."""
    record = method.last_selection[0]
    visual = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    text = torch.nonzero(inputs["input_ids"][0] != model.config.image_token_id).flatten()
    return torch.sort(torch.cat([text, visual[record.kept[0]]])).values


def test_direct_prefill_keeping_every_slot_equals_the_unhooked_model(tiny):
    model, inputs = tiny
    every = torch.arange(inputs["input_ids"].shape[1])
    with torch.no_grad():
        direct = speed.direct_prefill(model, inputs, 2, every)
    torch.testing.assert_close(direct, _logits(model, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer", [1, 2])
def test_direct_prefill_on_a_methods_kept_slots_equals_its_prefill(tiny, layer):
    model, inputs = tiny
    method = piofvlm.get_method("random", keep=0.25, layers=[layer], seed=3)
    with method(model):
        pruned = _logits(model, inputs)
    kept = _kept_slots(model, inputs, method)
    assert kept.numel() < inputs["input_ids"].shape[1]
    with torch.no_grad():
        direct = speed.direct_prefill(model, inputs, layer, kept)
    torch.testing.assert_close(direct, pruned, rtol=0, atol=1e-5)
    # and it is not the unpruned model's answer (the comparison above could not pass by accident)
    assert not torch.allclose(direct, _logits(model, inputs), atol=1e-4)


@pytest.mark.parametrize("name", ["random", "fastv", "pio"])
def test_direct_decode_reference_decodes_what_the_hooked_model_decodes(tiny, name):
    model, inputs = tiny
    method = piofvlm.get_method(name, keep=0.25, layers=[2])
    length = inputs["input_ids"].shape[1]
    with method(model), torch.no_grad():
        pruned = transformers_compat.output_cache(model(**inputs, use_cache=True, logits_to_keep=1))
    plain = speed._plain_copy(pruned, model.config.text_config)
    assert fl.cache_layer_lengths(plain) == fl.cache_layer_lengths(pruned)
    assert not hasattr(plain, _LAYOUT_ATTR)
    ids = torch.tensor([[7]])
    hooked_cache = copy.deepcopy(pruned)
    name = transformers_compat.cache_kwarg_name(model)
    for step in range(3):
        mask = torch.ones(1, length + step + 1, dtype=torch.long)
        with torch.no_grad():
            with method(model):
                hooked = model(input_ids=ids, attention_mask=mask, **{name: hooked_cache}).logits
            direct = model(input_ids=ids, attention_mask=mask, **{name: plain}).logits
        torch.testing.assert_close(hooked, direct, rtol=0, atol=1e-5)
        ids = hooked[:, -1:].argmax(-1)


def test_decode_plan_names_each_layers_segment(tiny):
    """Two prune points on a 4-layer model: layers 0 untouched, 1-2 the first segment, 3 the second."""
    model, inputs = tiny
    method = piofvlm.get_method("random", keep=[0.5, 0.25], layers=[1, 3])
    with method(model), torch.no_grad():
        cache = transformers_compat.output_cache(model(**inputs, use_cache=True, logits_to_keep=1))
        layout = getattr(cache, _LAYOUT_ATTR)
        plan = layout.decode_plan(get_adapter(model))
    lengths = fl.cache_layer_lengths(cache)
    assert lengths[0] == inputs["input_ids"].shape[1] > lengths[1] == lengths[2] > lengths[3]
    assert plan == (None, (0, "full_attention"), (0, "full_attention"), (1, "full_attention"))
    for index, entry in enumerate(plan):  # each segment's mask spans exactly the keys its layers hold
        if entry is not None:
            assert layout.segments[entry[0]].valid.shape[1] == lengths[index]
    assert layout.decode_plan(get_adapter(model)) is plan  # computed once per layout


def test_speed_render_quick_parts(tmp_path):
    """The report of a quick run of two parts has one row per method and a finite tax."""
    result = speed.run(
        speed.SpeedConfig(
            preset="tiny", num_layers=None, prefill_preset="tiny-next", prefill_layers=None, repeats=1,
            prefill_repeats=1, decode_steps=2, caches=["dynamic"], methods=["random", "fastv"],
            parts=["decode", "prefill"],
        )
    )  # fmt: skip
    assert [row["method"] for row in result["decode"]] == ["random", "fastv"]
    assert all(row["hooked_ms"] > 0 and row["direct_ms"] > 0 for row in result["decode"])
    assert [row["variant"] for row in result["prefill"]["rows"]] == ["none", "direct", "random", "fastv"]
    text = speed.render(result)
    assert "direct (same lengths)" in text and "fraction of the direct bound" in text


@pytest.mark.slow
def test_compiled_reduce_overhead_decode_under_a_method_equals_eager():
    """inductor with ``mode="reduce-overhead"`` (CUDA graphs on a GPU; on the CPU inductor alone) through
    ``generate()``'s ``compile_config``, static cache, under PIO and unhooked: the same tokens as eager decoding."""
    config = speed.SpeedConfig(**{**speed.QUICK, "compile_methods": ["pio"], "compile_mode": "reduce-overhead"})
    shape = speed._shape(config.preset, config.num_layers, config.width)
    model = build_model(shape, torch.float32, "sdpa", "cpu")
    rows = speed.compiled_decode(model, build_inputs(model, shape), config, config.compile_mode)
    assert [row["method"] for row in rows] == ["none", "pio"]
    assert all(row["tokens_equal"] for row in rows), rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_passes_the_models_none_mask_only_where_it_is_exact(tiny, attn, monkeypatch):
    """Unpadded SDPA decoding: the pruned layers get the model's own ``None`` mask (no mask built per step); eager:
    a mask built for the segment's shorter cache, sized to its keys. Logits equal a no-cache forward either way (the
    invariant suites); here the path taken is checked."""
    model, inputs = tiny
    model.set_attn_implementation(attn)
    try:
        method = piofvlm.get_method("random", keep=0.25, layers=[2])
        seen: list = []
        built: list = []
        name = transformers_compat.cache_kwarg_name(model)
        build = transformers_compat.causal_padding_mask

        def spy(module, args, kwargs):
            seen.append(kwargs.get("attention_mask"))

        def counting(*args, **kwargs):
            built.append(args[2] if len(args) > 2 else kwargs.get("query_length"))
            return build(*args, **kwargs)

        with method(model), torch.no_grad():
            # registered after the method's hook on layer 3, so it sees what the method passes on
            handle = get_adapter(model).layers[3].register_forward_pre_hook(spy, with_kwargs=True)
            try:
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                cache = transformers_compat.output_cache(out)
                kept = fl.cache_layer_lengths(cache)[3]
                seen.clear()
                mask = torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)
                monkeypatch.setattr(transformers_compat, "causal_padding_mask", counting)
                model(input_ids=torch.tensor([[7]]), attention_mask=mask, **{name: cache})
            finally:
                handle.remove()
                monkeypatch.undo()
        assert len(seen) == 1
        assert get_adapter(model).default_decode_mask
        if attn == "sdpa":
            # the model's own None mask, and no mask built by the mechanism (the same function would give None too,
            # so only the count of masks built tells the paths apart)
            assert seen[0] is None and built == []
        else:
            assert isinstance(seen[0], torch.Tensor) and seen[0].shape[-1] == kept + 1
            assert len(built) == 1  # one mask per step and segment, shared by the segment's layers
    finally:
        model.set_attn_implementation("sdpa")
