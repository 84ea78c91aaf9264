"""The MoE flagships (Qwen3-VL-MoE, Qwen3.5-MoE, GLM-4.5V): PIO's proxy through an MoE layer (router + experts at the
loss rows) is exact.

The general invariants of the three families (keep-all identity, counts, KV lengths, cached decode, batch == single,
kept indices, fast == reference) run in the shared matrices (``tests/test_qwen.py`` etc., via ``tiny.families``). Here:
an MoE block written out independently (every expert on every token, combined by the router's top-k weights) equals
transformers' block, and PIO's scores at a prune point whose proxy layer is an MoE layer equal full-layer autograd
through that independent block; the fast proxy equals the reference one under both of transformers' expert kernels.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

import piofvlm
import test_qwen as tq
from piofvlm.methods.pio import proxy_loss
from piofvlm.tiny.families import FAMILIES
from test_pio import capture_context, simple_nms

#: (family, prune layer whose proxy layer is an MoE layer): Qwen3-VL-MoE after its deepstack layers (the recorded
#: hidden states exclude deepstack), Qwen3.5-MoE at a full-attention (3) and a linear-attention (2) layer, GLM-4.5V
#: after its dense first layer.
CASES = [("qwen3_vl_moe", 3), ("qwen3_5_moe", 3), ("qwen3_5_moe", 2), ("glm4v_moe", 2)]
KINDS = ["qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe"]


@functools.cache
def model(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """This module's own models: ``tests/test_closed_form.py`` swaps the input norms of ``test_qwen``'s cached fp64
    models for plain RMSNorms (Qwen3.5's zero-centred norms then scale by 0)."""
    return FAMILIES[kind].build(dtype=dtype)


def _experts(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, E, d)``: every expert of ``block`` on every row of ``x`` ``(N, d)``."""
    experts = block.experts
    gate, up = torch.einsum("nd,eid->nei", x, experts.gate_up_proj).chunk(2, dim=-1)
    return torch.einsum("nei,edi->ned", experts.act_fn(gate) * up, experts.down_proj)


def independent_moe(block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The MoE block's output ``(B, S, d)``, written from the papers' / model cards' routing rules: dense over experts,
    combined by a one-hot top-k mask (not transformers' sparse dispatch)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    gate = block.gate
    if hasattr(gate, "e_score_correction_bias"):  # GLM-4.5V: sigmoid scores, group-limited top-k, shared experts
        scores = F.linear(x.float(), gate.weight.float()).sigmoid()
        choice = scores + gate.e_score_correction_bias
        groups = choice.view(len(x), gate.num_group, -1)
        group_score = groups.topk(2, dim=-1).values.sum(-1)  # (N, groups): each group's two best experts
        best_groups = group_score.topk(gate.topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, best_groups, True)
        allowed = allowed[:, :, None].expand_as(groups).reshape(len(x), -1)
        chosen = choice.masked_fill(~allowed, float("-inf")).topk(gate.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if gate.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * gate.routed_scaling_factor
    else:  # Qwen: softmax over experts, top-k renormalised
        probs = F.linear(x, gate.weight).softmax(-1, dtype=torch.float)
        top = probs.topk(gate.top_k, dim=-1)
        chosen, weights = top.indices, top.values / top.values.sum(-1, keepdim=True)
    combine = torch.zeros(len(x), block.experts.num_experts, dtype=x.dtype, device=x.device)
    combine = combine.scatter(1, chosen, weights.to(x.dtype))  # (N, E): the routing weight of each chosen expert
    out = torch.einsum("ne,ned->nd", combine, _experts(block, x))
    if hasattr(block, "shared_experts"):  # GLM-4.5V
        out = out + block.shared_experts(x)
    if hasattr(block, "shared_expert"):  # Qwen3.5-MoE: sigmoid-gated shared expert
        out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return out.view_as(hidden)


@contextlib.contextmanager
def independent_blocks(m: torch.nn.Module):
    """Every MoE block of ``m`` computes :func:`independent_moe` instead of its own forward."""
    blocks = [layer.mlp for layer in m.model.language_model.layers if hasattr(layer.mlp, "experts")]
    for block in blocks:
        block.forward = lambda hidden, block=block: independent_moe(block, hidden)
    try:
        yield blocks
    finally:
        for block in blocks:
            del block.forward


@pytest.mark.parametrize("kind", KINDS)
def test_independent_moe_equals_the_block(kind):
    """The written-out MoE block (above) equals transformers' block, forward and input gradient, with its default
    ``grouped_mm`` kernel (fp32) and ``eager`` (fp64); routing uses several experts."""
    for dtype in (torch.float32, torch.float64):
        m = model(kind, dtype=dtype)
        block = m.model.language_model.layers[2].mlp
        assert hasattr(block, "experts"), type(block).__name__
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, 7, m.config.text_config.hidden_size, dtype=dtype, generator=generator)
        x = hidden.clone().requires_grad_(True)
        y = x.clone().requires_grad_(True)
        ours, theirs = independent_moe(block, x), block(y)
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
        torch.testing.assert_close(ours, theirs, **tol)
        weights = torch.randn_like(ours)
        (gx,) = torch.autograd.grad((ours * weights).sum(), x)
        (gy,) = torch.autograd.grad((theirs * weights).sum(), y)
        torch.testing.assert_close(gx, gy, **tol)
        with torch.no_grad():
            _, _, chosen = block.gate(hidden.reshape(-1, hidden.shape[-1]))
        assert chosen.unique().numel() > block.gate.top_k  # not one fixed set of experts


@pytest.mark.parametrize(("kind", "layer"), CASES)
def test_pio_through_an_moe_layer_matches_independent_autograd(kind, layer):
    """PIO's scores (fast proxy, closed form where the layer is attention) at a prune point whose proxy layer is an
    MoE layer == full-layer autograd through the independent MoE block; kept indices == plain NMS over them."""
    m = model(kind, dtype=torch.float64)
    assert hasattr(m.model.language_model.layers[layer].mlp, "experts")
    inputs = tq.make_inputs(kind, indices=(1,))
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(torch.float64)
    with independent_blocks(m):
        scores, feats = tq.independent_scores(kind, m, inputs, layer)
    k = tq.expected_kept(0.3, len(scores))
    method = piofvlm.get_method("pio", layers=[layer], keep=0.3, budget_scope="sample")
    with torch.no_grad(), method(m):
        m(**inputs)
    record = method.last_selection[0]
    # the scores are stored in fp32: agreement to its rounding (a routing or expert error would be O(1))
    torch.testing.assert_close(record.scores[0].double(), scores.double(), rtol=1e-6, atol=1e-10)
    assert record.kept[0].tolist() == simple_nms(scores, feats, k, 0.8)


@pytest.mark.parametrize(("kind", "layer"), CASES)
@pytest.mark.parametrize("experts", ["eager", "grouped_mm"])
def test_fast_proxy_equals_reference_through_moe(kind, layer, experts):
    """fp32, left-padded batch of three: the fast proxy (closed form, and autograd through the fast forward) equals
    the reference (the layer's own forward on the whole sequence) under both expert kernels; no weight gradient is
    left behind."""
    m = model(kind)
    if not hasattr(m, "set_experts_implementation"):
        pytest.skip("this transformers release has one expert kernel")
    m.set_experts_implementation(experts)
    try:
        ctx = capture_context(m, tq.make_inputs(kind), layer=layer)
        reference = proxy_loss.proxy_gradient(ctx, layer, fast=False)
        scale = reference[ctx.valid].abs().max()
        assert scale > 0
        for closed_form in (True, False):
            fast = proxy_loss.proxy_gradient(ctx, layer, fast=True, closed_form=closed_form)
            assert ((fast - reference)[ctx.valid].abs().max() / scale).item() < 1e-5
        assert all(p.grad is None for p in m.parameters())
    finally:
        m.set_experts_implementation("grouped_mm")
