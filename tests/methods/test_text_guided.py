"""SparseVLM and CDPruner against direct small computations of their rules."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))

import piofvlm  # noqa: E402
from conftest import make_inputs, model  # noqa: E402
from piofvlm.methods.cdpruner import conditional_dpp_map  # noqa: E402


def test_sparsevlm_rule_from_the_eager_attention_map():
    inputs = make_inputs("llava", indices=(1,))
    with torch.no_grad():
        out = model("llava", "eager")(**inputs, output_attentions=True, output_hidden_states=True)
    attn = out.attentions[2][0].mean(0)  # (S, S), layer K = 2
    hidden = out.hidden_states[2][0]
    ids = inputs["input_ids"][0]
    visual = (ids == 4).nonzero()[:, 0]
    text = (ids != 4).nonzero()[:, 0]
    to_visual = attn[text][:, visual].mean(1)
    raters = text[to_visual >= to_visual.mean()]
    scores = attn[raters][:, visual].mean(0)
    budget, recycled = 10, 1  # round(0.1 * 10)
    order = sorted(range(len(visual)), key=lambda i: (-float(scores[i]), i))
    kept = order[: budget - recycled]
    dropped = order[budget - recycled :]
    pool = dropped[: max(recycled, -(-3 * len(dropped) // 10))]
    centre = pool[0]
    expected_merge = hidden[visual[pool]].mean(0)  # one centre: every recycled token joins it
    captured = {}

    class Spy(piofvlm.methods.SparseVLM):
        def select(self, ctx):
            captured["selection"] = selection = super().select(ctx)
            captured["visual"] = (ctx.groups[0] >= 0).nonzero()[:, 0]
            return selection

    with torch.no_grad(), Spy(layers=[2], keep=budget)(model("llava")):
        model("llava")(**inputs)
    selection, slots = captured["selection"], captured["visual"]
    torch.testing.assert_close(selection.scores[0, slots], scores, rtol=1e-4, atol=1e-7)
    assert selection.keep[0, slots].nonzero()[:, 0].tolist() == sorted(kept + [centre])
    torch.testing.assert_close(selection.hidden_states[0, slots[centre]], expected_merge, rtol=1e-5, atol=1e-6)


def naive_dpp(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by brute force: each step adds the item maximising log det of the selected kernel."""
    chosen: list[int] = []
    for _ in range(k):
        best, best_value = None, -float("inf")
        for i in range(kernel.shape[0]):
            if i in chosen:
                continue
            idx = chosen + [i]
            value = torch.linalg.det(kernel[idx][:, idx].double()).item()
            if value > best_value + 1e-12:
                best, best_value = i, value
        chosen.append(best)
    return sorted(chosen)


def test_dpp_map_equals_brute_force_greedy():
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(9, 4), dim=-1)
    relevance = torch.rand(9)
    kernel = relevance[:, None] * (feats @ feats.T) * relevance[None]
    picked = conditional_dpp_map(kernel[None], torch.ones(1, 9, dtype=torch.bool), torch.tensor([4]))
    assert picked[0].nonzero()[:, 0].tolist() == naive_dpp(kernel, 4)


def test_cdpruner_on_the_model_uses_the_instruction_embeddings():
    m = model("llava")
    inputs = make_inputs("llava", indices=(0,))
    with torch.no_grad():
        embeds = m(**inputs, output_hidden_states=True).hidden_states[0][0]
    ids = inputs["input_ids"][0]
    vis = F.normalize(embeds[ids == 4], dim=-1)
    txt = F.normalize(embeds[ids != 4], dim=-1)
    relevance = -(vis @ txt.T).mean(1)
    relevance = (relevance - relevance.min()) / (relevance.max() - relevance.min() + 1e-6)
    kernel = relevance[:, None] * (vis @ vis.T) * relevance[None]
    method = piofvlm.get_method("cdpruner", keep=6)
    with torch.no_grad(), method(m):
        m(**inputs)
    assert method.last_selection[0].kept[0].tolist() == naive_dpp(kernel, 6)
