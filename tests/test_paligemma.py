"""PaliGemma / PaliGemma 2: a bidirectional prefix (images + prompt), Gemma 2's sliding layers and softcapping. The
standard invariants run on the tiny PaliGemma 2 in the parametrized matrices of ``test_qwen.py`` /
``test_methods_matrix.py``; here, what is particular to the family.

The decision tested: **after pruning the prefix stays bidirectional among the kept prefix tokens**, i.e. a pruned
prefill computes what the unhooked model computes on the kept sequence with the kept tokens' ``token_type_ids``;
generated tokens are the causal suffix, and a sliding layer's window (over the suffix) counts kept slots.
"""

from __future__ import annotations

import functools

import pytest
import torch

import piofvlm
from conftest import FixedSelection
from piofvlm.adapters import get_adapter
from piofvlm.methods.pio import proxy_loss
from piofvlm.tiny.families import PALIGEMMA_IMAGE_ID, PALIGEMMA_TOKENS, PALIGEMMA_WINDOW, build_paligemma
from piofvlm.tiny.families import paligemma_inputs as make_inputs
from test_pio import capture_context
from test_qwen import expected_kept

#: The text models: PaliGemma 2's Gemma 2 (eager, softcapping 50 / 30, sliding layers), PaliGemma's Gemma (sdpa).
TEXT_MODELS = ("gemma2", "gemma")


@functools.cache
def model(text_model: str = "gemma2", dtype: torch.dtype = torch.float32):
    return build_paligemma(text_model=text_model, dtype=dtype)


def _softcapped(m, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(m.config.text_config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _kept_sequence_reference(m, inputs, keep_slot, positions: str, generated=None, token_type_ids=True):
    """Logits of the unhooked model run on the kept tokens alone (one unpadded sample): the embeddings with the image
    features merged, the kept ones gathered, their ``token_type_ids`` (the kept prefix) and positions (original,
    1-indexed, or ``1..S'``); ``generated`` tokens appended as the model's ``generate()`` marks them (suffix: 1)."""
    with torch.no_grad():
        embeds = m.model.get_input_embeddings()(inputs["input_ids"])
        features = m.model.get_image_features(inputs["pixel_values"]).pooler_output.to(embeds.dtype)
        visual = (inputs["input_ids"] == PALIGEMMA_IMAGE_ID)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(visual, features)[:, keep_slot]
        types = inputs["token_type_ids"][:, keep_slot]
        positions_kept = torch.arange(1, keep_slot.shape[0] + 1)[keep_slot][None]
        if generated is not None:
            embeds = torch.cat([embeds, m.model.get_input_embeddings()(generated)], 1)
            types = torch.cat([types, torch.ones_like(generated)], 1)
            after = keep_slot.shape[0] + torch.arange(1, generated.shape[1] + 1)[None]
            positions_kept = torch.cat([positions_kept, after], 1)
        out = m.model(
            inputs_embeds=embeds,
            token_type_ids=types if token_type_ids else torch.ones_like(types),  # all suffix: causal
            attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long),
            position_ids=positions_kept if positions == "keep" else None,  # None: the model's 1..S'
        )
        return _softcapped(m, m.lm_head(out.last_hidden_state))


def _every_third_image_token(ids: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    visual = ids == PALIGEMMA_IMAGE_ID
    chosen = list(range(0, int(visual.sum()), 3))
    visual_index = visual.long().cumsum(0) - 1
    return chosen, ~visual | (visual & torch.isin(visual_index, torch.tensor(chosen)))


@pytest.mark.parametrize("text_model", TEXT_MODELS)
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_pruned_prefix_equals_the_model_on_the_kept_sequence(text_model, positions):
    """Pruned before layer 0, every layer computes what the stock model computes on the kept tokens alone with their
    token_type_ids: the kept prefix attends to itself both ways (text before an image sees it), Gemma 2's sliding
    layers do not cut the prefix (the prompt is longer than the 16-slot window). Every kept position is compared;
    the same kept sequence without the prefix block (causal) differs, so the comparison tells the rules apart."""
    m = model(text_model)
    inputs = make_inputs(indices=(2,))  # text, an image, text, an image, text: one sample, no padding
    ids = inputs["input_ids"][0]
    chosen, keep_slot = _every_third_image_token(ids)
    assert int(keep_slot.sum()) > PALIGEMMA_WINDOW
    fixed = FixedSelection(layers=[0], keep=len(chosen), budget_scope="sample", chosen=[[chosen]], positions=positions)
    with torch.no_grad(), fixed(m):
        pruned = m(**inputs).logits
    reference = _kept_sequence_reference(m, inputs, keep_slot, positions)
    assert pruned.shape == reference.shape == (1, int(keep_slot.sum()), reference.shape[-1])
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-5)
    causal = _kept_sequence_reference(m, inputs, keep_slot, positions, token_type_ids=False)  # no prefix block
    assert (causal[0, :-1] - reference[0, :-1]).abs().max() > 1e-2  # earlier tokens saw later ones


@pytest.mark.parametrize("text_model", TEXT_MODELS)
def test_generated_suffix_is_causal_and_its_window_counts_kept_slots(text_model):
    """Greedy decoding on the pruned cache (pruned at layers 0 and 2) equals the stock model on the kept sequence plus
    the generated tokens marked as suffix (token_type_ids 1, as generate() marks them): causal after the prefix, and
    in Gemma 2's sliding layers a window over the last 16 kept slots."""
    m = model(text_model)
    inputs = make_inputs(indices=(1,))
    ids = inputs["input_ids"][0]
    chosen, keep_slot = _every_third_image_token(ids)
    method = FixedSelection(layers=[0], keep=len(chosen), budget_scope="sample", chosen=[[chosen]])
    new_tokens = 6
    with torch.no_grad(), method(m):
        generated = m.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            suppress_tokens=[PALIGEMMA_IMAGE_ID],
        )
    suffix = generated.sequences[:, ids.shape[0] :]
    reference = _kept_sequence_reference(m, inputs, keep_slot, "keep", generated=suffix[:, :-1])
    for step in range(new_tokens):
        torch.testing.assert_close(generated.logits[step], reference[:, -new_tokens + step], rtol=1e-4, atol=1e-4)
    assert int(keep_slot.sum()) + new_tokens > PALIGEMMA_WINDOW  # the window matters for the last tokens


def test_images_first_layout_counts_each_image():
    """The checkpoints' own layout (every image before the prompt, the processor's prompt without placeholders): two
    images are one run of placeholders, split per image (EqualTokensPerImage); keep-all is bit-identical."""
    m = model()
    inputs = make_inputs(indices=(1, 2), images_first=True)
    ids = inputs["input_ids"]
    for row, valid in zip(ids, inputs["attention_mask"].bool(), strict=True):
        visual = (row[valid] == PALIGEMMA_IMAGE_ID).nonzero()[:, 0]
        assert visual.tolist() == list(range(2 * PALIGEMMA_TOKENS))  # the images come first, one run
    method = piofvlm.get_method("random", layers=[1], keep=0.5, budget_scope="image")
    for call in ("forward", "generate"):  # generate() passes pre-encoded features instead of pixel_values
        with torch.no_grad(), method(m):
            if call == "forward":
                m(**inputs)
            else:
                m.generate(**inputs, max_new_tokens=2, do_sample=False)
        for kept in method.last_selection[0].kept:
            per_image = [int(((kept >= lo) & (kept < lo + PALIGEMMA_TOKENS)).sum()) for lo in (0, PALIGEMMA_TOKENS)]
            assert per_image == [expected_kept(0.5, PALIGEMMA_TOKENS)] * 2, call
    with torch.no_grad():
        reference = m(**inputs).logits
        with piofvlm.get_method("pio", layers=[0, 2], keep=[1.0, 1.0])(m):
            pruned = m(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert torch.equal(pruned[valid], reference[valid])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_proxy_equals_reference_on_paligemma_1(dtype):
    """PaliGemma (Gemma text, no softcapping): the fast proxy with the prefix block as its allowed keys (the loss
    rows see the keys after them) equals the layer's own forward."""
    m = model("gemma", dtype)
    inputs = make_inputs()
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    ctx = capture_context(m, inputs, layer=2)
    assert ctx.adapter.rotary_fn() is not None
    fast = proxy_loss.proxy_gradient(ctx, 2, fast=True)
    reference = proxy_loss.proxy_gradient(ctx, 2, fast=False)
    valid = ctx.valid
    scale = reference[valid].abs().max()
    assert ((fast - reference)[valid].abs().max() / scale).item() < (1e-10 if dtype == torch.float64 else 1e-5)


def test_paligemma_1_keep_all_and_fastv_run():
    """PaliGemma (Gemma text, sdpa): keep-all bit-identical, and the attention-reading methods run (no softcap)."""
    m = model("gemma")
    inputs = make_inputs()
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = m(**inputs).logits
        with piofvlm.get_method("pio", layers=[0, 2], keep=[1.0, 1.0])(m):
            pruned = m(**inputs).logits
        method = piofvlm.get_method("fastv", layers=[2], keep=0.25)
        with method(m):
            m(**inputs)
    assert torch.equal(pruned[valid], reference[valid])
    assert [len(k) for k in method.last_selection[0].kept] == [4, 8, 8]


def test_softcapping_paths():
    """PaliGemma 2 (attention softcap 50): PIO's proxy is the layer's own forward and its head the softcapped LM head;
    methods recomputing attention are refused naming the softcap."""
    m = model()
    adapter = get_adapter(m)
    assert adapter.rotary_fn() is None
    hidden = torch.randn(1, 3, m.config.text_config.hidden_size)
    torch.testing.assert_close(adapter.lm_head(hidden), _softcapped(m, m.lm_head(hidden)))
    assert adapter.lm_head(hidden * 100).abs().max() <= 30.0
    inputs = make_inputs(indices=(0,))
    for name in ("fastv", "dart"):  # dart reads a layer's keys: the capability is refused as a whole
        with pytest.raises(ValueError, match=f"(?s){name}.*attn_logit_softcapping=50"):
            with torch.no_grad(), piofvlm.get_method(name, layers=[2], keep=0.25)(m):
                m(**inputs)


@pytest.mark.parametrize("text_model", TEXT_MODELS)
def test_static_cache_is_refused_with_a_clear_error(text_model):
    """A static cache is refused at the multimodal call (PaliGemma 2's static cache fails in transformers 5.24 itself,
    unhooked too); the model is left clean and still prunes with the dynamic cache."""
    m = model(text_model)
    inputs = make_inputs(indices=(0,))
    method = piofvlm.get_method("random", layers=[1], keep=0.5)
    with torch.no_grad(), method(m):
        with pytest.raises(ValueError, match="static KV cache for paligemma models"):
            m.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
        m.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert [len(k) for k in method.last_selection[0].kept] == [expected_kept(0.5, PALIGEMMA_TOKENS)]
