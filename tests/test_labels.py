"""``model(**inputs, labels=...)`` under a method: the causal-LM loss over the kept sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import piofvlm
import test_qwen
from conftest import make_inputs, model

IMAGE_ID = 4


def labels_for(inputs, image_id: int = IMAGE_ID) -> torch.Tensor:
    """The prompt as labels, -100 at padding, at visual tokens (the usual fine-tuning labels) and at each sample's
    first token (the unpruned model would predict it from a padding slot; the method's loss never does)."""
    labels = inputs["input_ids"].clone()
    mask = inputs["attention_mask"]
    first = mask.argmax(1)
    labels[(mask == 0) | (labels == image_id)] = -100
    labels[torch.arange(len(labels)), first] = -100
    return labels


def family(kind: str):
    if kind == "llava":
        return model("llava"), make_inputs("llava"), IMAGE_ID
    m = test_qwen.model(kind)
    return m, test_qwen.make_inputs(kind), m.config.image_token_id


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_keep_all_loss_equals_the_unhooked_loss(kind):
    m, inputs, image_id = family(kind)
    labels = labels_for(inputs, image_id)
    if kind != "llava":  # Qwen's video tokens are visual too
        labels[inputs["input_ids"] == m.config.video_token_id] = -100
    with torch.no_grad():
        reference = m(**inputs, labels=labels).loss
        with piofvlm.get_method("random", layers=[1], keep=1.0)(m):
            hooked = m(**inputs, labels=labels).loss
    assert torch.equal(hooked, reference)


def test_pruned_loss_equals_a_direct_computation():
    m, inputs, _ = family("llava")
    labels = inputs["input_ids"].clone()  # naive labels: visual positions must be ignored by the method's loss
    labels[inputs["attention_mask"] == 0] = -100
    method = piofvlm.get_method("pio", layers=[1, 3], keep=[0.5, 0.25])
    with torch.no_grad(), method(m):
        loss = m(**inputs, labels=labels).loss
        logits = m(**inputs).logits
    targets, picked = [], []
    for b, ids in enumerate(inputs["input_ids"]):
        visual = (ids == IMAGE_ID).nonzero().flatten()
        kept_visual = visual[method.last_selection[-1].kept[b]]
        real = inputs["attention_mask"][b].bool()
        positions = sorted(set((real & (ids != IMAGE_ID)).nonzero().flatten().tolist()) | set(kept_visual.tolist()))
        sample_logits = logits[b, -len(positions) :]
        for slot, position in enumerate(positions):
            following = position + 1
            if following < ids.shape[0] and ids[following] != IMAGE_ID:
                targets.append(int(labels[b, following]))
                picked.append(sample_logits[slot])
    expected = F.cross_entropy(torch.stack(picked).float(), torch.tensor(targets), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        unpruned = m(**inputs, labels=labels_for(inputs)).loss
    assert not torch.isclose(loss, unpruned)


def test_pruned_loss_has_gradients():
    m, inputs, _ = family("llava")
    m.zero_grad(set_to_none=True)
    with piofvlm.get_method("random", layers=[2], keep=0.3)(m):
        loss = m(**inputs, labels=labels_for(inputs)).loss
    loss.backward()
    grads = [p.grad for p in m.model.language_model.parameters() if p.grad is not None]
    m.zero_grad(set_to_none=True)
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_labels_without_every_logit_are_refused():
    m, inputs, _ = family("llava")
    with torch.no_grad(), piofvlm.get_method("random", layers=[2], keep=0.3)(m):
        with pytest.raises(ValueError, match="logits_to_keep=0"):
            m(**inputs, labels=labels_for(inputs), logits_to_keep=1)
        with pytest.raises(ValueError, match="same shape"):
            m(**inputs, labels=labels_for(inputs)[:, 1:])
