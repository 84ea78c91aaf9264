"""The common-layout families of issue 24 (``tiny/common_families.py``): what differs from the families the shared
matrices already cover (those run these families too, through ``tiny.families.FAMILIES``)."""

from __future__ import annotations

import pytest
import torch

import piofvlm
from piofvlm.adapters import get_adapter
from piofvlm.adapters.facts import FactsAdapter
from piofvlm.tiny import common_families as common
from piofvlm.tiny.families import FAMILIES, SAMPLES
from piofvlm.tiny.llava import random_image


# ------------------------------------------------------------------------------------------------------ GOT-OCR 2.0
@pytest.mark.skipif("got_ocr2" not in FAMILIES, reason="no GOT-OCR 2.0 here")
def test_got_ocr2_runs_are_images_of_the_processors_tiles():
    """Each image is one run of 16 tokens per tile (its tiles, then a thumbnail when there are several): the tile
    counts the image processor gives each picture, independently of the prompt; ``pool`` pools each tile's grid."""
    model = common.build_got_ocr2(num_layers=2)
    adapter = get_adapter(model)
    assert isinstance(adapter, FactsAdapter) and adapter.model_types == ("got_ocr2", "pp_chart2table")
    inputs = common.got_ocr2_inputs((1, 2))
    pictures = [random_image(10 * i + j, size) for i in (1, 2) for j, size in enumerate(SAMPLES[i][1])]
    pictures.insert(1, random_image(19, (32, 32)))  # sample 1's video slot holds a second image
    tiles = common.build_got_ocr2_processor().image_processor(
        pictures, crop_to_patches=True, max_patches=4, return_tensors="pt"
    )["num_patches"]
    sources = adapter.visual_token_sources(dict(inputs))
    assert [int(source["grid"].max()) + 1 for source in sources] == tiles.tolist()
    assert torch.equal(torch.cat([s["crop"] for s in sources]).unique(), torch.arange(len(inputs["pixel_values"])))
    method = piofvlm.get_method("pool", keep=2, budget_scope="image")
    with torch.no_grad(), method(model):
        model(**inputs)
    kept = method.last_selection[0].kept
    flat = torch.cat([torch.stack([s["grid"], s["row"], s["col"]], 1) for s in sources])
    per_sample = [sum(len(s["grid"]) for s in sources[:2]), sum(len(s["grid"]) for s in sources[2:])]
    for b, first in enumerate((0, per_sample[0])):
        places = flat[first + kept[b]]
        # 2 tokens an image, shared over its tiles by size: a 3-tile image keeps 1 token on each of 2 tiles (each a
        # cell's centre), a 1-tile image 2 on its single tile
        assert len(kept[b]) == 4
        assert len(set(places[:2, 0].tolist())) == 2 and len(set(places[2:, 0].tolist())) == 1


# ----------------------------------------------------------------------------------------------------- ShieldGemma 2
@pytest.mark.skipif("shieldgemma2" not in FAMILIES, reason="no ShieldGemma 2 here")
def test_shieldgemma2_classifier_prunes_through_its_inner_model():
    """``ShieldGemma2ForImageClassification`` (yes / no logits of the last position) is refused with an error naming
    ``.model``; a method applied to ``.model`` prunes the classifier's calls: keep-all bit-identical yes / no
    logits, and a pruned call the same as the inner model's last-position logits under the same method."""
    from transformers import ShieldGemma2ForImageClassification

    inner = common.build_shieldgemma2(num_layers=2)
    torch.manual_seed(0)
    classifier = ShieldGemma2ForImageClassification(inner.config).eval()
    classifier.model.load_state_dict(inner.state_dict())
    classifier.yes_token_index, classifier.no_token_index = 10, 11
    inputs = FAMILIES["shieldgemma2"].inputs((0, 1))
    with pytest.raises(
        ValueError, match=r"ShieldGemma2ForImageClassification wraps .*apply the method to classifier\.model"
    ):
        piofvlm.get_method("pio", layers=[1], keep=0.5)(classifier).__enter__()
    with torch.no_grad():
        reference = classifier(**inputs).logits
        with piofvlm.get_method("pio", layers=[0, 1], keep=[1.0, 1.0])(classifier.model):
            assert torch.equal(classifier(**inputs).logits, reference)
        method = piofvlm.get_method("random", layers=[1], keep=0.25, seed=3)
        with method(classifier.model):
            pruned = classifier(**inputs).logits
            kept = [k.tolist() for k in method.last_selection[0].kept]
            direct = inner.__class__.forward(classifier.model, **inputs).logits[:, -1, [10, 11]]
    assert [len(k) for k in kept] == [4, 8]  # a quarter of 16 tokens per image
    assert [k.tolist() for k in method.last_selection[0].kept] == kept
    torch.testing.assert_close(pruned, direct, rtol=0, atol=0)
    assert not torch.equal(pruned, reference)


# ------------------------------------------------------------------------------------------------------- DeepSeek-VL
@pytest.mark.skipif("deepseek_vl" not in FAMILIES, reason="no DeepSeek-VL here")
def test_deepseek_vl_boxes_leave_the_square_padding_unplaced():
    """The processor pads a 64 x 32 picture to a square (centred): of its 4 x 4 token grid the first and last rows
    cover padding only (no place), the middle rows cover the picture in halves; a square picture fills the grid.
    Without the pictures' sizes the boxes are refused (the padding depends on them)."""
    model = common.build_deepseek_vl(num_layers=2)
    inputs = dict(common.deepseek_vl_inputs((1,)))  # a 64 x 32 image, then a 32 x 32 one
    adapter = get_adapter(model)
    wide, square = adapter.token_boxes(inputs, source_sizes=[(64, 32), (32, 32)])
    assert wide.view.tolist() == [-1] * 4 + [0] * 8 + [-1] * 4
    assert sorted(set(wide.boxes[4:12, [1, 3]].flatten().tolist())) == [0.0, 0.5, 1.0]
    assert torch.equal(wide.boxes[4:8, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))
    assert bool((square.view == 0).all()) and square.boxes[-1].tolist() == [0.75, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError, match="padded to a square .*source_sizes"):
        adapter.token_boxes(inputs)


# ------------------------------------------------------------------------------------------------------------- Janus
@pytest.mark.skipif("janus" not in FAMILIES, reason="no Janus here")
def test_janus_keeps_the_image_delimiters_as_text():
    """``<begin_of_image>`` / ``<end_of_image>`` around each image are text: never counted nor dropped. Pruned to 4
    tokens an image, the pruned prefill equals the unpruned model run on the prompt without the dropped tokens."""
    model = common.build_janus(num_layers=2)
    inputs = dict(common.janus_inputs((1,)))
    ids = inputs["input_ids"][0]
    adapter = get_adapter(model)
    delimiters = (ids == 5) | (ids == 6)
    assert int(delimiters.sum()) == 4 and not bool(adapter.visual_token_mask(ids[None])[0][delimiters].any())
    method = piofvlm.get_method("random", layers=[0], keep=4, seed=1)
    with torch.no_grad(), method(model):
        pruned = model(**inputs).logits[0, -1]
    kept = method.last_selection[0].kept[0]
    visual = adapter.visual_token_mask(ids[None])[0].nonzero()[:, 0]
    dropped = visual[~torch.isin(torch.arange(len(visual)), kept)]
    keep_slots = ~torch.isin(torch.arange(len(ids)), dropped)
    assert len(kept) == 8 and bool(keep_slots[delimiters].all())
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids[None]).clone()
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output.reshape(-1, embeds.shape[-1])
        embeds[0, visual] = features
        positions = keep_slots.nonzero()[:, 0][None]
        out = model.model.language_model(inputs_embeds=embeds[:, keep_slots], position_ids=positions)
        reference = model.lm_head(out.last_hidden_state)[0, -1]
    torch.testing.assert_close(pruned, reference, rtol=1e-5, atol=1e-5)
