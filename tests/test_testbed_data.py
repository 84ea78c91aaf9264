"""Tests of the synthetic testbed data and the shipped testbed checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from piofvlm.testbed import data


def test_same_seed_same_sample() -> None:
    for i in range(10):
        a, b = data.make_sample("train", i), data.make_sample("train", i)
        assert a["question"] == b["question"] and a["answer"] == b["answer"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert a["objects"] == b["objects"]


def test_splits_differ() -> None:
    for i in range(5):
        imgs = [np.asarray(data.make_sample(s, i)["image"]) for s in ("train", "val", "test", "heldout")]
        for j in range(len(imgs)):
            for k in range(j + 1, len(imgs)):
                assert not np.array_equal(imgs[j], imgs[k])


def test_tasks_cycle_and_answers_in_vocab() -> None:
    samples = data.make_split("test", 50)
    assert [s["task"] for s in samples[: len(data.TASKS)]] == list(data.TASKS)
    for s in samples:
        assert s["image"].size == (data.IMAGE_SIZE, data.IMAGE_SIZE) and s["image"].mode == "RGB"
        assert s["answer"] in data.answer_vocab(s["task"])
        assert 0 < data.chance_accuracy(s["task"]) < 1


def _consistent(s: dict) -> bool:
    objs, q, a = s["objects"], s["question"].split(), s["answer"]
    if s["task"] == "exist":
        colour, shape = q[3], q[4]
        return (a == "yes") == any(o["colour"] == colour and o["name"] == shape for o in objs)
    if s["task"] == "colour":
        match = [o for o in objs if o["name"] == q[4]]
        return len(match) == 1 and match[0]["colour"] == a
    if s["task"] == "count":
        return int(a) == sum(o["colour"] == q[2] for o in objs)
    if s["task"] == "position":
        (x,) = [o for o in objs if o["colour"] == q[2]]
        (y,) = [o for o in objs if o["colour"] == q[-3]]
        before = x["cx"] < y["cx"] if "left" in q else x["cy"] < y["cy"]
        return (a == "yes") == before
    if s["task"] == "read":
        match = [o for o in objs if o["kind"] == "letter" and o["colour"] == q[3]]
        return len(match) == 1 and match[0]["name"].lower() == a
    if s["task"] == "exist_colour":
        match = [i for i, o in enumerate(objs) if o["colour"] == q[3]]
        return len(match) <= 1 and (a == "yes") == (len(match) == 1) and s["relevant"] == match
    if s["task"] == "count_colour":
        match = [i for i, o in enumerate(objs) if o["colour"] == q[2]]
        return int(a) == len(match) <= 3 and s["relevant"] == match
    return False


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_answers_consistent_with_objects(split: str) -> None:
    for task in data.ALL_TASKS:
        for s in data.make_split(split, 40, task=task):
            assert s["task"] == task and s["answer"] in data.answer_vocab(task)
            assert _consistent(s), (s["question"], s["answer"], s["objects"])


def test_task_seeds_stable() -> None:
    # The per-sample seed uses the position in ALL_TASKS (append only), not in the default cycle TASKS.
    assert data.ALL_TASKS[:5] == ("exist", "colour", "count", "position", "read")
    assert set(data.TASKS) <= set(data.ALL_TASKS) == set(data.ANSWER_VOCAB)
    a, b = data.make_sample("test", 7, task="count"), data.make_sample("test", 7, task="count")
    assert a["question"] == b["question"] and a["objects"] == b["objects"]
    with pytest.raises(ValueError):
        data.make_sample("test", 0, task="nope")


def test_objects_are_drawn_where_their_boxes_are() -> None:
    s = data.make_sample("val", 3, with_ids=True)
    for i, o in enumerate(s["objects"]):
        x0, y0, x1, y1 = o["box"]
        ys, xs = np.nonzero(s["ids"] == i + 1)
        assert len(xs) > 0
        assert xs.min() >= x0 - 2 and xs.max() <= x1 + 2 and ys.min() >= y0 - 2 and ys.max() <= y1 + 2
    assert data.boxes_to_patches([(0, 0, data.PATCH_SIZE, data.PATCH_SIZE)]) == [0]


def test_balanced_answers() -> None:
    samples = data.make_split("train", 1000)
    for task in data.TASKS:
        answers = [s["answer"] for s in samples if s["task"] == task]
        freq = max(answers.count(a) for a in set(answers)) / len(answers)
        assert freq < 2.0 * data.chance_accuracy(task)


# Measured accuracy of the shipped checkpoint on test[0:48] (0.9375: exist_colour 1.0, count_colour 0.875) minus
# about 5 points; the greedy answers are pinned too, so the test fails if the weights, the processor or the generate
# path change.
CHECKPOINT_MIN_ACCURACY = 0.89
CHECKPOINT_GOLDEN_48 = [
    "no",
    "1",
    "yes",
    "1",
    "no",
    "0",
    "no",
    "1",
    "yes",
    "3",
    "yes",
    "1",
    "no",
    "0",
    "no",
    "1",
    "yes",
    "2",
    "no",
    "3",
    "no",
    "1",
    "no",
    "3",
    "no",
    "1",
    "yes",
    "3",
    "yes",
    "1",
    "yes",
    "2",
    "yes",
    "0",
    "no",
    "3",
    "no",
    "2",
    "yes",
    "2",
    "yes",
    "3",
    "no",
    "1",
    "no",
    "2",
    "yes",
    "1",
]


def test_shipped_checkpoint_answers() -> None:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from piofvlm.testbed import CHECKPOINT_DIR, IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS, generate_answers, load_testbed
    from piofvlm.testbed.model import score

    if not (CHECKPOINT_DIR / "model.safetensors").exists():
        pytest.skip("testbed checkpoint not shipped")
    torch.manual_seed(0)
    model, processor = load_testbed()
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.config.image_token_id == IMAGE_TOKEN_ID and model.config.image_seq_length == NUM_IMAGE_TOKENS
    assert AutoProcessor.from_pretrained(CHECKPOINT_DIR).tokenizer.padding_side == "left"
    samples = data.make_split("test", 48)
    answers = generate_answers(model, processor, samples, batch_size=16)
    res = score(samples, answers)
    assert res["all"] >= CHECKPOINT_MIN_ACCURACY, res
    agree = sum(a == b for a, b in zip(answers, CHECKPOINT_GOLDEN_48, strict=True)) / len(answers)
    assert agree >= 0.9, (agree, answers)
