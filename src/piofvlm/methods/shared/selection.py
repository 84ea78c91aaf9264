"""Vectorised selection rules shared by methods: per-group top-k and greedy feature-space NMS with budget fill.

All functions work on the whole batch at once on the model's device; none loops over tokens.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices that sort ``scores`` (``(..., N)``) from high to low; ties keep the lower index first (stable)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def _clean_scores(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """fp32 scores with NaN and non-visual slots sent to -inf, so they rank last."""
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    return scores.masked_fill(groups < 0, float("-inf"))


def rank_within_groups(
    order: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk each row in ``order`` and number the visual slots of each group 0, 1, 2, ...

    Args:
        order: ``(B, S)`` slot indices, the walking order.
        groups: ``(B, S)`` group id of each slot, -1 for slots outside every group.
        num_groups: ``G``.

    Returns:
        ``(groups_in_order, rank_in_order)``, both ``(B, S)``: group id and rank of ``order[:, j]`` (-1 rank outside).
    """
    groups_in_order = groups.gather(1, order)  # (B, S)
    inside = groups_in_order >= 0
    one_hot = F.one_hot(groups_in_order.clamp(min=0), num_groups) * inside[..., None]  # (B, S, G)
    rank = (one_hot.cumsum(1) * one_hot).sum(-1) - 1  # (B, S)
    return groups_in_order, rank.masked_fill(~inside, -1)


def topk_per_group(scores: torch.Tensor, groups: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Keep the ``budgets[b, g]`` highest-scoring slots of every group (stable tie-break by slot index).

    Args:
        scores: ``(B, S)``; groups: ``(B, S)`` long, -1 outside; budgets: ``(B, G)`` long.

    Returns:
        ``(B, S)`` bool keep mask.
    """
    order = descending_order(_clean_scores(scores, groups))  # (B, S)
    groups_in_order, rank = rank_within_groups(order, groups, budgets.shape[1])
    keep_in_order = (rank >= 0) & (rank < budgets.gather(1, groups_in_order.clamp(min=0)))
    return torch.zeros_like(keep_in_order).scatter(1, order, keep_in_order)


def pack_groups(order: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Lay out each (sample, group) as one row of slot indices in walking order.

    Returns:
        ``(B * G, N_max)`` long table of slot indices, -1 where a row is shorter than ``N_max``.
    """
    batch_size = order.shape[0]
    groups_in_order, rank = rank_within_groups(order, groups, num_groups)
    inside = rank >= 0
    max_len = int(rank.max().item()) + 1 if bool(inside.any()) else 0
    table = torch.full((batch_size * num_groups, max(max_len, 1)), -1, dtype=torch.long, device=order.device)
    rows = torch.arange(batch_size, device=order.device)[:, None] * num_groups + groups_in_order  # (B, S)
    table[rows[inside], rank[inside]] = order[inside]
    return table


def _bf16_cosine_margin(size: int, tau: float) -> float:
    """Twice the most a cosine near ``tau`` from a bf16 GEMM can differ from the fp32 one: the products of bf16 values
    are exact and summed in fp32 (at most ``size * 2^-24`` of ``|a| |b|``), the sum is rounded to bf16 (``2^-9`` of
    itself, i.e. of ``|tau| + margin``)."""
    return 2 * (2.0**-9 * abs(tau) + size * 2.0**-24) / (1 - 2.0**-9)


def cosine_neighbors(features: torch.Tensor, tau: float, others: torch.Tensor | None = None) -> torch.Tensor:
    """``(P, L, M)`` bool: cosine similarity of features ``(P, L, d)`` with ``others`` ``(P, M, d)`` (default: the
    features themselves, ``M = L``) at least ``tau``, decided in fp32 on the normalised features (as
    ``F.normalize(features.float())`` products would, to fp32 rounding).

    bf16 features on a CPU: the ``L x M`` products come from one bf16 GEMM (~15x faster there than fp32), and the
    pairs whose cosine lies within :func:`_bf16_cosine_margin` of ``tau`` (well under 1%) are recomputed in fp32 from
    the exact bf16 values, so every decision is the fp32 one.
    """
    wide = features.float()
    norms = torch.linalg.vector_norm(wide, dim=-1).clamp(min=1e-12)  # (P, L), F.normalize's floor
    if others is None:
        others, wide_others, norms_others = features, wide, norms
    else:
        wide_others = others.float()
        norms_others = torch.linalg.vector_norm(wide_others, dim=-1).clamp(min=1e-12)  # (P, M)
    if features.dtype != torch.bfloat16 or features.device.type != "cpu":
        unit, unit_others = wide / norms[..., None], wide_others / norms_others[..., None]  # (P, L, d), (P, M, d)
        return torch.bmm(unit, unit_others.transpose(1, 2)) >= tau
    approx = torch.bmm(features, others.transpose(1, 2)).float() / (norms[:, :, None] * norms_others[:, None, :])
    neighbors = approx >= tau
    band = approx.sub_(tau).abs_() <= _bf16_cosine_margin(features.shape[-1], tau)  # in place: |cos - tau|
    rows, first, second = band.nonzero(as_tuple=True)  # row-major order, as a CSR pattern lists them
    if rows.numel():
        dots = _sampled_dots(wide, wide_others, rows, first, second)
        neighbors[rows, first, second] = dots / (norms[rows, first] * norms_others[rows, second]) >= tau
    return neighbors


def _sampled_dots(
    features: torch.Tensor, others: torch.Tensor, rows: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> torch.Tensor:
    """fp32 dot products ``features[rows, first] . others[rows, second]`` (``(P, L, d)`` and ``(P, M, d)``; pairs in
    row-major order) from one sampled sparse product: ~25x faster on CPUs than gathering both rows of every pair."""
    batch, length, _ = features.shape
    other_length = others.shape[1]
    flat, flat_others = features.reshape(batch * length, -1), others.reshape(batch * other_length, -1)
    flat_first, flat_second = rows * length + first, rows * other_length + second
    crow = F.pad(torch.bincount(flat_first, minlength=batch * length).cumsum(0), (1, 0))
    shape = (batch * length, batch * other_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "sparse CSR tensor support is in beta state"
        pattern = torch.sparse_csr_tensor(crow, flat_second, flat.new_zeros(rows.numel()), shape)
        return torch.sparse.sampled_addmm(pattern, flat, flat_others.T, beta=0.0).values()


def greedy_nms(neighbors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Exact greedy non-maximum suppression for rows already sorted by priority.

    Greedy rule: walk positions 0, 1, 2, ...; a position is selected unless an earlier *selected* position is its
    neighbour. Computed as the fixed point of ``sel[i] = valid[i] and not any(earlier neighbour j selected)``, by
    Jacobi iteration: after ``t`` rounds the first ``t`` positions are final, and a round in which nothing changes
    proves the unique fixed point, i.e. the greedy answer (further rounds leave it unchanged). Each round is one
    batched matrix-vector product; convergence is checked after 1, 2, 4, 8, ... more rounds, so a run that needs
    ``R`` rounds costs at most ``2R`` products and ``log2(R) + 1`` host syncs (on a GPU the syncs, not the products,
    are what costs).

    Args:
        neighbors: ``(P, N, N)`` bool, ``neighbors[p, i, j]``: positions i and j suppress each other.
        valid: ``(P, N)`` bool, real positions.

    Returns:
        ``(P, N)`` bool: selected positions.
    """
    num = neighbors.shape[-1]
    suppressors = (neighbors.tril(-1) & valid[:, None, :]).to(torch.float32)  # (P, N, N): earlier j < i only

    def step(selected: torch.Tensor) -> torch.Tensor:
        hit = torch.bmm(suppressors, selected.to(torch.float32)[..., None])[..., 0] > 0  # (P, N)
        return valid & ~hit

    selected, rounds, chunk = valid.clone(), 0, 1
    while rounds <= num:  # num + 1 rounds always reach the fixed point
        for _ in range(chunk - 1):
            selected = step(selected)
        previous, selected = selected, step(selected)
        rounds += chunk
        if torch.equal(previous, selected):
            break
        chunk *= 2
    return selected


def _next_prefix(prefix: int, counts: torch.Tensor, budgets: torch.Tensor) -> int:
    """The next prefix length: long enough, at the selection rate seen so far (plus a quarter), for every group to
    reach its budget; at least 64 tokens longer, at most twice as long. Any sequence of prefixes gives the same
    result; a close guess saves comparing tokens the budgets never reach (at a prefix doubled to all of them the
    last comparison is usually the largest)."""
    short = counts < budgets  # (P, 1)
    rates = counts[short].clamp(min=1).double() / prefix
    needed = int(torch.ceil(1.25 * budgets[short].double() / rates).max().item())
    return min(max(needed, prefix + 64), 2 * prefix)


def _grow(prefix: int, width: int) -> int:
    """A prefix within 1/8 of the width takes everything (the rest would cost little, another round more)."""
    return width if 8 * prefix > 7 * width else min(prefix, width)


def nms_fill_per_group(
    scores: torch.Tensor,
    features: torch.Tensor,
    groups: torch.Tensor,
    budgets: torch.Tensor,
    tau: float,
    initial_prefix: int | None = None,
) -> torch.Tensor:
    """Per group: greedy NMS in score order on cosine similarity ``>= tau``, then fill to exactly the budget.

    The kept set is the first ``k`` of [NMS-selected tokens in score order] followed by [the other tokens in score
    order], i.e. the authors' "stop at k" first pass plus their fill-up pass.

    Greedy decisions on the first ``L`` tokens of the score order depend on those tokens only, so the NMS runs on a
    prefix of the order (twice the largest budget at first) and grows it (:func:`_next_prefix`: to the length the
    selection rate so far says the budgets need, at most doubling) until every group has its ``k`` NMS-selected
    tokens inside the prefix, or the prefix is everything. The result is the same as over all tokens; the ``L x L``
    similarity matrix is usually far smaller than the ``N x N`` one. A longer prefix keeps the decisions already
    made: its new tokens are compared with the ones selected before them (an ``M x K`` block, ``K`` at most the
    selected count) and with each other (``M x M``), not the whole square again.

    Args:
        scores: ``(B, S)`` importance (higher first; ties by lower slot index).
        features: ``(B, S, d)`` features compared by cosine similarity.
        groups: ``(B, S)`` long, -1 outside; budgets: ``(B, G)`` long.
        tau: similarity threshold; pairs with cosine ``>= tau`` suppress each other.
        initial_prefix: first prefix length (default: twice the largest budget, at least 64).

    Returns:
        ``(B, S)`` bool keep mask with exactly ``budgets[b, g]`` slots per group.
    """
    batch_size, seq_len = groups.shape
    num_groups = budgets.shape[1]
    order = descending_order(_clean_scores(scores, groups))  # (B, S)
    table = pack_groups(order, groups, num_groups)  # (P, N), P = B * G
    valid = table >= 0
    width = table.shape[1]
    row_budget = budgets.reshape(-1, 1)  # (P, 1)
    sample = torch.arange(batch_size, device=groups.device).repeat_interleave(num_groups)[:, None]  # (P, 1)
    prefix = initial_prefix if initial_prefix is not None else max(2 * int(budgets.max().item()), 64)
    prefix = _grow(max(prefix, 1), width)
    done = 0
    selected = valid[:, :0]  # (P, done): final decisions on the prefix compared so far
    counts = selected.sum(1, keepdim=True)  # (P, 1) selected so far
    while True:
        fresh = features[sample, table[:, done:prefix].clamp(min=0)]  # (P, M, d) the tokens new to this prefix
        candidates = valid[:, done:prefix]
        most = int(counts.max().item()) if done else 0
        if most:  # a fresh token with a selected neighbour earlier in the order is suppressed already
            first = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, :most]  # selected cells first
            kept = torch.arange(most, device=groups.device)[None] < counts  # (P, K)
            earlier = features[sample, table[:, :done].gather(1, first).clamp(min=0)]  # (P, K, d) the selected ones
            suppressed = (cosine_neighbors(fresh, tau, earlier) & kept[:, None, :]).any(-1)  # (P, M)
            candidates = candidates & ~suppressed
        selected = torch.cat([selected, greedy_nms(cosine_neighbors(fresh, tau), candidates)], 1)
        done = prefix
        counts = selected.sum(1, keepdim=True)  # (P, 1)
        if prefix == width or bool((counts >= row_budget).all()):
            break
        prefix = _grow(_next_prefix(prefix, counts, row_budget), width)
    selected = F.pad(selected, (0, width - prefix))  # cells past the prefix: not NMS-selected (fill pass only)
    position = torch.arange(width, device=groups.device)[None].expand_as(table)
    # Priority: NMS-selected tokens in score order, then the rest in score order, then empty cells.
    priority = torch.where(selected, position, position + width).masked_fill(~valid, 2 * width)
    rank = torch.argsort(torch.argsort(priority, dim=1, stable=True), dim=1)  # (P, N) rank of each cell
    keep_cell = valid & (rank < row_budget)
    keep = torch.zeros(batch_size, seq_len + 1, dtype=torch.bool, device=groups.device)
    flat_rows = sample.expand_as(table)[keep_cell]
    keep[flat_rows, table[keep_cell]] = True
    return keep[:, :seq_len]


def group_rows(groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out every (sample, group) as one row of its slots in sequence order.

    Returns:
        ``(table, valid, sample)``: ``(P, N)`` slot indices (P = B * G, -1 past a row's end), ``(P, N)`` bool, and
        ``(P, 1)`` the sample of each row.
    """
    batch_size, seq_len = groups.shape
    order = torch.arange(seq_len, device=groups.device)[None].expand(batch_size, -1)
    table = pack_groups(order, groups, num_groups)
    sample = torch.arange(batch_size, device=groups.device).repeat_interleave(num_groups)[:, None]
    return table, table >= 0, sample


def rows_to_mask(
    table: torch.Tensor, keep_cell: torch.Tensor, sample: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    """Scatter a ``(P, N)`` per-row keep mask back to a ``(B, S)`` slot mask (inverse of :func:`group_rows`)."""
    batch_size, seq_len = shape
    keep = torch.zeros(batch_size, seq_len + 1, dtype=torch.bool, device=table.device)
    keep_cell = keep_cell & (table >= 0)
    keep[sample.expand_as(table)[keep_cell], table[keep_cell]] = True
    return keep[:, :seq_len]
