"""PIO's closed-form proxy gradient (``methods/pio/proxy_loss._closed_form_gradient``) and the bf16 NMS similarities.

``test_pio`` / ``test_qwen`` compare the default fast proxy (the closed form where it fits) with the reference path
on every family in fp64 and fp32. Here: that every family really takes the closed form, that it equals the autograd
fast path and its norms the gradient's, that its RMSNorm backward is exact where the module's arithmetic allows it,
that bf16 stays close to the fp32 gradient, and that the bf16 similarity matrix decides every pair as fp32 does.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import conftest
import test_qwen as tq
from piofvlm.adapters.registry import get_adapter
from piofvlm.methods.pio import proxy_loss
from piofvlm.methods.shared.selection import cosine_neighbors
from test_pio import capture_context

KINDS = ["llava", "llava_next", *(kind for kind in tq.KINDS if kind not in tq.REFERENCE_PROXY_KINDS)]  # no fast proxy


def _model_and_inputs(kind: str, dtype: torch.dtype = torch.float32, indices=(0, 1, 2)):
    if kind in ("llava", "llava_next"):
        m, inputs = conftest.model(kind, dtype=dtype), conftest.make_inputs(kind, indices=indices)
    else:
        m, inputs = tq.model(kind, dtype=dtype), tq.make_inputs(kind, indices=indices)
    for key in ("pixel_values", "pixel_values_videos", "high_res_pixel_values"):
        if key in inputs and inputs[key].is_floating_point():
            inputs[key] = inputs[key].to(dtype)
    return m, inputs


def _no_autograd_fast_path(*args, **kwargs):
    raise AssertionError("the closed form fell back to autograd through the fast forward")


@pytest.mark.parametrize("kind", KINDS)
def test_every_family_takes_the_closed_form(kind, monkeypatch):
    """fp32, a left-padded batch of three, the previous layer as proxy (K-1) and the next one (K): the closed form
    is taken (the autograd fast path would raise), equals autograd through the fast forward, and its norms (computed
    without the gradient) equal the gradient's row norms."""
    m, inputs = _model_and_inputs(kind)
    ctx = capture_context(m, inputs, layer=2)
    valid = ctx.valid
    for layer_index in (1, 2):
        autograd = proxy_loss.proxy_gradient(ctx, layer_index, closed_form=False)
        with monkeypatch.context() as patch:
            patch.setattr(proxy_loss, "_fast_logits", _no_autograd_fast_path)
            closed = proxy_loss.proxy_gradient(ctx, layer_index)
            norms = proxy_loss.proxy_gradient_norms(ctx, layer_index, include_last=True)
        last = proxy_loss.proxy_gradient(ctx, layer_index, include_last=True, closed_form=False)
        scale = autograd[valid].abs().max()
        assert ((closed - autograd)[valid].abs().max() / scale).item() < 1e-5
        expected = last.norm(dim=-1)
        assert norms.dtype == torch.float32
        assert ((norms - expected)[valid].abs().max() / expected[valid].max()).item() < 1e-5
        assert torch.all(closed[:, -1] == 0)  # the authors' window stops before the last token
    assert all(p.grad is None for p in m.parameters())


class _Fp64RMSNorm(torch.nn.Module):
    """Llama's RMSNorm computed in the input's own precision (fp64 here), so the closed form can equal it exactly."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, size, dtype=torch.float64))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_equals_the_reference_in_fp64_where_the_norm_is_fp64(kind, monkeypatch):
    """fp64 with the decoder's input norms computed in fp64 (so the closed form's own RMSNorm arithmetic applies, not
    the autograd fallback of transformers' fp32 norms): the closed form's norms and gradient equal the reference
    path's to 1e-10, with every CPU shortcut forced on at tiny sizes: ``g . x`` from ``k q^T`` and ``P``, the LM
    head's backward as summed blocks, the row norms upcast a block at a time."""
    m, inputs = _model_and_inputs(kind, dtype=torch.float64)
    m = copy.deepcopy(m)  # the cached model is shared with later tests: its norms are replaced on a copy only
    for layer in get_adapter(m).layers:
        fp64_norm = _Fp64RMSNorm(layer.input_layernorm.weight.shape[-1])
        with torch.no_grad():
            fp64_norm.weight.copy_(layer.input_layernorm.weight)
        layer.input_layernorm = fp64_norm
    monkeypatch.setattr(proxy_loss, "_CPU_SPLIT_ROWS", 8)
    monkeypatch.setattr(proxy_loss, "_CPU_UPCAST_ELEMENTS", 64)
    ctx = capture_context(m, inputs, layer=2)
    valid = ctx.valid
    assert proxy_loss.rms_norm_parts(get_adapter(m).layers[2].input_layernorm, ctx.hidden_states) is not None
    for layer_index in (1, 2):
        reference = proxy_loss.proxy_gradient(ctx, layer_index, fast=False)
        with monkeypatch.context() as patch:
            patch.setattr(proxy_loss, "_fast_logits", _no_autograd_fast_path)
            closed = proxy_loss.proxy_gradient(ctx, layer_index)
            norms = proxy_loss.proxy_gradient_norms(ctx, layer_index)
        scale = reference[valid].abs().max()
        assert ((closed - reference)[valid].abs().max() / scale).item() < 1e-10
        expected = reference.norm(dim=-1)
        assert ((norms - expected)[valid].abs().max() / expected[valid].max()).item() < 1e-10


def test_few_rows_times_and_row_norms_equal_the_plain_products(monkeypatch):
    """The LM head's split backward equals ``rows @ weight`` (fp64: to rounding; bf16: no further from the fp32
    product than the plain bf16 one), with and without a remainder block; the blockwise row norms equal the
    whole-tensor ones bit for bit in fp32 accumulation."""
    torch.manual_seed(0)
    for vocab in (48 * 8, 48 * 8 + 5):
        rows, weight = torch.randn(4, vocab, dtype=torch.float64), torch.randn(vocab, 24, dtype=torch.float64)
        monkeypatch.setattr(proxy_loss, "_CPU_SPLIT_ROWS", 8)
        torch.testing.assert_close(proxy_loss._few_rows_times(rows, weight), rows @ weight, rtol=1e-12, atol=1e-12)
        low_rows, low_weight = rows.to(torch.bfloat16), weight.to(torch.bfloat16)
        exact = low_rows.double() @ low_weight.double()
        split_error = (proxy_loss._few_rows_times(low_rows, low_weight).double() - exact).abs().max()
        plain_error = ((low_rows @ low_weight).double() - exact).abs().max()
        assert split_error <= 2 * plain_error
    t = torch.randn(3, 50, 40, dtype=torch.bfloat16)
    monkeypatch.setattr(proxy_loss, "_CPU_UPCAST_ELEMENTS", 64)
    blocked = proxy_loss._row_norms(t)
    assert blocked.dtype == torch.float32 and blocked.shape == (3, 50)
    assert torch.equal(blocked, torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32))


def test_rms_norm_closed_form_is_exact_and_recognised_only_where_it_applies():
    torch.manual_seed(0)
    norm = _Fp64RMSNorm(48)
    x = torch.randn(2, 7, 48, dtype=torch.float64) * torch.linspace(0.01, 3.0, 7, dtype=torch.float64)[:, None]
    upstream = torch.randn(2, 7, 48, dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(norm(leaf), leaf, upstream)
    closed = proxy_loss._Norm(norm, x)
    assert closed.rstd is not None  # recognised
    scaled = closed.scale_rows(closed.fold_weight(upstream))  # r w dL/d(output)
    torch.testing.assert_close(closed.backward(scaled), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(closed.backward(scaled[:, 2:5], slice(2, 5)), expected[:, 2:5], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(closed.gradient_norms(scaled), expected.norm(dim=-1), rtol=1e-10, atol=1e-14)
    # The module itself, recomputed: the same output.
    torch.testing.assert_close(closed.output(), norm(x), rtol=0, atol=0)

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama = LlamaRMSNorm(48)
    assert proxy_loss.rms_norm_parts(llama, x.float()) is not None
    assert proxy_loss.rms_norm_parts(llama.to(torch.bfloat16), x.to(torch.bfloat16)) is not None
    # fp64 inputs: transformers' norm computes in fp32, which a closed form in fp64 would not equal: autograd then.
    assert proxy_loss.rms_norm_parts(llama.double(), x) is None
    fallback = proxy_loss._Norm(llama.double(), x)
    assert fallback.rstd is None and fallback.weight is None
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(llama.double()(leaf), leaf, upstream)
    assert torch.equal(fallback.backward(upstream), expected)

    class OnePlusWeight(LlamaRMSNorm):  # Gemma's scaling
        def forward(self, hidden):
            return super().forward(hidden) + hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)

    assert proxy_loss.rms_norm_parts(OnePlusWeight(48), x.float()) is None
    assert proxy_loss.rms_norm_parts(torch.nn.LayerNorm(48, elementwise_affine=True), x.float()) is None
    with_bias = torch.nn.LayerNorm(48)
    with_bias.variance_epsilon = 1e-6
    assert proxy_loss.rms_norm_parts(with_bias, x.float()) is None


def test_bf16_closed_form_stays_close_to_fp32():
    """bf16 rounds the folded factors and the products; the gradient norms stay within bf16 noise of the fp32 ones
    computed from the same (bf16-valued) inputs and weights."""
    m, inputs = _model_and_inputs("llava", dtype=torch.bfloat16, indices=(1,))
    ctx = capture_context(m, inputs, layer=2)
    bf16_norms = proxy_loss.proxy_gradient_norms(ctx, 2)
    wide = copy.deepcopy(m).float()  # the same weights, widened
    ctx32 = dataclasses.replace(
        capture_context(wide, inputs, layer=2),
        hidden_states=ctx.hidden_states.float(),
        position_embeddings=tuple(t.float() for t in ctx.position_embeddings),
    )
    reference = proxy_loss.proxy_gradient(ctx32, 2, fast=False).norm(dim=-1)
    visual = ctx.groups >= 0
    relative = ((bf16_norms - reference).abs() / reference)[visual]
    assert relative.median().item() < 0.005 and relative.max().item() < 0.02  # measured: 0.0013, 0.0033
    # the ranking is essentially the fp32 one
    order = torch.argsort(reference[visual], descending=True)
    top = int(visual.sum()) // 3
    kept = set(torch.argsort(bf16_norms[visual], descending=True)[:top].tolist())
    assert len(kept & set(order[:top].tolist())) >= top - 2


def test_bf16_cosine_neighbors_decide_as_fp32():
    """Pairs built around the threshold (within 1e-3 of it, where a bf16 result would often be wrong): every
    decision equals the fp32 one."""
    torch.manual_seed(0)
    tau, size = 0.8, 256
    base = torch.randn(3, 1, size)
    noise = torch.randn(3, 200, size)
    noise -= (noise * base).sum(-1, keepdim=True) / base.square().sum(-1, keepdim=True) * base  # orthogonal to base
    # cos(base, v) = tau + offset for offsets in [-1e-3, 1e-3], and the rows among themselves spread around tau
    target = tau + torch.linspace(-1e-3, 1e-3, 200)[None, :, None]
    rows = F.normalize(base, dim=-1) * target + F.normalize(noise, dim=-1) * (1 - target**2).sqrt()
    rows = torch.cat([F.normalize(base, dim=-1), rows], dim=1) * torch.rand(3, 201, 1) * 4
    features = rows.to(torch.bfloat16)  # (P, L, d)
    unit = F.normalize(features.float(), dim=-1)
    cosines = torch.bmm(unit, unit.transpose(1, 2))
    expected = cosines >= tau
    decided = cosine_neighbors(features, tau)
    clear = (cosines - tau).abs() > 1e-6  # fp32 rounding itself cannot tell these apart
    assert torch.equal(decided[clear], expected[clear])
    # one block of rows against another (the NMS's grown prefix against its decided part): the same decisions
    block = cosine_neighbors(features[:, 80:], tau, features[:, :80])  # (P, 121, 80)
    assert torch.equal(block[clear[:, 80:, :80]], expected[:, 80:, :80][clear[:, 80:, :80]])
    near = ((cosines - tau).abs() < 1e-3).sum().item()
    assert near > 300  # the case is not vacuous: many pairs lie where a bf16 product would misjudge them
    rounded = torch.bmm(features, features.transpose(1, 2)).float()
    norms = torch.linalg.vector_norm(features.float(), dim=-1)
    assert not torch.equal((rounded / (norms[:, :, None] * norms[:, None, :]) >= tau)[clear], expected[clear])


def test_fused_head_loss_equals_the_two_passes(monkeypatch):
    """The one-pass head (online softmax over vocabulary blocks, with and without a remainder block) gives the loss
    and the gradient of ``_self_argmax_loss`` through the head to fp32 rounding, in fp32 and fp64 weights; the fp64
    closed form keeps the two passes (bit-for-bit fp32 softmax)."""
    torch.manual_seed(0)
    monkeypatch.setattr(proxy_loss, "_FUSED_HEAD_ROWS", 16)
    for vocab in (16 * 8, 16 * 8 + 5):
        for dtype in (torch.float32, torch.float64):
            weight = torch.randn(vocab, 24, dtype=dtype)
            hidden = torch.randn(2, 3, 24, dtype=dtype)
            leaf = hidden.clone().requires_grad_(True)
            expected_loss = proxy_loss._self_argmax_loss(leaf @ weight.T)
            (expected,) = torch.autograd.grad(expected_loss, leaf)
            leaf = hidden.clone().requires_grad_(True)
            loss = proxy_loss._FusedHeadLoss.apply(leaf, weight)
            (grad,) = torch.autograd.grad(2.0 * loss, leaf)  # the incoming gradient scales it
            torch.testing.assert_close(loss, expected_loss.to(loss.dtype), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(grad, 2.0 * expected, rtol=1e-5, atol=1e-6)
    head = torch.nn.Linear(24, 64, bias=False)
    calls = []
    monkeypatch.setattr(proxy_loss, "_self_argmax_loss", lambda logits: calls.append(logits.dtype) or logits.sum())
    proxy_loss._head_loss(head, torch.randn(1, 4, 24))  # fp32, 64 >= 4 blocks of 16: fused
    proxy_loss._head_loss(head.double(), torch.randn(1, 4, 24, dtype=torch.float64))  # fp64: two passes
    proxy_loss._head_loss(head.float(), torch.randn(1, 17, 24))  # more than 16 rows: two passes
    assert calls == [torch.float64, torch.float32]


def test_fused_head_keeps_the_kept_set(monkeypatch):
    """PIO on the fp32 tiny LLaVA with the one-pass head (blocks of 8 of its 64 ids) keeps the tokens the two-pass
    head keeps, with the same scores to fp32 rounding."""
    import piofvlm

    m, inputs = _model_and_inputs("llava", indices=(0, 2))
    method = piofvlm.get_method("pio", layers=[2], keep=0.25)

    def run():
        with method(m), torch.no_grad():
            m(**inputs)
        return method.last_selection[0]

    two_pass = run()
    monkeypatch.setattr(proxy_loss, "_FUSED_HEAD_ROWS", 8)
    fused_calls = []
    apply = proxy_loss._FusedHeadLoss.apply
    monkeypatch.setattr(proxy_loss._FusedHeadLoss, "apply", lambda *a: fused_calls.append(1) or apply(*a))
    fused = run()
    assert fused_calls == [1]
    assert [k.tolist() for k in fused.kept] == [k.tolist() for k in two_pass.kept]
    for a, b in zip(fused.scores, two_pass.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
