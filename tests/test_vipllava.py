"""ViP-LLaVA: what differs from LLaVA-1.5 (the shared matrices run the rest through ``tiny.families``): its image
features concatenate several vision layers, so the encoder-side methods that read one layer's attention refuse a list
and run with a single ``vision_feature_layers``."""

from __future__ import annotations

import pytest
import torch

import piofvlm
from piofvlm.adapters import get_adapter
from piofvlm.tiny.families import build_vipllava, vipllava_inputs


def test_several_feature_layers_refuse_encoder_side_methods():
    m = build_vipllava(num_layers=2)
    with pytest.raises(ValueError, match=r"vision_feature_layers=\[-2, -1\] concatenates several vision layers"):
        with torch.no_grad(), piofvlm.get_method("visionzip", keep=0.3)(m):
            m(**vipllava_inputs((0,)))


@pytest.mark.parametrize("layer", [-1, 1])
def test_one_feature_layer_runs_visionzip_at_that_block(layer):
    """With ``vision_feature_layers`` an int, the adapter names the block whose output it is (the tower has two) and
    VisionZip keeps its exact count per image (49 tokens each, [CLS] dropped)."""
    m = build_vipllava(num_layers=2, feature_layers=layer)
    assert get_adapter(m).vision_feature_layer_index == layer % 3 - 1
    assert get_adapter(m).vision_has_cls
    inputs = vipllava_inputs((0, 1))
    method = piofvlm.get_method("visionzip", keep=10)
    with torch.no_grad(), method(m):
        out = m(**inputs)
    assert torch.isfinite(out.logits).all()
    assert [len(kept) for kept in method.last_selection[-1].kept] == [10, 20]


def test_embeddings_as_feature_layer_are_refused():
    m = build_vipllava(num_layers=2, feature_layers=0)
    with pytest.raises(ValueError, match=r"vision_feature_layers=0 selects the embeddings"):
        get_adapter(m).vision_feature_layer_index  # noqa: B018
