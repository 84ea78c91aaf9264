"""PIO-FVLM's layer-local proxy loss and its gradient with respect to the hidden states at the prune point.

Proxy = one decoder layer, the final norm and the LM head; loss = cross-entropy of the logits at a few prompt
positions against their own argmax (no ground truth). Two exact implementations:

* reference: the decoder layer's own forward on the whole sequence, logits everywhere, then the loss positions;
* fast: the loss depends on the layer's outputs at the loss positions only, so queries, the MLP and the LM head are
  computed there alone (keys and values over the prefix). Same loss, same gradient, a fraction of the cost. A
  linear-attention proxy layer (hybrid stacks) runs its token mixer over the whole sequence, the rest at the loss
  positions only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from piofvlm import transformers_compat
from piofvlm.core.context import StageContext
from piofvlm.core.ops import gather_sequence


def loss_positions(valid: torch.Tensor, num_positions: int, include_last: bool) -> torch.Tensor:
    """Slots whose logits enter the loss: ``(B, n)``.

    Default (authors'): the ``n`` prompt positions before the last one, i.e. the last ``n`` rows of the
    training-style shifted logits. With ``include_last`` the window ends at the last prompt token.
    Sequences are left-padded, so the same slots are the last real tokens of every sample.
    """
    batch_size, seq_len = valid.shape
    end = seq_len if include_last else seq_len - 1
    start = end - num_positions
    if start < 0 or not bool(valid[:, start:end].all()):
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
    out = layer(
        x,
        attention_mask=ctx.layer_mask(layer_index),
        position_embeddings=ctx.layer_rotary(layer_index),
        position_ids=adapter.layer_position_ids(ctx.position_ids),
        **transformers_compat.without_cache(layer),
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
    attn = layer.self_attn
    batch_size, seq_len, _ = x.shape
    num_q = slots.shape[1]
    head_dim = attn.head_dim

    normed = layer.input_layernorm(x)  # (B, S, d)
    normed_q = normed.gather(1, slots[..., None].expand(-1, -1, normed.shape[-1]))  # (B, n, d)
    q, gate = adapter.attention_queries(attn, normed_q)  # (B, n, H, hd), (B, n, H hd) or None
    k = attn.k_proj(normed).view(batch_size, seq_len, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
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


def _fast_mixer_logits(
    ctx: StageContext, layer_index: int, x: torch.Tensor, slots: torch.Tensor, head: Callable[[torch.Tensor], Any]
) -> torch.Tensor:
    """The proxy's logits at ``slots`` for a layer whose token mixer is not attention (a linear-attention layer).

    Its recurrence carries every earlier token, so the mixer runs over the whole sequence (as in the reference
    path); the residual, MLP, final norm and LM head, all per token, run at the loss positions only. Exact.
    """
    adapter = ctx.adapter
    layer = adapter.layers[layer_index]
    mixed = adapter.token_mixer(layer_index, layer.input_layernorm(x), ctx.layer_mask(layer_index))  # (B, S, d)
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

    Returns:
        ``(B, S, d)`` gradient in the hidden-state dtype.
    """
    slots = loss_positions(ctx.valid, num_positions, include_last)
    use_fast = fast and ctx.adapter.rotary_fn() is not None
    with torch.inference_mode(False), torch.enable_grad():
        x = ctx.hidden_states.detach()
        if x.is_inference():  # an inference tensor cannot enter autograd; an ordinary one needs no copy
            x = x.clone()
        x.requires_grad_(True)
        local = _cloned_context(ctx)
        if not use_fast:
            logits_fn = _reference_logits
        elif ctx.adapter.is_attention_layer(layer_index):
            logits_fn = _fast_logits
        else:
            logits_fn = _fast_mixer_logits
        # Profiler labels (no cost unless a torch.profiler session is active): the benchmark splits the overhead.
        with record_function("piofvlm.proxy.forward"):
            loss = _self_argmax_loss(logits_fn(local, layer_index, x, slots.clone(), head or ctx.adapter.lm_head))
        with record_function("piofvlm.proxy.backward"):
            (grad,) = torch.autograd.grad(loss, x)
    return grad


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
    )
