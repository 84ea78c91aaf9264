"""Gemma 3: local (sliding-window) and global layers, bidirectional image blocks. The standard invariants run in the
parametrized matrices of ``test_qwen.py`` / ``test_methods_matrix.py``; here, what is particular to the family.

The tiny model alternates local and global layers (local first) with a 16-slot window, shorter than every standard
prompt, so pruning changes what a window covers. The decision tested: **a window counts kept slots**.
"""

from __future__ import annotations

import pytest
import torch

import piofvlm
from conftest import FixedSelection
from piofvlm import transformers_compat
from piofvlm.tiny.families import GEMMA3_IMAGE_ID, GEMMA3_WINDOW
from test_qwen import make_inputs, model


def _kept_sequence_reference(m, inputs, keep_slot: torch.Tensor, positions: str) -> torch.Tensor:
    """Logits of the unhooked model run on the kept tokens alone (``(1, S')``): embeddings with the image features
    merged, the kept ones gathered, their ``token_type_ids`` (so the image blocks are the kept tokens' runs) and
    their positions (original ones, or ``0..S'-1``)."""
    with torch.no_grad():
        embeds = m.model.get_input_embeddings()(inputs["input_ids"])
        features = m.model.get_image_features(inputs["pixel_values"]).pooler_output.to(embeds.dtype)
        visual = (inputs["input_ids"] == GEMMA3_IMAGE_ID)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(visual, features)
        kept = embeds[:, keep_slot]
        length = kept.shape[1]
        position_ids = torch.arange(keep_slot.shape[0])[keep_slot][None] if positions == "keep" else None
        out = m.model(
            inputs_embeds=kept,
            token_type_ids=inputs["token_type_ids"][:, keep_slot],
            attention_mask=torch.ones(1, length, dtype=torch.long),
            position_ids=position_ids,
        )
        return m.lm_head(out.last_hidden_state)


def every_third_image_token(ids: torch.Tensor, image_id: int) -> tuple[list[int], torch.Tensor]:
    """For one sample's ``ids`` ``(S,)``: every third image token over all images (indices among the image tokens)
    and the ``(S,)`` bool mask of the slots kept with them (all text)."""
    visual = ids == image_id
    chosen = list(range(0, int(visual.sum()), 3))
    visual_index = visual.long().cumsum(0) - 1
    return chosen, ~visual | (visual & torch.isin(visual_index, torch.tensor(chosen)))


@pytest.mark.parametrize("positions", ["keep", pytest.param("renumber", marks=pytest.mark.slow)])
def test_pruned_before_layer_0_equals_the_model_on_the_kept_tokens(positions):
    """Pruned before layer 0, every layer must compute what the stock model computes on the kept tokens alone: local
    windows over the last 16 *kept* slots, the kept tokens of each image attending to each other, local and global
    RoPE at the kept tokens' positions. Every kept position's logits are compared (image tokens included)."""
    m = model("gemma3")
    inputs = make_inputs("gemma3", indices=(2,))  # two images, one sample: no padding
    ids = inputs["input_ids"][0]
    chosen, keep_slot = every_third_image_token(ids, GEMMA3_IMAGE_ID)  # over both images
    # The test can tell the two window rules apart: at the last token, the last 16 kept slots reach further back
    # than the last 16 original positions.
    last = ids.shape[0] - 1
    kept_positions = torch.arange(ids.shape[0])[keep_slot]
    assert int(kept_positions[-GEMMA3_WINDOW]) < last - GEMMA3_WINDOW + 1
    fixed = FixedSelection(layers=[0], keep=len(chosen), budget_scope="sample", chosen=[[chosen]], positions=positions)
    with torch.no_grad(), fixed(m):
        pruned = m(**inputs).logits
    reference = _kept_sequence_reference(m, inputs, keep_slot, positions)
    assert pruned.shape == reference.shape == (1, int(keep_slot.sum()), reference.shape[-1])
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-5)


def test_sliding_layers_cache_the_last_window_of_kept_slots():
    """After pruning at layer 1, every layer from 1 on has seen the kept sequence; a local layer presents its last
    ``window - 1`` slots of it, a global layer all of them; decoding continues on those lengths."""
    m = model("gemma3")
    inputs = make_inputs("gemma3")
    method = piofvlm.get_method("random", layers=[1], keep=0.5)
    with torch.no_grad(), method(m):
        out = m(**inputs, use_cache=True)
    cache = transformers_compat.output_cache(out)
    length = inputs["input_ids"].shape[1]
    kept = [len(k) for k in method.last_selection[0].kept]  # per sample
    text = ((inputs["input_ids"] != GEMMA3_IMAGE_ID) & inputs["attention_mask"].bool()).sum(1)
    kept_length = int((text + torch.tensor(kept)).max())
    types = m.config.text_config.layer_types
    assert [cache.get_seq_length(i) for i in range(len(types))] == [length, *[kept_length] * (len(types) - 1)]
    presented = [transformers_compat.visible_past_keys(cache, i, 1) for i in range(len(types))]
    expected = [
        min(seen, GEMMA3_WINDOW - 1) if kind == "sliding_attention" else seen
        for seen, kind in zip([length, *[kept_length] * (len(types) - 1)], types, strict=True)
    ]
    assert presented == expected
    assert kept_length > GEMMA3_WINDOW  # the window cuts the kept sequence too


def test_static_cache_is_refused_with_a_clear_error():
    m = model("gemma3")
    inputs = make_inputs("gemma3", indices=(0,))
    with torch.no_grad(), piofvlm.get_method("random", layers=[1], keep=0.5)(m):
        with pytest.raises(ValueError, match="(?s)static KV caches of full-attention layers only.*Sliding"):
            m.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_bidirectional_text_config_is_refused():
    m = model("gemma3")
    inputs = make_inputs("gemma3", indices=(0,))
    config = m.config.text_config
    config.use_bidirectional_attention = True
    try:
        with pytest.raises(ValueError, match="use_bidirectional_attention"):
            with torch.no_grad(), piofvlm.get_method("random", layers=[1], keep=0.5)(m):
                m(**inputs)
    finally:
        config.use_bidirectional_attention = False


@pytest.mark.parametrize("positions", ["keep", pytest.param("renumber", marks=pytest.mark.slow)])
def test_second_turn_on_the_returned_cache_equals_no_cache_reference(positions):
    """A 4-token follow-up on the pruned cache (pruned before layer 0 and at layer 2): its queries see, in local
    layers, the window of kept slots behind each of them (multi-token decode masks), as a no-cache forward does."""
    from test_reliability import pruned_conversation, reference_logits

    m = model("gemma3")
    inputs = make_inputs("gemma3", indices=(0, 2))
    layers, keep = [0, 2], [0.6, 0.3]
    method = piofvlm.get_method("random", layers=layers, keep=keep, positions=positions)
    records, ids, logits = pruned_conversation(m, inputs, method)  # layer 0 padded to the unpruned length
    expected = reference_logits(m, inputs, ids, records, layers, keep, positions)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- issue 23: text longer than the window
def _longer_than_the_window(kind: str):
    """The tiny model and one prompt whose text after the image is longer than the 16-slot window."""
    import piofvlm.tiny.families as tf

    if kind == "gemma3":
        processor = tf.build_gemma3_processor()
        text = " ".join(["what is the colour of the circle ?"] * 3)
        image = tf.random_image(1, (32, 32))
        return tf.build_gemma3(), processor(
            images=[[image]], text=[f"USER : <start_of_image> {text} ASSISTANT :"], return_tensors="pt"
        )
    inputs = dict(tf.gemma4_inputs((0,)))
    extra = inputs["input_ids"][:, -8:].repeat(1, 3)  # 24 more text tokens at the end
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    for name in ("attention_mask", "mm_token_type_ids"):
        fill = torch.ones_like(extra) if name == "attention_mask" else torch.zeros_like(extra)
        inputs[name] = torch.cat([inputs[name], fill], 1)
    return tf.build_gemma4(), inputs


@pytest.mark.parametrize("kind", ["gemma3", "gemma4"])
def test_pio_with_a_local_proxy_out_of_reach_of_the_image_is_refused_with_the_reason(kind):
    """Before: a RuntimeError telling the user to load weight-only quantized weights (the all-zero gradient check).
    A global proxy layer on the same prompt runs."""
    from piofvlm.tiny.families import UNAVAILABLE

    if kind in UNAVAILABLE:
        pytest.skip(UNAVAILABLE[kind])
    m, inputs = _longer_than_the_window(kind)
    with pytest.raises(
        ValueError, match=r"proxy layer 2 is a sliding-window layer \(window 16 slots\).*sample\(s\) \[0\]"
    ):
        with torch.no_grad(), piofvlm.get_method("pio", layers=[2], keep=0.5)(m):
            m(**inputs)
    method = piofvlm.get_method("pio", layers=[1], keep=0.5)  # layer 1 is global in both tiny models
    with torch.no_grad(), method(m):
        m(**inputs)
    assert bool(method.last_selection[0].scores[0].any())
