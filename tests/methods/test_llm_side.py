"""FastV, PyramidDrop, DART, DivPrune and pool against direct small computations of their rules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))

import piofvlm  # noqa: E402
from conftest import make_inputs, model  # noqa: E402
from piofvlm.methods import Pool  # noqa: E402
from piofvlm.methods.divprune import max_min_diversity  # noqa: E402
from piofvlm.methods.pool import pool_cells  # noqa: E402


def topk_sorted(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k])


def eager_attention_scores(inputs, layer: int, query: str) -> torch.Tensor:
    """Attention received by the visual tokens in decoder layer ``layer``, from the model's own eager attention map."""
    m = model("llava", "eager")
    with torch.no_grad():
        attentions = m(**inputs, output_attentions=True).attentions[layer][0]  # (H, S, S)
    visual = inputs["input_ids"][0] == 4
    rows = attentions[:, -1] if query == "last" else attentions.mean(1)
    return rows.mean(0)[visual]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("query", ["last", "mean"])
def test_fastv_matches_the_eager_attention_map(attn, query):
    inputs = make_inputs("llava", indices=(1,))
    expected = eager_attention_scores(inputs, layer=1, query=query)  # layer K-1 = 1 for K = 2
    method = piofvlm.get_method("fastv", layers=[2], keep=10, query=query)
    with torch.no_grad(), method(model("llava", attn)):
        model("llava", attn)(**inputs)
    record = method.last_selection[0]
    torch.testing.assert_close(record.scores[0], expected, rtol=1e-4, atol=1e-6)
    assert record.kept[0].tolist() == topk_sorted(expected, 10)


def test_pdrop_uses_the_next_layer_and_the_last_query():
    inputs = make_inputs("llava", indices=(2,))
    expected = eager_attention_scores(inputs, layer=2, query="last")
    method = piofvlm.get_method("pdrop", layers=[2], keep=[12])
    with torch.no_grad(), method(model("llava")):
        model("llava")(**inputs)
    assert method.last_selection[0].kept[0].tolist() == topk_sorted(expected, 12)


def test_dart_rule_on_the_model_states():
    m = model("llava")
    inputs = make_inputs("llava", indices=(0,))
    with torch.no_grad():
        hidden = m(**inputs, output_hidden_states=True).hidden_states
    lm = m.model.language_model
    with torch.no_grad():
        keys = lm.layers[1].self_attn.k_proj(lm.layers[1].input_layernorm(hidden[1]))[0]  # pre-RoPE, layer K-1
        feats = F.normalize(lm.norm(hidden[2])[0], dim=-1)
    norms = keys.abs().sum(-1)
    ids = inputs["input_ids"][0]
    visual = (ids == 4).nonzero()[:, 0].tolist()
    text_after = [i for i in range(len(ids)) if i > max(visual)]
    image_pivots = sorted(visual, key=lambda i: (-float(norms[i]), i))[:2]
    text_pivots = sorted(text_after, key=lambda i: (-float(norms[i]), i))[:2]
    kept, budget = list(image_pivots), 11
    rest = budget - len(kept)
    pivots = image_pivots + text_pivots
    for n, pivot in enumerate(pivots):
        share = rest // len(pivots) + (1 if n < rest % len(pivots) else 0)
        candidates = [i for i in visual if i not in kept]
        kept += sorted(candidates, key=lambda i: (float(feats[i] @ feats[pivot]), i))[:share]
    expected = sorted(visual.index(i) for i in kept)
    method = piofvlm.get_method("dart", layers=[2], keep=budget, image_pivots=2, text_pivots=2)
    with torch.no_grad(), method(m):
        m(**inputs)
    assert method.last_selection[0].kept[0].tolist() == expected


def test_divprune_max_min_on_a_hand_made_set():
    # Points on a circle at these angles (degrees); cosine distance grows with the angle between them.
    angles = torch.tensor([0.0, 5.0, 90.0, 100.0, 180.0, 270.0, 275.0])
    feats = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], -1)
    picked = max_min_diversity(feats[None], torch.ones(1, 7, dtype=torch.bool), torch.tensor([3]))[0]
    # First: the point whose nearest neighbour is farthest (180, 80 degrees from 100 and 95 from 275 -> nearest 80).
    # Then the point farthest from {180}: 0 (180 degrees away). Then farthest from {0, 180}: 90 (90 from both);
    # 270 ties with it and 90 has the lower index.
    assert picked.nonzero()[:, 0].tolist() == [0, 2, 4]


def test_divprune_on_the_model_is_the_rule_on_the_projected_features():
    m = model("llava")
    inputs = make_inputs("llava", indices=(1,))
    with torch.no_grad():
        embeds = m(**inputs, output_hidden_states=True).hidden_states[0][0]
    visual = inputs["input_ids"][0] == 4
    picked = max_min_diversity(
        embeds[visual][None], torch.ones(1, int(visual.sum()), dtype=torch.bool), torch.tensor([9])
    )
    method = piofvlm.get_method("divprune", keep=9)
    with torch.no_grad(), method(m):
        m(**inputs)
    assert method.last_selection[0].kept[0].tolist() == picked[0].nonzero()[:, 0].tolist()


def test_pool_cells_on_a_hand_made_grid():
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    cell, center_r, center_c = pool_cells(4, 6, 6, rows.flatten(), cols.flatten())
    # 2 bands of 2 rows x 3 segments of 2 columns: a plain 2x2 average pooling.
    assert cell.view(4, 6).tolist() == [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2
    assert center_r.tolist() == [0, 0, 0, 2, 2, 2] and center_c.tolist() == [0, 2, 4, 0, 2, 4]
    cell, _, _ = pool_cells(4, 6, 5, rows.flatten(), cols.flatten())  # 5 = 3 + 2 cells
    assert cell.view(4, 6).tolist() == [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 3, 4, 4, 4]] * 2


def test_pool_writes_cell_means_into_cell_centres():
    m = model("llava")
    inputs = make_inputs("llava", indices=(0,))
    captured = {}

    class Spy(Pool):
        def select(self, ctx):
            selection = super().select(ctx)
            captured.update(ctx=ctx, selection=selection)
            return selection

    with torch.no_grad(), Spy(keep=9)(m):
        m(**inputs)
    ctx, selection = captured["ctx"], captured["selection"]
    visual = (ctx.groups[0] >= 0).nonzero()[:, 0]
    grid = ctx.hidden_states[0, visual].view(7, 7, -1)
    bounds = [(0, 3), (3, 5), (5, 7)]  # 7 rows / 3 bands, 7 cols / 3 segments
    centres, means = [], []
    for top, bottom in bounds:
        for left, right in bounds:
            centres.append((top + (bottom - top - 1) // 2) * 7 + left + (right - left - 1) // 2)
            means.append(grid[top:bottom, left:right].reshape(-1, grid.shape[-1]).mean(0))
    kept = selection.keep[0, visual].nonzero()[:, 0].tolist()
    assert kept == sorted(centres)
    merged = selection.hidden_states[0, visual]
    for centre, mean in zip(centres, means, strict=True):
        torch.testing.assert_close(merged[centre], mean, rtol=1e-5, atol=1e-6)
