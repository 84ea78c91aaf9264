"""GLM-4.xV videos: their tokens reuse the image id and only ``mm_token_type_ids == 2`` marks them; a video's frames
are split by text (``<|end_of_image|>`` + timestamp + ``<|begin_of_image|>``) and still form one item. The image
invariants run in the parametrized matrices of ``test_qwen.py`` / ``test_methods_matrix.py``; stock GLM-4.xV takes
no image and video in one call, so videos are tested here on video-only batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import piofvlm
from conftest import FixedSelection, assert_decode_equals_uncached
from piofvlm import transformers_compat
from piofvlm.adapters import get_adapter
from piofvlm.tiny.families import GLM_IMAGE_ID, GLM_VIDEOS, glm4v_video_inputs
from test_qwen import GREEDY, SUPPRESS, expected_kept, model

#: Tokens of each video: frames * h * w / 4, from the grids alone.
VIDEO_TOKENS = [t * h * w // 4 for t, h, w in GLM_VIDEOS]


def test_video_tokens_are_one_item_each_and_modality_video():
    m = model("glm4v")
    inputs = glm4v_video_inputs()
    adapter = get_adapter(m)
    video = inputs["mm_token_type_ids"] == 2
    assert torch.equal(adapter.visual_token_mask(inputs["input_ids"]), inputs["input_ids"] == GLM_IMAGE_ID)
    assert torch.equal(adapter.visual_modality(inputs["input_ids"], dict(inputs)), torch.where(video, 1, -1))
    # without mm_token_type_ids the video tokens look like image tokens (what the model itself would take them for)
    assert bool((adapter.visual_modality(inputs["input_ids"]) == 0).any())
    assert adapter.image_token_counts(0, dict(inputs)) == VIDEO_TOKENS
    # frames are separate runs: the first video (2 frames of 6 tokens) is 2 runs but one item
    runs = (video[0] & ~F.pad(video[0], (1, 0))[:-1]).sum()
    assert int(runs) == GLM_VIDEOS[0][0]


@pytest.mark.parametrize("kind", ["glm4v", pytest.param("glm46v", marks=pytest.mark.slow)])
def test_video_keep_all_is_identical_and_counts_per_video(kind):
    m = model(kind)
    inputs = glm4v_video_inputs()
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = m(**inputs).logits
        reference_gen = m.generate(**inputs, **GREEDY)
        with piofvlm.get_method("pio", layers=[0, 2], keep=[1.0, 1.0])(m):
            pruned = m(**inputs).logits
            pruned_gen = m.generate(**inputs, **GREEDY)
        method = piofvlm.get_method("random", layers=[1], keep=0.5)
        with method(m):
            out = m(**inputs, use_cache=True)
    assert torch.equal(pruned[valid], reference[valid])
    assert torch.equal(pruned_gen, reference_gen)
    assert [len(k) for k in method.last_selection[0].kept] == [expected_kept(0.5, n) for n in VIDEO_TOKENS]
    text = inputs["attention_mask"].sum(1) - torch.tensor(VIDEO_TOKENS)
    kept_length = int((text + torch.tensor([expected_kept(0.5, n) for n in VIDEO_TOKENS])).max())
    cache = transformers_compat.output_cache(out)
    assert [cache.get_seq_length(i) for i in range(4)] == [inputs["input_ids"].shape[1], *[kept_length] * 3]


@pytest.mark.parametrize("scope", ["image", "modality", "sample"])
def test_video_budget_scopes(scope):
    """One video per sample: every scope gives it the whole budget; under "modality" it is the video group (1), which
    only ``mm_token_type_ids`` can tell (its tokens carry the image id)."""
    m = model("glm4v")
    inputs = glm4v_video_inputs((0,))
    method = piofvlm.get_method("random", layers=[1], keep=5, budget_scope=scope)
    with torch.no_grad(), method(m):
        m(**inputs)
    assert len(method.last_selection[0].kept[0]) == 5
    group = 1 if scope == "modality" else 0
    with pytest.raises(ValueError, match=rf"more than group {group} of sample 0 has \(12\)"):
        with torch.no_grad(), piofvlm.get_method("random", layers=[1], keep=13, budget_scope=scope)(m):
            m(**inputs)


def test_video_decode_continuity_and_batch_equals_single():
    """Cached greedy decoding of pruned videos equals a no-cache forward of the same kept sequence (rope_deltas of
    the unpruned prompt); each sample of the left-padded batch equals its single run."""
    m = model("glm4v")
    inputs = glm4v_video_inputs()
    layers, keep, new_tokens = [0, 2], [0.6, 0.3], 4
    method = piofvlm.get_method("pio", layers=layers, keep=keep)
    with torch.no_grad(), method(m):
        generated = m.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
        kept = [[k.tolist() for k in record.kept] for record in method.last_selection]
        for i in range(len(GLM_VIDEOS)):
            single = m.generate(**glm4v_video_inputs((i,)), **GREEDY)
            assert [r.kept[0].tolist() for r in method.last_selection] == [k[i] for k in kept]
            assert torch.equal(single[:, -new_tokens:], generated.sequences[i : i + 1, -new_tokens:])
    fixed = FixedSelection(layers=layers, keep=keep, chosen=kept)
    assert_decode_equals_uncached(m, inputs, generated, fixed, new_tokens)
    assert SUPPRESS[0] == GLM_IMAGE_ID  # a generated token is never a placeholder
