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
