"""PIO-FVLM's layer-local proxy loss and its gradient with respect to the hidden states at the prune point.

Proxy = one decoder layer, the final norm and the LM head; loss = cross-entropy of the logits at a few prompt
positions against their own argmax (no ground truth). Two exact implementations:

* reference: the decoder layer's own forward on the whole sequence, logits everywhere, then the loss positions;
* fast: the loss depends on the layer's outputs at the loss positions only, so queries, the MLP and the LM head are
  computed there alone (keys and values over the prefix). Same loss, same gradient, a fraction of the cost. A
  linear-attention proxy layer (hybrid stacks) runs its token mixer over the whole sequence, the rest at the loss
  positions only.

The fast path's gradient comes in one of two exact ways:

* closed form (default where the layer fits it): autograd runs only on the few loss rows (queries, attention
  weights, output projection, MLP, LM head); a visual row is never a loss position, so its gradient reaches it only
  through the layer's keys and values, and that part is written out: the key gradient rotated back, the key
  projection's and values' transposes, the (per-head key) RMSNorm backward, over all S rows at once;
* autograd through the whole fast forward (:func:`_fast_logits`), for layers the closed form does not fit.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from piofvlm import transformers_compat
from piofvlm.core.context import StageContext
from piofvlm.core.ops import gather_sequence


def _loss_window(seq_len: int, num_positions: int, include_last: bool) -> slice:
    end = seq_len if include_last else seq_len - 1
    return slice(end - num_positions, end)


def loss_positions(valid: torch.Tensor, num_positions: int, include_last: bool) -> torch.Tensor:
    """Slots whose logits enter the loss: ``(B, n)``.

    Default (authors'): the ``n`` prompt positions before the last one, i.e. the last ``n`` rows of the
    training-style shifted logits. With ``include_last`` the window ends at the last prompt token.
    Sequences are left-padded, so the same slots are the last real tokens of every sample.
    """
    batch_size, seq_len = valid.shape
    window = _loss_window(seq_len, num_positions, include_last)
    start, end = window.start, window.stop
    if start < 0 or not bool(valid[:, window].all()):
        raise ValueError(
            f"the proxy loss needs {num_positions} prompt positions before the last token in every sample "
            f"(num_loss_positions={num_positions}, include_last={include_last}); a prompt is too short"
        )
    return torch.arange(start, end, device=valid.device)[None].expand(batch_size, -1)


def _self_argmax_loss(logits: torch.Tensor) -> torch.Tensor:
    """Sum over samples of the mean CE of ``logits`` ``(B, n, V)`` against their own argmax (fp32)."""
    logits = logits.float()
    labels = logits.argmax(-1).detach()
    per_position = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    # A sum over samples (not a batch mean) keeps each sample's gradient what it would be alone.
    return per_position.view(labels.shape).mean(1).sum()


def _reference_logits(
    ctx: StageContext, layer_index: int, x: torch.Tensor, slots: torch.Tensor, head: Callable[[torch.Tensor], Any]
) -> torch.Tensor:
    adapter = ctx.adapter
    layer = adapter.layers[layer_index]
    extra = {**adapter.proxy_layer_kwargs(), **(ctx.layer_inputs if layer_index == ctx.layer else {})}
    out = layer(
        x,
        attention_mask=ctx.layer_mask(layer_index),
        position_embeddings=ctx.layer_rotary(layer_index),
        position_ids=adapter.layer_position_ids(ctx.position_ids),
        **transformers_compat.without_cache(layer),
        **extra,
    )
    out = out[0] if isinstance(out, tuple) else out
    logits = head(adapter.final_norm(out))  # (B, S, V)
    return logits.gather(1, slots[..., None].expand(-1, -1, logits.shape[-1]))


def _fast_logits(
    ctx: StageContext, layer_index: int, x: torch.Tensor, slots: torch.Tensor, head: Callable[[torch.Tensor], Any]
) -> torch.Tensor:
    """The proxy's logits at ``slots``, computed so that autograd's backward is cheap too.

    Only the keys need a projection over the whole sequence. The values enter as ``out = P V = W_v (P normed) + b_v``
    (softmax rows sum to 1), so the attention weights are applied to the normed hidden states first and ``v_proj``
    runs on ``n`` rows per head: the forward skips the ``S x d x d_kv`` value projection and the backward's value
    path is ``P^T (dO W_v)`` (``S x n H x d``) instead of ``S x d_kv x d``. Same function, same gradient.
    """
    adapter = ctx.adapter
    rotary = adapter.rotary_fn()
    layer = adapter.layers[layer_index]
    attn = transformers_compat.layer_attention_parts(layer)
    batch_size, seq_len, _ = x.shape
    num_q = slots.shape[1]
    head_dim = attn.head_dim

    normed = transformers_compat.layer_input_norm(layer)(x)  # (B, S, d)
    normed_q = normed.gather(1, slots[..., None].expand(-1, -1, normed.shape[-1]))  # (B, n, d)
    q, gate = adapter.attention_queries(attn.module, normed_q)  # (B, n, H, hd), (B, n, H hd) or None
    k = attn.k_proj(normed).view(batch_size, seq_len, -1, head_dim)
    if attn.q_norm is not None:  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    # Keys laid out head by head: a (S x hd) block per head makes the score products and their gradients plain
    # matrix products (on the strided (S, H, hd) view, q @ k^T took ~40x longer on CPU).
    q, k = q.transpose(1, 2), k.transpose(1, 2).contiguous()  # (B, H, n, hd), (B, H_kv, S, hd)

    cos, sin = ctx.layer_rotary(layer_index)[:2]
    batch_dim = adapter.rotary_batch_dim
    q, _ = rotary(q, q, gather_sequence(cos, slots, batch_dim), gather_sequence(sin, slots, batch_dim))
    _, k = rotary(k, k, cos, sin)

    num_heads, num_kv = q.shape[1], k.shape[1]
    group = num_heads // num_kv
    allowed = ctx.allowed_keys(layer_index, slots)  # (B, 1, n, S): causal, plus image blocks / windows (Gemma 3)
    # Grouped heads: the G query heads of a KV head share its keys, so (G n) query rows per KV head.
    scores = q.reshape(batch_size, num_kv, group * num_q, head_dim) @ k.transpose(-1, -2)  # (B, H_kv, G n, S)
    # The softmax in at least fp32 (as eager attention and SDPA's kernels do for half precision); fp64 stays fp64.
    scores = scores.view(batch_size, num_heads, num_q, seq_len).to(torch.promote_types(x.dtype, torch.float32))
    scores = scores * attn.scaling
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(x.dtype)  # (B, H, n, S)
    # One (H n) x S by S x d product per sample (no broadcast over heads: its backward would materialise H copies).
    mixed = probs.reshape(batch_size, num_heads * num_q, seq_len) @ normed  # (B, H n, d)
    mixed = mixed.view(batch_size, num_kv, group * num_q, -1)
    v_weight = attn.v_proj.weight.view(num_kv, head_dim, -1)  # (H_kv, hd, d)
    attn_out = mixed @ v_weight.transpose(-1, -2)  # (B, H_kv, G n, hd)
    if attn.v_proj.bias is not None:
        attn_out = attn_out + attn.v_proj.bias.view(num_kv, 1, head_dim)
    attn_out = attn_out.view(batch_size, num_heads, num_q, head_dim).transpose(1, 2).reshape(batch_size, num_q, -1)
    if gate is not None:  # gated attention (Qwen3.5): the output is scaled by sigmoid(gate) before o_proj
        attn_out = attn_out * torch.sigmoid(gate)
    attn_out = attn.o_proj(attn_out)  # (B, n, d)
    out = adapter.decoder_layer_output(layer, x.gather(1, slots[..., None].expand(-1, -1, x.shape[-1])), attn_out)
    return head(adapter.final_norm(out))  # (B, n, V)


# ------------------------------------------------------------------------------------------------ closed form
def _rms_norm_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's ``RMSNorm`` as transformers writes it, in ``promote_types(dtype, float32)``."""
    hidden = x.to(torch.promote_types(x.dtype, torch.float32))
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def rms_norm_parts(norm: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """``(weight, eps)`` if ``norm`` computes :func:`_rms_norm_formula` on inputs like ``like`` (same last size,
    dtype and device), checked bit for bit on a probe row; else ``None``.

    ``None`` for LayerNorms, Gemma's ``(1 + weight)``, norms with a bias, and fp64 inputs of the transformers norms,
    which compute in fp32 (a closed-form backward in fp64 would be more precise than the module and not equal it).
    """
    weight = getattr(norm, "weight", None)
    eps = transformers_compat.norm_epsilon(norm)
    size = like.shape[-1]
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (size,) or not isinstance(eps, float):
        return None
    if any(name != "weight" for name, _ in norm.named_parameters()):
        return None
    # The verdict is remembered per module and what it depends on (each probe costs a device sync on a GPU).
    key = (like.dtype, like.device, size, weight.dtype, weight.device, eps)
    verdicts = _NORM_VERDICTS.setdefault(norm, {})
    if key not in verdicts:
        # A non-zero mean and an uneven spread: tells RMSNorm from LayerNorm, and fp32 arithmetic from fp64.
        probe = torch.linspace(-1.0, 3.0, size, dtype=torch.float64, device=like.device).to(like.dtype)[None]
        with torch.no_grad():
            actual, expected = norm(probe), _rms_norm_formula(probe, weight, eps)
        verdicts[key] = actual.dtype == expected.dtype and torch.equal(actual, expected)
    return (weight, eps) if verdicts[key] else None


# norm module -> {(input dtype, device, size, weight dtype, weight device, eps): computes _rms_norm_formula}; weak.
_NORM_VERDICTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, bool]] = weakref.WeakKeyDictionary()


class _Norm:
    """A norm module applied to ``x`` (``(..., d)``), written ``output = weight * rstd * base``.

    Closed form (:func:`rms_norm_parts` recognises the module): ``base = x``, ``rstd`` the ``(..., 1)`` reciprocal
    RMS (in ``promote_types(dtype, float32)``), ``weight`` the module's; the input gradient, from ``g = rstd * weight
    * dL/d(output)``, is ``g - x rstd^2 mean(g x)``. Otherwise ``base`` is the module's output, ``rstd`` and
    ``weight`` are ``None`` (ones), and the input gradient is autograd through the module.
    """

    def __init__(self, module: torch.nn.Module, x: torch.Tensor) -> None:
        parts = rms_norm_parts(module, x)
        self.module = module
        self._graph: torch.Tensor | None = None
        if parts is not None:
            self.weight, eps = parts
            self.base = x.detach()
            with torch.no_grad():
                self.mean_square = _row_norms(self.base)[..., None].square_().div_(x.shape[-1])  # (..., 1)
                self.rstd: torch.Tensor | None = torch.rsqrt(self.mean_square + eps)
        else:
            self.weight = self.rstd = None
            self._input = x.detach().requires_grad_(True)
            self._graph = module(self._input)
            self.base = self._graph.detach()

    def scale_rows(self, t: torch.Tensor, window: slice = slice(None)) -> torch.Tensor:
        """``t * rstd`` for ``t`` shaped like the input (or its rows ``window``), multiplied in the compute dtype
        and rounded once to ``t``'s (a bf16 ``rstd`` would scale each row by its own rounding error)."""
        return t if self.rstd is None else (t * self.rstd[:, window]).to(t.dtype)

    def scale_columns(self, t: torch.Tensor) -> torch.Tensor:
        """``t * rstd^T`` for ``t`` ``(B, R, S)`` (its columns are input rows), as :meth:`scale_rows`."""
        return t if self.rstd is None else (t * self.rstd.transpose(-1, -2)).to(t.dtype)

    def fold_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``t * weight`` along the last axis."""
        return t if self.weight is None else t * self.weight

    def output(self) -> torch.Tensor:
        """The module's output (recomputed by the module itself in the closed form)."""
        if self._graph is not None:
            return self.base
        with torch.no_grad():
            return self.module(self.base)

    def backward(self, scaled_grad: torch.Tensor, window: slice = slice(None)) -> torch.Tensor:
        """Input gradient from ``scaled_grad = rstd * weight * dL/d(output)`` (just ``dL/d(output)`` without the
        closed form); in the closed form also for the input's rows ``window`` alone."""
        if self._graph is not None:
            (grad,) = torch.autograd.grad(self._graph, self._input, scaled_grad)
            return grad
        x, rstd = self.base[:, window], self.rstd[:, window]
        coefficient = (rstd.square() * self._mean_gx(scaled_grad, x)[..., None]).to(x.dtype)  # (..., 1)
        return torch.addcmul(scaled_grad, x, coefficient, value=-1)

    def gradient_norms(self, scaled_grad: torch.Tensor, dot: torch.Tensor | None = None) -> torch.Tensor:
        """L2 norms ``(...)`` of the input gradient's rows (closed form only), in the compute dtype, without the
        gradient: ``|g - c x|^2 = |g|^2 - 2 c (g x) + c^2 |x|^2`` with ``c = rstd^2 mean(g x)``. ``dot``: the rows'
        ``g . x`` where the caller has them (in the compute dtype), else computed here."""
        x, rstd = self.base, self.rstd[..., 0]
        mean_gx = self._mean_gx(scaled_grad, x) if dot is None else dot / x.shape[-1]
        coefficient = rstd.square() * mean_gx
        grad_square = _row_norms(scaled_grad).square_()
        size = x.shape[-1]
        square = grad_square - coefficient * size * (2 * mean_gx - coefficient * self.mean_square[..., 0])
        return square.clamp_(min=0).sqrt_()

    def _mean_gx(self, scaled_grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``mean(g x)`` over the last axis, in the compute dtype."""
        return torch.linalg.vecdot(scaled_grad, x, dim=-1).to(self.rstd.dtype).div_(x.shape[-1])


class _LinearHead(torch.autograd.Function):
    """``hidden @ weight^T`` for a few rows, with a constant ``weight`` ``(V, d)``, computed as ``(weight @
    hidden^T)^T``: with a handful of rows CPU GEMM streams the vocabulary matrix about twice as fast that way round."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        rows = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        return (weight @ rows.T).T.reshape(*hidden.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # (N, V)
        return _few_rows_times(rows, weight).view(*grad.shape[:-1], weight.shape[1]), None


_CPU_SPLIT_ROWS = 384


def _few_rows_times(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows @ weight`` for a few ``rows`` ``(N, V)`` and a tall ``weight`` ``(V, d)``: the LM head's backward.

    On the CPU, oneDNN streams the whole ``V x d`` matrix through its packing for such a product, about half the
    speed of the forward ``weight @ h^T``. Split over ``V`` into blocks of 384 rows multiplied as one batch (each
    block packed while it is in cache), the partial products summed in fp32 and rounded once: measured 6.8 against
    9.9 ms at 4 x 32064 x 1024 in bf16, no extra memory. In bf16 each block's product is rounded before the sum, so
    the result is within about twice the plain product's rounding of the exact one (tested), not bit-equal to it.
    """
    count, vocab = rows.shape
    blocks = vocab // _CPU_SPLIT_ROWS
    if rows.device.type != "cpu" or count > 16 or blocks < 4:
        return rows @ weight
    main = blocks * _CPU_SPLIT_ROWS
    split = rows[:, :main].reshape(count, blocks, _CPU_SPLIT_ROWS).transpose(0, 1)  # (blocks, N, 384)
    compute = torch.promote_types(rows.dtype, torch.float32)
    total = torch.bmm(split, weight[:main].view(blocks, _CPU_SPLIT_ROWS, -1)).sum(0, dtype=compute)  # (N, d)
    if main < vocab:
        total += rows[:, main:] @ weight[main:]
    return total.to(rows.dtype)


def _plain_head_weight(head: Callable[[torch.Tensor], Any]) -> torch.Tensor | None:
    """The ``(V, d)`` weight of a plain bias-free ``nn.Linear`` head (dense, materialised), else ``None``."""
    weight = getattr(head, "weight", None)
    if (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and type(weight) in (torch.Tensor, torch.nn.Parameter)
        and weight.device.type != "meta"
    ):
        return weight
    return None


def _output_head(head: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """``head`` itself, or :class:`_LinearHead` on its weight for a plain bias-free ``nn.Linear``."""
    weight = _plain_head_weight(head)
    if weight is not None:
        return lambda hidden: _LinearHead.apply(hidden, weight)
    return head


#: Vocabulary rows per block of :class:`_FusedHeadLoss` (2 MiB of fp32 weights: the block is still in cache when
#: it is read the second time).
_FUSED_HEAD_ROWS = 512


def _head_loss(head: Callable[[torch.Tensor], Any], hidden: torch.Tensor) -> torch.Tensor:
    """``_self_argmax_loss(head(hidden))`` for ``hidden`` ``(B, n, d)``: the proxy's loss after the final norm.

    For a plain bias-free ``nn.Linear`` fp32 head on the CPU and at most 16 rows, in one pass over the vocabulary
    matrix (:class:`_FusedHeadLoss`: 33 against 38.5 ms at 4 x 32064 x 1024 on the 2-core EPYC of
    ``docs/benchmarks.md`` section 7.5b); otherwise the head's logits and their cross-entropy. bf16 keeps the two
    passes (blockwise it was slower there: 27 against 23 ms); fp64 too (its softmax is the fp32 one of
    ``_self_argmax_loss`` bit for bit, which the fp64 tests compare to 1e-10)."""
    weight = _plain_head_weight(head)
    rows = hidden.shape[0] * hidden.shape[1]
    if (
        weight is None
        or hidden.device.type != "cpu"
        or weight.dtype != torch.float32
        or hidden.dtype != torch.float32
        or rows > 16
        or weight.shape[0] < 4 * _FUSED_HEAD_ROWS
    ):
        return _self_argmax_loss(_output_head(head)(hidden))
    return _FusedHeadLoss.apply(hidden, weight)


class _FusedHeadLoss(torch.autograd.Function):
    """:func:`_self_argmax_loss` of ``hidden @ weight^T`` (``hidden`` ``(B, n, d)``, a constant ``weight``
    ``(V, d)``) and its gradient, streaming the vocabulary matrix once instead of twice.

    The gradient of a row's cross-entropy against its own argmax ``a`` is ``(softmax(l) - e_a) W = (sum_v e^(l_v -
    m) W_v) / (sum_v e^(l_v - m)) - W_a``. Both sums are accumulated block by block over the vocabulary (an online
    softmax: each block's exponentials relative to the running maximum ``m``, the sums rescaled when it grows), so
    each block of ``W`` is read for its logits and, still in cache, for its share of ``softmax(l) W``. The argmax is
    the first maximal index (as ``argmax``); logits and exponentials in fp32 (as ``_self_argmax_loss``), the
    products in the weight's dtype, accumulated in fp32. Same FLOPs as the two passes; the gradient equals theirs to
    fp32 rounding (tested), not bit for bit.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        batch_size, num_rows, width = hidden.shape
        rows = hidden.reshape(-1, width)  # (N, d)
        count = rows.shape[0]
        compute = torch.float32
        running_max = torch.full((count,), float("-inf"), dtype=compute, device=rows.device)
        total = torch.zeros(count, dtype=compute, device=rows.device)
        weighted = torch.zeros(count, width, dtype=compute, device=rows.device)  # sum_v e^(l_v - m) W_v
        best = torch.full((count,), float("-inf"), dtype=compute, device=rows.device)
        label = torch.zeros(count, dtype=torch.long, device=rows.device)
        for start in range(0, weight.shape[0], _FUSED_HEAD_ROWS):
            block = weight[start : start + _FUSED_HEAD_ROWS]
            logits = (block @ rows.T).T.to(compute)  # (N, R), as _LinearHead computes them
            block_max, block_arg = logits.max(1)
            better = block_max > best  # strictly: the first maximal index wins, as argmax
            label = torch.where(better, block_arg + start, label)
            best = torch.where(better, block_max, best)
            new_max = torch.maximum(running_max, block_max)
            rescale = torch.exp(running_max - new_max)
            exponentials = torch.exp(logits - new_max[:, None])
            total = total * rescale + exponentials.sum(1)
            weighted.mul_(rescale[:, None])
            if weight.dtype == compute:
                weighted.addmm_(exponentials, block)
            else:
                weighted += (exponentials.to(weight.dtype) @ block).to(compute)
            running_max = new_max
        # loss per row: logsumexp - the argmax logit; a sum over samples of the mean over loss rows
        per_row = running_max + torch.log(total) - best
        loss = per_row.view(batch_size, num_rows).mean(1).sum()
        grad = (weighted / total[:, None] - weight[label].to(compute)) / num_rows
        ctx.save_for_backward(grad.to(hidden.dtype).view_as(hidden))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None


def _rotate(rotary: Callable[..., Any], t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The family's rotation of ``t`` ``(B m, H, hd)`` by tables ``(B, m, r)``, in ``t``'s layout: the function
    unsqueezes the tables at dim 1, so batch and sequence go flat in front of the heads (its second operand is left
    empty)."""
    rotated, _ = rotary(t, t[:, :0], cos.flatten(0, 1), sin.flatten(0, 1))
    return rotated


@functools.lru_cache(maxsize=64)
def _is_rotate_half(rotary: Callable[..., Any], head_dim: int, table_dim: int) -> bool:
    """Whether ``rotary`` is Llama's ``t cos + rotate_half(t) sin`` over the whole head (checked on a probe, once
    per function and sizes)."""
    if table_dim != head_dim or head_dim % 2:
        return False
    probe = torch.linspace(-1.0, 1.0, 2 * head_dim).view(2, 1, head_dim)  # (2, 1, hd)
    cos, sin = torch.linspace(0.1, 0.9, 2 * head_dim).view(1, 2, head_dim), torch.linspace(-0.7, 0.8, 2 * head_dim)
    sin = sin.view(1, 2, head_dim)
    return torch.allclose(_rotate(rotary, probe, cos, sin), _rotate_half(probe, cos, sin), rtol=1e-5, atol=1e-6)


def _rotate_half(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """:func:`_rotate` for Llama's rotation, in three passes over ``t`` (the function's own takes about five: it
    builds ``rotate_half(t)`` with a negation and a concatenation). Used where :func:`_is_rotate_half` holds.
    ``inverse``: the transposed rotation (by ``-sin``) without negating the table."""
    cos, sin = cos.flatten(0, 1)[:, None], sin.flatten(0, 1)[:, None]  # (B m, 1, hd)
    half = t.shape[-1] // 2
    sign = -1 if inverse else 1
    rotated = t * cos
    rotated[..., :half].addcmul_(t[..., half:], sin[..., :half], value=-sign)
    rotated[..., half:].addcmul_(t[..., :half], sin[..., half:], value=sign)
    return rotated


class _RowsTimes(torch.autograd.Function):
    """``rows @ small^T`` ``(B, S, R)`` for constant ``rows`` ``(B, S, c)``, differentiable in ``small`` ``(B, R, c)``.

    Written out because CPU ``bmm`` copies a transposed large operand (~60 ms for ``(B, c, S)`` at S = 3000, against
    under 1 ms for these layouts): the backward is ``grad^T @ rows``.
    """

    @staticmethod
    def forward(ctx: Any, small: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return rows @ small.transpose(1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rows,) = ctx.saved_tensors
        return grad.transpose(1, 2) @ rows, None


class _WeightedRows(torch.autograd.Function):
    """``weights @ rows`` ``(B, R, c)`` for constant ``rows`` ``(B, S, c)``, differentiable in ``weights``
    ``(B, R, S)``; the backward ``(rows @ grad^T)^T`` keeps ``rows`` in its layout (see :class:`_RowsTimes`).
    ``keep``: a dict that receives ``rows @ grad^T`` ``(B, S, R)`` under ``"rows_grad"`` (the closed form reuses it:
    one ``S x c x R`` pass fewer)."""

    @staticmethod
    def forward(
        ctx: Any, weights: torch.Tensor, rows: torch.Tensor, keep: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.keep = keep
        return weights @ rows

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rows,) = ctx.saved_tensors
        product = rows @ grad.transpose(1, 2)  # (B, S, R)
        if ctx.keep is not None:
            ctx.keep["rows_grad"] = product
        return product.transpose(1, 2), None, None


def _closed_form_gradient(
    ctx: StageContext,
    layer_index: int,
    x: torch.Tensor,
    window: slice,
    head: Callable[[torch.Tensor], Any],
    norms: bool = False,
) -> torch.Tensor | None:
    """The fast proxy's input gradient ``(B, S, d)`` (or its rows' L2 norms ``(B, S)`` with ``norms``): autograd on
    the loss rows only, the rest in closed form.

    Each row ``j`` reaches the loss through the layer's key ``k_j = R_j W_k n_j`` and value ``W_v n_j``, with
    ``n_j = w r_j x_j`` the input norm (``r_j`` its reciprocal RMS; an optional per-head key norm before ``R_j``); the
    loss rows (``window``) also through their queries and the residual. Autograd on the loss rows (queries, softmax,
    ``P n``, the output projection, MLP, final norm and head) gives ``dL/d(k q^T)`` and ``dL/d(P n)``; then, over all
    rows:

    * keys: ``dk = R^T dL/d(k q^T) q``, with ``R^T`` the family's rotation by ``-sin`` (RoPE rotates pairs);
    * ``g = r w (W_k^T dk + P^T dL/d(P n))``, plus the loss rows' query term;
    * ``dx = g - x r^2 mean(g x)`` (the RMSNorm backward), plus the loss rows' residual term; for the norms,
      ``|dx|^2`` from ``|g|^2``, ``g x`` and ``|x|^2`` without forming ``dx`` (:meth:`_Norm.gradient_norms`).

    ``r`` and ``w`` never touch an ``S x d`` tensor: ``w`` goes into ``W_k`` and ``dL/d(P n)``, ``r`` into the rotary
    tables and ``P``. The grouped queries enter as one block-diagonal ``(H n, H_kv hd)`` matrix, so keys keep the
    projection's ``(B, S, H_kv hd)`` layout both ways. ``None`` where the layer does not fit (rotary tables not
    ``(B, S, r)``): the caller then runs autograd through :func:`_fast_logits`.
    """
    adapter = ctx.adapter
    rotary = adapter.rotary_fn()
    cos, sin = ctx.layer_rotary(layer_index)[:2]
    if adapter.rotary_batch_dim != 0 or cos.dim() != 3:
        return None
    layer = adapter.layers[layer_index]
    attn = transformers_compat.layer_attention_parts(layer)
    input_norm = transformers_compat.layer_input_norm(layer)
    batch_size, seq_len, _ = x.shape
    head_dim, dtype = attn.head_dim, x.dtype
    num_q = window.stop - window.start
    cos, sin = cos.expand(batch_size, -1, -1), sin.expand(batch_size, -1, -1)  # (B, S, r)
    has_k_norm = attn.k_norm is not None

    with record_function("piofvlm.proxy.forward"):
        norm = _Norm(input_norm, x)
        with torch.no_grad():
            k_weight = norm.fold_weight(attn.k_proj.weight)  # (kv, d)
            keys = F.linear(norm.base, k_weight)  # (B, S, kv)
            # r_j scales row j: onto row j of k q^T (S x H n) when nothing comes between the projection and RoPE,
            # else onto the keys (a bias, a per-head key norm, GLM's partial rotation).
            full_rotation = cos.shape[-1] == head_dim
            fold = full_rotation and attn.k_proj.bias is None and not has_k_norm
            if not fold:
                keys = norm.scale_rows(keys)
                if attn.k_proj.bias is not None:
                    keys = keys + attn.k_proj.bias
        k_norm = _Norm(attn.k_norm, keys.view(batch_size, seq_len, -1, head_dim)) if has_k_norm else None
        with torch.no_grad():
            if k_norm is not None:
                keys = k_norm.output()
            if _is_rotate_half(rotary, head_dim, cos.shape[-1]):
                rotate_keys, rotate_back = _rotate_half, partial(_rotate_half, inverse=True)
            else:
                rotate_keys = partial(_rotate, rotary)

                def rotate_back(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
                    return _rotate(rotary, t, cos, -sin)

            keys = rotate_keys(keys.reshape(batch_size * seq_len, -1, head_dim), cos, sin)
            keys = keys.view(batch_size, seq_len, -1)  # (B, S, H_kv hd)
        num_kv = keys.shape[-1] // head_dim

        x_q = x.detach()[:, window].clone().requires_grad_(True)  # (B, n, d) the loss rows' residual path
        with torch.no_grad():
            normed_q = input_norm(x_q)
        normed_q.requires_grad_(True)  # their query path
        q, gate = adapter.attention_queries(attn.module, normed_q)  # (B, n, H, hd), (B, n, H hd) or None
        if attn.q_norm is not None:
            q = attn.q_norm(q)
        q = _rotate(rotary, q.flatten(0, 1), cos[:, window], sin[:, window])  # (B n, H, hd)
        num_heads = q.shape[1]
        group = num_heads // num_kv
        # Row (h, g, i) of the block-diagonal queries: head h G + g at loss position i, in key head h's columns.
        q = q.view(batch_size, num_q, num_kv, group, head_dim).permute(0, 2, 3, 1, 4)  # (B, H_kv, G, n, hd)
        eye = torch.eye(num_kv, dtype=dtype, device=x.device)
        q_blocks = (q[:, :, :, :, None, :] * eye[:, None, None, :, None]).reshape(batch_size, num_heads * num_q, -1)
        raw_products = _RowsTimes.apply(q_blocks, keys)  # (B, S, H n): k_j . q, without r_j when folded
        compute = torch.promote_types(dtype, torch.float32)
        products = raw_products.to(compute) * norm.rstd if fold and norm.rstd is not None else raw_products
        slots = torch.arange(window.start, window.stop, device=x.device)[None].expand(batch_size, -1)  # (B, n)
        allowed = ctx.allowed_keys(layer_index, slots)  # (B, 1, n, S): causal, plus image blocks / windows (Gemma 3)
        scores = products.transpose(1, 2).view(batch_size, num_heads, num_q, seq_len)
        scores = scores.to(compute) * attn.scaling
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(dtype)  # (B, H, n, S)
        # P n = ((P r) x) w: the row and column factors on the small operands.
        probs_scaled = norm.scale_columns(probs.reshape(batch_size, num_heads * num_q, seq_len))  # (B, H n, S)
        kept_products: dict[str, torch.Tensor] = {}  # the backward's x_j . dL/d(P n)_i, reused below
        mixed = norm.fold_weight(_WeightedRows.apply(probs_scaled, norm.base, kept_products))  # (B, H n, d)
        v_weight = attn.v_proj.weight.view(num_kv, head_dim, -1)  # (H_kv, hd, d)
        attn_out = mixed.view(batch_size, num_kv, group * num_q, -1) @ v_weight.transpose(-1, -2)  # (B,H_kv,G n,hd)
        if attn.v_proj.bias is not None:
            attn_out = attn_out + attn.v_proj.bias.view(num_kv, 1, head_dim)
        attn_out = attn_out.view(batch_size, num_heads, num_q, head_dim).transpose(1, 2).reshape(batch_size, num_q, -1)
        if gate is not None:  # gated attention (Qwen3.5): the output is scaled by sigmoid(gate) before o_proj
            attn_out = attn_out * torch.sigmoid(gate)
        attn_out = attn.o_proj(attn_out)  # (B, n, d)
        out = adapter.decoder_layer_output(layer, x_q, attn_out)
        loss = _head_loss(head, adapter.final_norm(out))

    with record_function("piofvlm.proxy.backward"):
        # d_raw: dL/d(k q^T), with r_j already in row j when folded (autograd through the row scaling)
        d_raw, d_mixed, d_normed_q, d_x_q = torch.autograd.grad(loss, (raw_products, mixed, normed_q, x_q))
        with torch.no_grad():
            d_keys = d_raw @ q_blocks.detach()  # (B, S, H_kv hd), in rotated coordinates
            # r R^T: r is in d_raw when folded, else into the tables where they cover the whole head and no key norm
            # comes between (a bias), else on the (S, kv) gradient
            tables = not fold and full_rotation and k_norm is None
            cos_k, sin_k = (norm.scale_rows(cos), norm.scale_rows(sin)) if tables else (cos, sin)
            d_keys = rotate_back(d_keys.view(batch_size * seq_len, -1, head_dim), cos_k, sin_k)
            if k_norm is not None:
                d_keys = d_keys.view(batch_size, seq_len, -1, head_dim)
                d_keys = k_norm.backward(k_norm.scale_rows(k_norm.fold_weight(d_keys)))
            if not fold and not tables:
                d_keys = norm.scale_rows(d_keys.reshape(batch_size, seq_len, -1))
            d_mixed = norm.fold_weight(d_mixed)  # (B, H n, d): w dL/d(P n)
            scaled = d_keys.view(batch_size, seq_len, -1) @ k_weight  # (B, S, d): r w W_k^T dk
            probs_rows = probs_scaled.transpose(1, 2)  # (B, S, H n)
            scaled.baddbmm_(probs_rows, d_mixed)  # + r w P^T dL/d(P n)
            if norms and fold and norm.rstd is not None:
                # g_j . x_j without an S x d pass: (r R^T W_k^T dk_j) . (w x_j) = dL/d(k q^T)_j . (k q^T)_j (the
                # rotation is orthogonal), and (P^T D)_j . x_j = P_j . (x_j D^T) with D^T only H n columns wide.
                # (B, S, H n): x_j . D_i, D = w dL/d(P n): computed by the backward of P n already (its incoming
                # gradient is dL/d(P n) w, the same product)
                value_dot = kept_products.get("rows_grad")
                if value_dot is None:
                    value_dot = _RowsTimes.apply(d_mixed, norm.base)
                dot = torch.linalg.vecdot(d_raw.to(compute), raw_products.detach().to(compute))
                dot += torch.linalg.vecdot(probs_rows.to(compute), value_dot.to(compute))
            else:
                dot = None
            scaled[:, window] += norm.fold_weight(norm.scale_rows(d_normed_q, window))
            if not norms or norm.rstd is None:
                grad = norm.backward(scaled)
                grad[:, window] += d_x_q
                return _row_norms(grad) if norms else grad
            result = norm.gradient_norms(scaled, dot)  # (B, S)
            result[:, window] = _row_norms(norm.backward(scaled[:, window], window) + d_x_q)  # + the residual term
            return result


_CPU_UPCAST_ELEMENTS = 1 << 17


def _row_norms(t: torch.Tensor) -> torch.Tensor:
    """``(...)`` L2 norms of the rows (last axis) of ``t``, accumulated in at least fp32 (fp64 stays fp64).

    A half-precision ``t`` is upcast for the reduction. On the CPU that runs a block of rows at a time (512 KiB of
    fp32), so the upcast copy stays in cache: about half the time of one whole-tensor upcast at S x d = 3000 x 1024.
    """
    compute = torch.promote_types(t.dtype, torch.float32)
    width = t.shape[-1]
    if t.dtype == compute or t.device.type != "cpu" or t.numel() <= 2 * _CPU_UPCAST_ELEMENTS or width == 0:
        return torch.linalg.vector_norm(t, dim=-1, dtype=compute)
    rows = t.reshape(-1, width)
    step = max(1, _CPU_UPCAST_ELEMENTS // width)
    result = torch.empty(rows.shape[0], dtype=compute, device=t.device)
    for start in range(0, rows.shape[0], step):
        result[start : start + step] = torch.linalg.vector_norm(rows[start : start + step], dim=-1, dtype=compute)
    return result.view(t.shape[:-1])


def _fast_mixer_logits(
    ctx: StageContext, layer_index: int, x: torch.Tensor, slots: torch.Tensor, head: Callable[[torch.Tensor], Any]
) -> torch.Tensor:
    """The proxy's logits at ``slots`` for a layer whose token mixer is not attention (a linear-attention layer).

    Its recurrence carries every earlier token, so the mixer runs over the whole sequence (as in the reference
    path); the residual, MLP, final norm and LM head, all per token, run at the loss positions only. Exact.
    """
    adapter = ctx.adapter
    layer = adapter.layers[layer_index]
    normed = transformers_compat.layer_input_norm(layer)(x)
    mixed = adapter.token_mixer(layer_index, normed, ctx.layer_mask(layer_index))  # (B, S, d)
    index = slots[..., None].expand(-1, -1, x.shape[-1])
    out = adapter.decoder_layer_output(layer, x.gather(1, index), mixed.gather(1, index))  # (B, n, d)
    return head(adapter.final_norm(out))  # (B, n, V)


def proxy_gradient(
    ctx: StageContext,
    layer_index: int,
    num_positions: int = 4,
    include_last: bool = False,
    fast: bool = True,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    closed_form: bool = True,
) -> torch.Tensor:
    """Gradient of the proxy loss with respect to (a detached copy of) ``ctx.hidden_states``.

    Works inside ``torch.no_grad()`` and ``torch.inference_mode()``: inputs are cloned into ordinary tensors and the
    graph is built under ``inference_mode(False)`` + ``enable_grad()``. No parameter ``.grad`` is written.

    Args:
        ctx: the stage context.
        layer_index: decoder layer used as the proxy.
        num_positions: number of loss positions.
        include_last: end the loss window at the last prompt token instead of the one before it.
        fast: use the exact fast path (falls back to the reference path if the family has no rotary function).
        head: the output head applied after the final norm; ``None``: the model's LM head.
        closed_form: on the fast path, the closed-form gradient where the layer fits it
            (:func:`_closed_form_gradient`); False: autograd through the whole fast forward (same gradient).

    Returns:
        ``(B, S, d)`` gradient in the hidden-state dtype.
    """
    return _proxy(ctx, layer_index, num_positions, include_last, fast, head, closed_form, norms=False)


def proxy_gradient_norms(
    ctx: StageContext,
    layer_index: int,
    num_positions: int = 4,
    include_last: bool = False,
    fast: bool = True,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    closed_form: bool = True,
) -> torch.Tensor:
    """``(B, S)`` L2 norm of each row of :func:`proxy_gradient` (same arguments), accumulated in at least fp32 (fp64
    stays fp64). The closed form computes them without forming the gradient."""
    return _proxy(ctx, layer_index, num_positions, include_last, fast, head, closed_form, norms=True)


def _proxy(
    ctx: StageContext,
    layer_index: int,
    num_positions: int,
    include_last: bool,
    fast: bool,
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    closed_form: bool,
    norms: bool,
) -> torch.Tensor:
    slots = loss_positions(ctx.valid, num_positions, include_last)
    use_fast = fast and ctx.adapter.rotary_fn() is not None
    with torch.inference_mode(False), torch.enable_grad():
        x = ctx.hidden_states.detach()
        if x.is_inference():  # an inference tensor cannot enter autograd; an ordinary one needs no copy
            x = x.clone()
        local = _cloned_context(ctx)
        head = head or ctx.adapter.lm_head
        attention_layer = ctx.adapter.is_attention_layer(layer_index)
        if use_fast and closed_form and attention_layer:
            window = _loss_window(x.shape[1], num_positions, include_last)  # the columns of ``slots``
            result = _closed_form_gradient(local, layer_index, x, window, head, norms=norms)
            if result is not None:
                return result
        x.requires_grad_(True)
        if not use_fast:
            logits_fn = _reference_logits
        elif attention_layer:
            logits_fn = _fast_logits
        else:
            logits_fn = _fast_mixer_logits
        # Profiler labels (no cost unless a torch.profiler session is active): the benchmark splits the overhead.
        with record_function("piofvlm.proxy.forward"):
            loss = _self_argmax_loss(logits_fn(local, layer_index, x, slots.clone(), head))
        with record_function("piofvlm.proxy.backward"):
            (grad,) = torch.autograd.grad(loss, x)
    return _row_norms(grad) if norms else grad


def _cloned_context(ctx: StageContext) -> StageContext:
    """Copies of the context tensors the graph saves, so inference tensors never enter autograd."""

    def clone(value):
        return value.clone() if isinstance(value, torch.Tensor) else value

    return StageContext(
        stage=ctx.stage,
        layer=ctx.layer,
        hidden_states=ctx.hidden_states,
        valid=ctx.valid.clone(),
        groups=ctx.groups,
        visual_index=ctx.visual_index,
        budgets=ctx.budgets,
        attention_mask=clone(ctx.attention_mask),
        position_embeddings=tuple(clone(t) for t in ctx.position_embeddings),
        position_ids=clone(ctx.position_ids),
        sample_keys=ctx.sample_keys,
        adapter=ctx.adapter,
        model=ctx.model,
        masks={kind: clone(mask) for kind, mask in ctx.masks.items()},
        rotary={kind: tuple(clone(t) for t in tables) for kind, tables in ctx.rotary.items()},
        key_mask=ctx.key_mask,
        layer_inputs={name: clone(value) for name, value in ctx.layer_inputs.items()},
    )
