"""Llama 4: chunked (RoPE) and global (NoPE) layers, MoE feed-forwards, tiled images, complex rotary tables. The
standard invariants run in the parametrized matrices of ``test_qwen.py`` / ``test_methods_matrix.py`` (on transformers
>= 5.25: 5.24's Llama 4 forward fails by itself); here, what is particular to the family.

The tiny model has chunks of 48 slots, shorter than the prompts with two images. The decision tested: **chunks count
kept slots** (a pruned layer's chunks are cut by kept index from the first real slot, as the stock model run on the
kept sequence cuts them and as its sliding chunk cache serves them while decoding).
"""

from __future__ import annotations

import functools

import pytest
import torch

import piofvlm
from conftest import FixedSelection
from piofvlm import transformers_compat
from piofvlm.tiny.families import LLAMA4_CHUNK, LLAMA4_IMAGE_ID, build_llama4, llama4_inputs

UNSUPPORTED = transformers_compat.llama4_unsupported_reason()
needs_llama4 = pytest.mark.skipif(UNSUPPORTED is not None, reason=str(UNSUPPORTED))


@functools.cache
def model():
    return build_llama4()


def _kept_embeddings(m, inputs, keep_slot: torch.Tensor) -> torch.Tensor:
    """The prompt's embeddings with the projected image features merged, at the kept slots (one unpadded sample)."""
    with torch.no_grad():
        embeds = m.get_input_embeddings()(inputs["input_ids"])
        features = m.get_image_features(pixel_values=inputs["pixel_values"]).last_hidden_state
        features = m.multi_modal_projector(features.reshape(-1, features.shape[-1])).to(embeds.dtype)
        visual = (inputs["input_ids"] == LLAMA4_IMAGE_ID)[..., None].expand_as(embeds)
        return embeds.masked_scatter(visual, features)[:, keep_slot]


def _language_model_logits(m, embeds, position_ids=None, attention_mask=None) -> torch.Tensor:
    """The stock language model (decoder + LM head) on ``embeds`` with no cache."""
    with torch.no_grad():
        mask = torch.ones(1, embeds.shape[1], dtype=torch.long) if attention_mask is None else attention_mask
        out = m.language_model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask, use_cache=False)
        return out.logits


def _keep(ids: torch.Tensor, count: int) -> tuple[list[int], torch.Tensor]:
    """``count`` image tokens spread over all images (indices among the image tokens) and the kept-slot mask."""
    visual = ids == LLAMA4_IMAGE_ID
    total = int(visual.sum())
    chosen = torch.linspace(0, total - 1, count).round().long().unique().tolist()
    assert len(chosen) == count
    visual_index = visual.long().cumsum(0) - 1
    return chosen, ~visual | (visual & torch.isin(visual_index, torch.tensor(chosen)))


@needs_llama4
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_pruned_chunks_count_kept_slots(positions):
    """Pruned before layer 0, every layer computes what the stock model computes on the kept tokens alone: chunked
    layers cut chunks of 48 *kept* slots, RoPE at the kept tokens' positions (original or renumbered), NoPE layers
    causal. The other rule (chunks of original positions, as a prepared mask) gives other logits, so the comparison
    tells the rules apart."""
    m = model()
    inputs = llama4_inputs(indices=(2,))  # two images (a tiled one), one sample: no padding
    ids = inputs["input_ids"][0]
    chosen, keep_slot = _keep(ids, 40)
    kept_length = int(keep_slot.sum())
    original = torch.arange(ids.shape[0])[keep_slot]
    assert kept_length > LLAMA4_CHUNK and not torch.equal(original // LLAMA4_CHUNK, torch.arange(kept_length) // 48)
    fixed = FixedSelection(layers=[0], keep=len(chosen), budget_scope="sample", chosen=[[chosen]], positions=positions)
    with torch.no_grad(), fixed(m):
        pruned = m(**inputs).logits
    embeds = _kept_embeddings(m, inputs, keep_slot)
    position_ids = original[None] if positions == "keep" else None
    reference = _language_model_logits(m, embeds, position_ids)
    assert pruned.shape == reference.shape == (1, kept_length, reference.shape[-1])
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-5)
    # the other rule: chunks of original positions (a prepared mask per layer type)
    query, key = original[:, None], original[None, :]
    by_position = ((key <= query) & (key // LLAMA4_CHUNK == query // LLAMA4_CHUNK))[None, None]
    causal = torch.ones(kept_length, kept_length, dtype=torch.bool).tril()[None, None]
    other = _language_model_logits(
        m, embeds, position_ids, {"chunked_attention": by_position, "full_attention": causal}
    )
    assert (other - reference).abs().max() > 1e-3


@needs_llama4
def test_decoding_across_a_chunk_boundary_equals_the_model_on_the_kept_sequence():
    """The kept prompt ends 3 slots before a chunk boundary: the generated tokens cross it. Cached greedy decoding
    (pruned before layer 0, the chunk cache holding the last 47 kept slots) equals the stock language model run
    without a cache on the kept sequence plus the generated tokens."""
    m = model()
    inputs = llama4_inputs(indices=(2,))
    ids = inputs["input_ids"][0]
    text = int((ids != LLAMA4_IMAGE_ID).sum())
    count = LLAMA4_CHUNK - 3 - text  # kept length 45 = one chunk less 3
    chosen, keep_slot = _keep(ids, count)
    new_tokens = 6
    fixed = FixedSelection(layers=[0], keep=count, budget_scope="sample", chosen=[[chosen]])
    with torch.no_grad(), fixed(m):
        generated = m.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            suppress_tokens=list(range(4, 10)),
        )
    suffix = generated.sequences[:, ids.shape[0] : -1]
    embeds = torch.cat([_kept_embeddings(m, inputs, keep_slot), m.get_input_embeddings()(suffix)], 1)
    original = torch.arange(ids.shape[0])[keep_slot]
    positions = torch.cat([original, ids.shape[0] + torch.arange(new_tokens - 1)])[None]
    reference = _language_model_logits(m, embeds, positions)
    assert int(keep_slot.sum()) == LLAMA4_CHUNK - 3
    for step in range(new_tokens):
        torch.testing.assert_close(generated.logits[step], reference[:, -new_tokens + step], rtol=1e-4, atol=1e-4)


@needs_llama4
def test_images_are_the_spans_between_image_start_and_end():
    """A tiled image (two tiles and the global view, separators between them) is one item: per-image budgets keep
    exactly their share of each image, including its separated tiles."""
    m = model()
    inputs = llama4_inputs(indices=(1,))
    method = piofvlm.get_method("random", layers=[1], keep=0.25, budget_scope="image")
    with torch.no_grad(), method(m):
        m(**inputs)
    kept = method.last_selection[0].kept[0]
    assert [int((kept < 48).sum()), int((kept >= 48).sum())] == [12, 4]


@needs_llama4
def test_static_cache_is_refused_with_a_clear_error():
    m = model()
    inputs = llama4_inputs(indices=(0,))
    with torch.no_grad(), piofvlm.get_method("random", layers=[1], keep=0.5)(m):
        with pytest.raises(ValueError, match="static KV caches of full-attention layers only"):
            m.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_transformers_5_24_is_refused_with_the_reason():
    """5.24.0's Llama4ForConditionalGeneration.forward raises by itself: refused naming the release to install."""
    reason = transformers_compat.llama4_unsupported_reason("5.24.0")
    assert reason is not None and "5.25.0" in reason and "image_outputs" in reason
    assert transformers_compat.llama4_unsupported_reason("5.25.0") is None
    if UNSUPPORTED is not None:  # the installed release: a method on a Llama 4 refuses at the call, model left clean
        m = model()
        inputs = llama4_inputs(indices=(0,))
        with pytest.raises(ValueError, match="llama4 models on transformers >= 5.25.0"):
            with torch.no_grad(), piofvlm.get_method("random", layers=[1], keep=0.5)(m):
                m(**inputs)
