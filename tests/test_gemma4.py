"""Gemma 4: per-layer inputs, KV-shared layers, sliced ``generate()`` prefill, vision blocks in local layers only. The
standard invariants run in the parametrized matrices of ``test_qwen.py`` / ``test_methods_matrix.py`` (keep-all
identity, exact counts, cached decode == no-cache forward, batch == single, generate == forward); here, what is
particular to the family.

The tiny model (``tiny.families.build_gemma4``): 4 computing layers (local, global, local, global; a 16-slot window)
and one KV-shared global layer that attends with layer 3's keys; per-layer inputs of 8 dims; images of 16, 24 and 32
tokens (variable counts, as Gemma 4's processor gives).
"""

from __future__ import annotations

import pytest
import torch

import piofvlm
from conftest import FixedSelection, assert_decode_equals_uncached
from piofvlm import transformers_compat
from piofvlm.adapters import get_adapter
from piofvlm.methods.pio import proxy_loss
from piofvlm.tiny.families import GEMMA4_COUNTS, GEMMA4_IMAGE_ID, GEMMA4_WINDOW, UNAVAILABLE
from test_gemma3 import every_third_image_token
from test_pio import capture_context
from test_qwen import make_inputs, model

pytestmark = pytest.mark.skipif("gemma4" in UNAVAILABLE, reason=UNAVAILABLE.get("gemma4", ""))


def _kept_sequence_reference(m, inputs, keep_slot: torch.Tensor, positions: str) -> torch.Tensor:
    """Logits of the unhooked model run on the kept tokens alone (``(1, S')``): embeddings with the image features
    merged, the kept ones gathered with their token-identity per-layer inputs and ``mm_token_type_ids`` (so the
    vision blocks are the kept tokens' runs) and their positions (original ones, or ``0..S'-1``)."""
    lm = m.model.language_model
    with torch.no_grad():
        ids = inputs["input_ids"]
        visual = ids == GEMMA4_IMAGE_ID
        text_ids = ids.masked_fill(visual, lm.config.pad_token_id)
        embeds = m.model.get_input_embeddings()(text_ids)
        features = m.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
        embeds = embeds.masked_scatter(visual[..., None].expand_as(embeds), torch.cat(features).to(embeds.dtype))
        identity = lm.get_per_layer_inputs(text_ids)  # (1, S, L, d_ple): what Gemma4Model computes from the ids
        kept = embeds[:, keep_slot]
        length = kept.shape[1]
        position_ids = torch.arange(keep_slot.shape[0])[keep_slot][None] if positions == "keep" else None
        out = m.model(
            inputs_embeds=kept,
            per_layer_inputs=identity[:, keep_slot],
            mm_token_type_ids=inputs["mm_token_type_ids"][:, keep_slot],
            attention_mask=torch.ones(1, length, dtype=torch.long),
            position_ids=position_ids,
        )
        return m.lm_head(out.last_hidden_state)


@pytest.mark.parametrize("positions", ["keep", pytest.param("renumber", marks=pytest.mark.slow)])
def test_pruned_before_layer_0_equals_the_model_on_the_kept_tokens(positions):
    """Pruned before layer 0, every layer (the KV-shared one included) must compute what the stock model computes on
    the kept tokens alone: per-layer inputs of the kept tokens, local windows over the last 16 kept slots, the kept
    tokens of each image attending to each other in local layers. Every kept position's logits are compared."""
    m = model("gemma4")
    inputs = make_inputs("gemma4", indices=(2,))  # two images, one sample: no padding
    ids = inputs["input_ids"][0]
    chosen, keep_slot = every_third_image_token(ids, GEMMA4_IMAGE_ID)  # over both images
    kept_positions = torch.arange(ids.shape[0])[keep_slot]
    assert int(kept_positions[-GEMMA4_WINDOW]) < ids.shape[0] - GEMMA4_WINDOW  # the window rules differ here
    fixed = FixedSelection(layers=[0], keep=len(chosen), budget_scope="sample", chosen=[[chosen]], positions=positions)
    with torch.no_grad(), fixed(m):
        pruned = m(**inputs).logits
    reference = _kept_sequence_reference(m, inputs, keep_slot, positions)
    assert pruned.shape == reference.shape == (1, int(keep_slot.sum()), reference.shape[-1])
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-5)


def test_per_layer_inputs_are_gathered_with_the_kept_tokens():
    """After a prune point each layer's per-layer input holds the rows of the kept tokens, in order (a hook put after
    the mechanism's sees what the layer gets); before it, the model's own rows."""
    m = model("gemma4")
    inputs = make_inputs("gemma4", indices=(1,))
    layers = m.model.language_model.layers

    def run(method=None) -> dict[int, torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}

        def record(module, args, kwargs):
            seen[module.self_attn.layer_idx] = args[1].clone()

        with torch.no_grad():
            handle = method.apply(m) if method is not None else None
            hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
            try:
                m(**inputs)
            finally:
                for hook in hooks:
                    hook.remove()
                if handle is not None:
                    handle.remove()
        return seen

    unhooked = run()
    method = piofvlm.get_method("random", layers=[2], keep=0.25, seed=3)
    gathered = run(method)
    kept = method.last_selection[0].kept[0]
    visual = (inputs["input_ids"][0] == GEMMA4_IMAGE_ID).nonzero()[:, 0]
    keep_slot = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep_slot[visual] = False
    keep_slot[visual[kept]] = True
    assert int(keep_slot.sum()) < keep_slot.shape[0]
    for index in (2, 3, 4):
        assert torch.equal(gathered[index], unhooked[index][:, keep_slot])
    for index in (0, 1):
        assert torch.equal(gathered[index], unhooked[index])


def test_generate_prefill_runs_shared_layers_on_the_last_token_with_sliced_inputs():
    """``logits_to_keep=1`` (what generate() passes) runs the KV-shared layer on the last token only: its mask row,
    rotary row and per-layer input are sliced; the last logits equal those of the full pruned forward."""
    m = model("gemma4")
    inputs = make_inputs("gemma4")
    method = piofvlm.get_method("random", layers=[1], keep=0.5, seed=1)
    shapes = []
    shared = m.model.language_model.layers[-1]
    hook = shared.register_forward_hook(lambda module, args, out: shapes.append(out.shape[1]))
    try:
        with torch.no_grad(), method(m):
            full = m(**inputs).logits
            last = m(**inputs, logits_to_keep=1).logits
            three = m(**inputs, logits_to_keep=3).logits
    finally:
        hook.remove()
    assert shapes == [full.shape[1], 1, 3]
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(three, full[:, -3:], rtol=1e-5, atol=1e-6)  # causal rows among the sliced queries


def test_logits_to_keep_reaching_pruned_tokens_is_refused():
    """The shared layers' sliced rows must be the prompt's last tokens; 17 rows reach into the image (eager: the model
    always slices, sdpa skips slicing when an unpadded mask is None)."""
    m = model("gemma4", "eager")
    inputs = make_inputs("gemma4", indices=(0,))
    text_after = 12  # "<image|> what is the colour of the circle ? ASSISTANT :" is 11 tokens
    with torch.no_grad(), piofvlm.get_method("random", layers=[1], keep=0.5)(m):
        with pytest.raises(ValueError, match="logits_to_keep"):
            m(**inputs, logits_to_keep=text_after + 5)


def test_kv_shared_layer_decodes_with_the_storing_layers_cache():
    """The KV-shared layer holds no cache (a DummyLayer): its decode mask is sized from layer 3's, whose keys it reads;
    cached decoding after pruning at layer 3 equals a no-cache forward of the same kept sequence, step by step."""
    m = model("gemma4")
    adapter = get_adapter(m)
    assert [adapter.kv_layer(i) for i in range(5)] == [0, 1, 2, 3, 3]
    assert adapter.last_prune_point() == 3
    inputs = make_inputs("gemma4")
    method = piofvlm.get_method("random", layers=[3], keep=0.25, seed=0)
    with torch.no_grad(), method(m):
        out = m.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert type(transformers_compat.output_cache(out).layers[4]).__name__ == "DummyLayer"
    chosen = [[k.tolist() for k in method.last_selection[0].kept]]
    assert [len(k) for k in chosen[0]] == [sum(c) // 4 for c in GEMMA4_COUNTS]  # a quarter of each image
    fixed = FixedSelection(layers=[3], keep=0.25, budget_scope=method.budget_scope, chosen=chosen)
    assert_decode_equals_uncached(m, inputs, out, fixed, 4)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"name": "random", "layers": [4], "keep": 0.5}, r"prune point\(s\) \[4\].*KV-shared.*<= 3"),
        ({"name": "fastv", "layers": [2], "keep": 0.5}, "fastv is not supported on gemma4"),
        ({"name": "pio", "layers": [2], "keep": 0.5, "proxy_layer": "previous"}, "proxy_layer='previous'.*gemma4"),
    ],
)
def test_unsupported_configurations_are_refused(fields, match):
    m = model("gemma4")
    fields = dict(fields)
    method = piofvlm.get_method(fields.pop("name"), **fields)
    with pytest.raises(ValueError, match=match):
        method.apply(m)


def test_fully_bidirectional_text_is_refused():
    m = model("gemma4")
    inputs = make_inputs("gemma4", indices=(0,))
    config = m.config.text_config
    config.use_bidirectional_attention = "all"
    try:
        with pytest.raises(ValueError, match="use_bidirectional_attention='all'"):
            with torch.no_grad(), piofvlm.get_method("random", layers=[1], keep=0.5)(m):
                m(**inputs)
    finally:
        config.use_bidirectional_attention = "vision"


def test_vision_blocks_only_in_local_layers():
    """The keys an image token's query sees: its whole image (forward too) in local layers, causal in global ones."""
    m = model("gemma4")
    adapter = get_adapter(m)
    inputs = make_inputs("gemma4", indices=(0,))
    ids = inputs["input_ids"]
    valid = torch.ones_like(ids, dtype=torch.bool)
    source = torch.arange(ids.shape[1])[None]
    first = int((ids[0] == GEMMA4_IMAGE_ID).nonzero()[0])
    query = torch.tensor([[first]])
    local = adapter.allowed_keys("sliding_attention", valid, source, query, dict(inputs))[0, 0, 0]
    glob = adapter.allowed_keys("full_attention", valid, source, query, dict(inputs))[0, 0, 0]
    image = ids[0] == GEMMA4_IMAGE_ID
    assert bool(local[image].all())  # the first image token sees its whole image
    assert torch.equal(glob, torch.arange(ids.shape[1]) <= first)


def test_pio_takes_the_reference_proxy():
    """No fast proxy for Gemma 4 (rotary_fn is None): fast=True gives the reference gradient exactly."""
    m = model("gemma4")
    inputs = make_inputs("gemma4")
    ctx = capture_context(m, inputs, layer=2)
    assert ctx.adapter.rotary_fn() is None and "per_layer_input" in ctx.layer_inputs
    fast = proxy_loss.proxy_gradient(ctx, 2, fast=True)
    reference = proxy_loss.proxy_gradient(ctx, 2, fast=False)
    assert torch.equal(fast, reference)
    assert bool((fast[ctx.visual] != 0).any())


def test_item_counts_and_token_boxes_follow_the_image_grids():
    m = model("gemma4")
    adapter = get_adapter(m)
    inputs = make_inputs("gemma4")
    assert adapter.item_token_counts(dict(inputs), "image") == [n for counts in GEMMA4_COUNTS for n in counts]
    items = adapter.token_boxes(dict(inputs))
    assert [len(item.tokens) for item in items] == [n for counts in GEMMA4_COUNTS for n in counts]
    assert [item.sample for item in items] == [0, 1, 1, 2, 2]
    wide = items[1]  # 8 x 16 patches pooled 2 x 2: 4 rows of 8
    assert wide.boxes[7].tolist() == pytest.approx([7 / 8, 0.0, 1.0, 1 / 4])
    assert wide.boxes[8].tolist() == pytest.approx([0.0, 1 / 4, 1 / 8, 1 / 2])


def test_cache_lengths_after_pruning():
    """After pruning at layer 1: layer 0 holds the prompt, layers 1-3 the kept sequence (local ones their last window),
    the shared layer nothing (it reads layer 3's)."""
    m = model("gemma4")
    inputs = make_inputs("gemma4")
    method = piofvlm.get_method("random", layers=[1], keep=0.5)
    with torch.no_grad(), method(m):
        out = m(**inputs, use_cache=True)
    cache = transformers_compat.output_cache(out)
    length = inputs["input_ids"].shape[1]
    kept = [len(k) for k in method.last_selection[0].kept]
    text = ((inputs["input_ids"] != GEMMA4_IMAGE_ID) & inputs["attention_mask"].bool()).sum(1)
    kept_length = int((text + torch.tensor(kept)).max())
    assert [cache.get_seq_length(i) for i in range(4)] == [length, *[kept_length] * 3]
    assert [transformers_compat.visible_past_keys(cache, i, 1) for i in range(4)] == [
        GEMMA4_WINDOW - 1,
        kept_length,
        GEMMA4_WINDOW - 1,
        kept_length,
    ]


def test_refused_on_a_transformers_release_it_is_not_tested_on(monkeypatch):
    assert transformers_compat.gemma4_unsupported_reason("5.24.0") is None
    reason = transformers_compat.gemma4_unsupported_reason("5.17.0")
    assert reason is not None and ">= 5.24.0" in reason and "5.17.0" in reason
    m = model("gemma4")
    monkeypatch.setattr(transformers_compat, "TRANSFORMERS_VERSION", "5.17.0")
    with pytest.raises(ValueError, match="gemma4 models on transformers >= 5.24.0"):
        piofvlm.get_method("random", keep=0.5, layers=[1]).apply(m)
