"""Selection rules on hand-made inputs, against plain loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from piofvlm.methods.shared.selection import greedy_nms, nms_fill_per_group, topk_per_group


def loop_nms(neighbors: torch.Tensor) -> list[bool]:
    selected: list[bool] = []
    for i in range(neighbors.shape[0]):
        selected.append(not any(selected[j] and bool(neighbors[i, j]) for j in range(i)))
    return selected


def test_greedy_nms_equals_sequential_loop():
    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = 5 + trial
        sym = torch.rand(n, n, generator=generator)
        neighbors = (sym + sym.T) / 2 > (0.3 + 0.02 * trial)
        neighbors.fill_diagonal_(True)
        got = greedy_nms(neighbors[None], torch.ones(1, n, dtype=torch.bool))[0].tolist()
        assert got == loop_nms(neighbors)


def test_greedy_nms_long_chain():
    """A chain 0-1-2-...: selection alternates, the slowest case for the fixed-point iteration."""
    n = 40
    neighbors = torch.eye(n, dtype=torch.bool)
    idx = torch.arange(n - 1)
    neighbors[idx, idx + 1] = neighbors[idx + 1, idx] = True
    assert greedy_nms(neighbors[None], torch.ones(1, n, dtype=torch.bool))[0].tolist() == [
        i % 2 == 0 for i in range(n)
    ]


def test_topk_per_group_ties_and_groups():
    scores = torch.tensor([[0.0, 5.0, 5.0, 1.0, 9.0, 9.0, 2.0, 3.0]])
    groups = torch.tensor([[-1, 0, 0, 0, 1, 1, 1, -1]])
    budgets = torch.tensor([[1, 2]])
    keep = topk_per_group(scores, groups, budgets)
    # group 0: tie 5.0 at slots 1 and 2 -> the lower slot wins; group 1: slots 4, 5; text never kept
    assert keep.tolist() == [[False, True, False, False, True, True, False, False]]


def test_nms_fill_meets_budget_and_suppresses_duplicates():
    # four tokens: 0 and 1 identical, 2 orthogonal, 3 near-identical to 2; scores 0 > 1 > 2 > 3
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]])
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    groups = torch.zeros(1, 4, dtype=torch.long)
    keep2 = nms_fill_per_group(scores, feats, groups, torch.tensor([[2]]), tau=0.8)
    assert keep2.tolist() == [[True, False, True, False]]  # NMS skips the duplicate 1
    keep3 = nms_fill_per_group(scores, feats, groups, torch.tensor([[3]]), tau=0.8)
    assert keep3.tolist() == [[True, True, True, False]]  # fill pass: best suppressed token (1) joins
    no_suppression = nms_fill_per_group(scores, feats, groups, torch.tensor([[2]]), tau=1.01)
    assert no_suppression.tolist() == [[True, True, False, False]]


def test_nms_fill_batched_groups_equal_one_by_one():
    generator = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(2, 30, 8, generator=generator), dim=-1)
    scores = torch.rand(2, 30, generator=generator)
    groups = torch.tensor([[-1] * 4 + [0] * 12 + [1] * 14, [-1] * 2 + [0] * 20 + [-1] * 8])
    budgets = torch.tensor([[5, 3], [7, 0]])
    keep = nms_fill_per_group(scores, feats, groups, budgets, tau=0.3)
    for b in range(2):
        for g in range(2):
            slots = (groups[b] == g).nonzero()[:, 0]
            if len(slots) == 0:
                continue
            sub = nms_fill_per_group(
                scores[b : b + 1, slots],
                feats[b : b + 1, slots],
                torch.zeros(1, len(slots), dtype=torch.long),
                budgets[b : b + 1, g : g + 1],
                tau=0.3,
            )
            assert torch.equal(keep[b, slots], sub[0])
    assert keep.sum().item() == 15 and not keep[groups < 0].any()


def test_nms_fill_prefix_search_equals_full_nms():
    """Any starting prefix (doubling until the budgets are met) gives the all-token answer."""
    generator = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 90, 6, generator=generator)
    feats[:, 40:] = feats[:, :50] + 0.1 * torch.randn(2, 50, 6, generator=generator)  # many near-duplicates
    scores = torch.rand(2, 90, generator=generator)
    groups = torch.tensor([[-1] * 5 + [0] * 40 + [1] * 45, [0] * 85 + [-1] * 5])
    for features in (feats, feats.to(torch.bfloat16)):  # bf16 on the CPU: the bf16 GEMM with fp32 decisions
        for tau in (0.2, 0.6, 0.95):
            for budgets in (torch.tensor([[3, 20], [30, 0]]), torch.tensor([[40, 45], [85, 0]])):
                full = nms_fill_per_group(scores, features, groups, budgets, tau, initial_prefix=90)
                for start in (1, 4, 17):
                    grown = nms_fill_per_group(scores, features, groups, budgets, tau, initial_prefix=start)
                    assert torch.equal(grown, full)
                assert torch.equal(nms_fill_per_group(scores, features, groups, budgets, tau), full)
