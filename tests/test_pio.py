"""PIO-FVLM against an independent, straightforward computation; fast proxy == reference proxy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import piofvlm
from conftest import make_inputs, model
from piofvlm.methods.pio import proxy_loss


def simple_nms(scores: torch.Tensor, feats: torch.Tensor, k: int, tau: float) -> list[int]:
    """The authors' two passes as plain Python loops."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    feats = F.normalize(feats.double(), dim=-1)
    sim = feats @ feats.T
    selected, suppressed = [], set()
    for i in order:
        if len(selected) == k:
            break
        if i in suppressed:
            continue
        selected.append(i)
        suppressed |= {j for j in range(len(scores)) if sim[i, j] >= tau}
    for i in order:
        if len(selected) == k:
            break
        if i not in selected:
            selected.append(i)
    return sorted(selected)


def independent_scores(m, inputs, layer: int, include_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-layer autograd on the unhooked model's hidden states at ``layer`` (batch of one, no padding)."""
    with torch.no_grad():
        hidden = m(**inputs, output_hidden_states=True).hidden_states[layer]  # input of decoder layer `layer`
    lm = m.model.language_model
    x = hidden.clone().requires_grad_(True)
    seq = x.shape[1]
    positions = torch.arange(seq)[None]
    with torch.enable_grad():
        out = lm.layers[layer](
            x, attention_mask=None, position_embeddings=lm.rotary_emb(x, positions), position_ids=positions
        )
        logits = m.lm_head(lm.norm(out))[0].float()
        window = logits[seq - 4 : seq] if include_last else logits[seq - 5 : seq - 1]
        loss = F.cross_entropy(window, window.argmax(-1))
        (grad,) = torch.autograd.grad(loss, x)
    visual = inputs["input_ids"][0] == 4
    return grad[0, visual].float().norm(dim=-1), hidden[0, visual]


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("include_last", [False, True])
def test_kept_indices_match_independent_computation(kind, layer, include_last):
    m = model(kind)
    inputs = make_inputs(kind, indices=(1,))
    scores, feats = independent_scores(m, inputs, layer, include_last)
    k = max(1, int(0.3 * len(scores) + 0.5))
    method = piofvlm.get_method("pio", layers=[layer], keep=0.3, include_last=include_last)
    with torch.no_grad(), method(m):
        m(**inputs)
    record = method.last_selection[0]
    torch.testing.assert_close(record.scores[0], scores, rtol=1e-4, atol=1e-7)
    assert record.kept[0].tolist() == simple_nms(scores, feats, k, 0.8)
    # a lower threshold suppresses more, and the fill pass still meets the budget exactly
    strict = piofvlm.get_method("pio", layers=[layer], keep=0.3, include_last=include_last, tau=0.2)
    with torch.no_grad(), strict(m):
        m(**inputs)
    assert strict.last_selection[0].kept[0].tolist() == simple_nms(scores, feats, k, 0.2)
    plain = piofvlm.get_method("pio", layers=[layer], keep=0.3, include_last=include_last, nms=False)
    with torch.no_grad(), plain(m):
        m(**inputs)
    top = sorted(sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k])
    assert plain.last_selection[0].kept[0].tolist() == top


def capture_context(m, inputs, layer):
    """The StageContext the mechanism hands to a method at ``layer``."""
    captured = {}

    class Capture(piofvlm.RandomPrune):
        def select(self, ctx):
            captured["ctx"] = ctx
            return super().select(ctx)

    with torch.no_grad(), Capture(layers=[layer], keep=1.0)(m):
        m(**inputs)
    return captured["ctx"]


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_proxy_equals_reference(kind, attn, dtype):
    m = model(kind, attn, dtype=dtype)
    # Batch of 3 with left padding; except eager fp64, where stock transformers itself turns padded batches into NaN
    # (its eager softmax runs in fp32, where the fp64 mask minimum becomes -inf), so that case runs unpadded.
    inputs = make_inputs(kind, indices=(1,) if (attn, dtype) == ("eager", torch.float64) else (0, 1, 2))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    ctx = capture_context(m, inputs, layer=2)
    fast = proxy_loss.proxy_gradient(ctx, 2, fast=True)
    reference = proxy_loss.proxy_gradient(ctx, 2, fast=False)
    valid = ctx.valid
    if dtype == torch.float64 and attn == "sdpa":
        assert (fast - reference)[valid].abs().max().item() < 1e-10
    else:  # fp32, or eager, whose softmax transformers always computes in fp32
        scale = reference[valid].abs().max()
        assert ((fast - reference)[valid].abs().max() / scale).item() < 1e-5
    # the authors' window ends before the last prompt token, whose gradient is therefore exactly zero
    assert torch.all(fast[:, -1] == 0)
    # no parameter gradient is ever written
    assert all(p.grad is None for p in m.parameters())


def test_scores_are_fp32_and_recorded_per_sample():
    m = model("llava_next")
    inputs = make_inputs("llava_next")
    method = piofvlm.get_method("pio", layers=[1], keep=0.25)
    with torch.no_grad(), method(m):
        m(**inputs)
    record = method.last_selection[0]
    counts = (inputs["input_ids"] == 4).sum(1).tolist()
    assert [len(s) for s in record.scores] == counts
    assert all(s.dtype == torch.float32 for s in record.scores)
    assert [c.tolist() for c in record.candidates] == [list(range(n)) for n in counts]
