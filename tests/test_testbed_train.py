"""The testbed training script: anchor targets, supervised-attention losses vs eager attention, a short run."""

from __future__ import annotations

import math

import pytest
import torch

from piofvlm.testbed import data
from piofvlm.testbed.model import BOS_ID, IMAGE_TOKEN_ID, build_model, build_tokenizer
from piofvlm.testbed.train import anchor_patches, attention_supervision_loss, make_batch, train

TINY = {
    "vision_hidden": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "vision_mlp": 64,
    "text_hidden": 32,
    "text_layers": 4,
    "text_heads": 2,
    "text_kv_heads": 2,
    "text_mlp": 64,
}
TASKS = ("exist_colour", "count_colour")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_one_anchor_per_object_inside_its_box(split: str) -> None:
    for i in range(20):
        s = data.make_sample(split, i, TASKS[i % 2])
        anchors = anchor_patches(s, only_relevant=False)
        assert anchors.sum() == len(s["objects"])
        for o in s["objects"]:
            x0, y0, x1, y1 = o["box"]
            centre = (int((y0 + y1) / 2) // data.PATCH_SIZE) * data.GRID + int((x0 + x1) / 2) // data.PATCH_SIZE
            assert centre in data.boxes_to_patches([o["box"]])
            # The box is rounded to pixels: its centre patch is the anchor or a direct neighbour of it.
            near = [centre + dr * data.GRID + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
            assert any(anchors[p] for p in near if 0 <= p < data.GRID * data.GRID)
        relevant = anchor_patches(s, only_relevant=True)
        assert relevant.sum() == len(s["relevant"])
        assert not (relevant & ~anchors).any()
        if s["task"] == "count_colour":
            assert relevant.sum() == int(s["answer"])


def _layer_inputs_and_eager_attention(layer: int) -> tuple[dict, tuple, torch.Tensor, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(TINY, seed=3)
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    vocab = build_tokenizer().get_vocab()
    batch = make_batch("train", 5, 4, vocab, TASKS)
    # Left padding: the four samples have different question lengths (exist_colour vs count_colour).
    assert (batch["attention_mask"] == 0).any()
    captured = {}
    attn = model.model.language_model.layers[layer].self_attn

    def grab(_mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured["in"] = (kwargs["hidden_states"], *kwargs["position_embeddings"])

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                pixel_values=batch["pixel_values"],
                output_attentions=True,
            )
    finally:
        handle.remove()
    probs = out.attentions[layer][:, 0, -3].double()  # head 0, answer-predicting position: (B, S)
    return batch, captured["in"], probs, attn


@pytest.mark.parametrize("target", ["anchors", "colour_words", "relevant"])
def test_attention_supervision_matches_eager_attention(target: str) -> None:
    layer = 2
    batch, (hidden, cos, sin), probs, attn = _layer_inputs_and_eager_attention(layer)
    with torch.no_grad():
        loss = attention_supervision_loss(attn, hidden, cos, sin, batch, target=target)
    ids = batch["input_ids"]
    expected = []
    for b in range(ids.shape[0]):
        img_pos = (ids[b] == IMAGE_TOKEN_ID).nonzero().flatten()
        if target == "colour_words":
            colour_ids = {build_tokenizer().get_vocab()[c] for c in data.COLOURS}
            wanted = [p for p in range(ids.shape[1] - 2) if int(ids[b, p]) in colour_ids]
        elif target == "anchors":
            wanted = [int(img_pos[p]) for p in batch["relevant_anchors"][b].nonzero().flatten()]
            wanted += [int((ids[b] == BOS_ID).nonzero()[0])]
        else:
            wanted = [int(img_pos[p]) for p in batch["relevant_patches"][b].nonzero().flatten()]
        if not wanted:
            continue
        if target == "relevant":
            expected.append(-math.log(float(probs[b, wanted].sum())))
        else:
            expected.append(-sum(math.log(float(probs[b, p])) for p in wanted) / len(wanted))
    assert loss is not None
    assert float(loss) == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_short_training_run_saves_a_plain_llava(tmp_path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "tb"
    summary = train(
        out,
        steps=3,
        batch_size=4,
        shapes=TINY,
        eval_every=100,
        n_val=4,
        tasks=TASKS,
        attn_weight=1.0,
        attn_layer=2,
        attn_target="anchors",
        centre_weight=1.0,
        route_weight=1.0,
        route_layer=1,
    )
    assert summary["steps"] == 3 and len(summary["history"]) == 1
    assert summary["attn_target"] == "anchors" and summary["route_layer"] == 1
    fresh = build_model(TINY, seed=0)
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    # Only the LLaVA weights are saved (the auxiliary probes are dropped), all of them, and training changed them.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    trained = model.state_dict()
    assert set(trained) == set(fresh.state_dict())
    assert any(not torch.equal(trained[k], v) for k, v in fresh.state_dict().items())
    assert AutoProcessor.from_pretrained(out).tokenizer.padding_side == "left"
    assert model.config.text_config.num_hidden_layers == TINY["text_layers"]


@pytest.mark.parametrize("layer", [0, 2])
def test_training_pruner_keeps_every_relevant_patch(layer: int) -> None:
    from piofvlm.testbed.train import KeepRelevantPruner

    model = build_model(TINY, seed=1)
    batch = make_batch("train", 11, 4, build_tokenizer().get_vocab(), TASKS)
    must = batch["relevant_patches"] | batch["relevant_anchors"]
    priority = 10.0 * must.double() + torch.rand(must.shape, dtype=torch.float64)
    pruner = KeepRelevantPruner(layers=[layer], keep=40, priority=priority)
    with torch.no_grad(), pruner(model):
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values")})
    kept = pruner.last_selection[0].kept
    for b in range(4):
        wanted = must[b].nonzero().flatten()
        assert len(kept[b]) == 40 and torch.isin(wanted, kept[b]).all()
    assert not model._forward_hooks and all(not m._forward_pre_hooks for m in model.modules())


def test_pruned_training_steps_run(tmp_path) -> None:
    summary = train(tmp_path / "tb", steps=2, batch_size=4, shapes=TINY, eval_every=100, n_val=4, tasks=TASKS,
                    attn_layer=2, prune_prob=1.0, prune_layers=(0, 2))  # fmt: skip
    assert summary["prune_prob"] == 1.0 and summary["prune_layers"] == [0, 2]
