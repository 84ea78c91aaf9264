"""FLOPs two ways, and KV-cache bytes read off a real cache object.

* :func:`prefill_flops` / :func:`decode_flops`: the matmuls the language model actually runs, counted as 2 FLOPs per
  multiply-add: q/k/v/o projections (with grouped KV heads), attention scores and weighted sum over the dense
  ``n_q x n_k`` block (what masked kernels compute; causal kernels on an unpadded prompt may skip up to half of it),
  SwiGLU's three projections and the LM head at the positions whose logits are computed. Per-layer lengths come from
  the run's own KV cache, so they are the lengths that really ran.
* :func:`paper_flops`: the FastV-style formula the paper's efficiency table uses (spec B.2): per layer
  ``4 n d^2 + 2 n^2 d + 2 n d m`` multiply-adds, with ``n`` = *visual* tokens only and one FFN term.
* :func:`pio_proxy_flops`: PIO's proxy forward + input-gradient backward per stage (tested against the count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from piofvlm.core.cache import cache_padding


@dataclass(frozen=True)
class TextShape:
    """Language-model dimensions that set the FLOPs."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_layers: int

    @classmethod
    def from_config(cls, config: Any) -> TextShape:
        """From a text config (``model.config.text_config``)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            num_layers=config.num_hidden_layers,
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def linear_flops(shape: TextShape, n_q: int, n_kv_tokens: int | None = None) -> int:
    """Projections and MLP of one decoder layer: queries/outputs/MLP on ``n_q`` tokens, keys/values on
    ``n_kv_tokens`` new tokens (default ``n_q``)."""
    d, n_new = shape.hidden_size, n_q if n_kv_tokens is None else n_kv_tokens
    qo = 2 * n_q * d * shape.q_dim * 2
    kv = 2 * n_new * d * shape.kv_dim * 2
    mlp = 3 * 2 * n_q * d * shape.intermediate_size
    return qo + kv + mlp


def attention_flops(shape: TextShape, n_q: int, n_k: int) -> int:
    """Scores ``Q K^T`` and weighted sum ``P V``, dense ``n_q x n_k`` per head."""
    return 2 * 2 * n_q * n_k * shape.q_dim


def layer_flops(shape: TextShape, n_q: int, n_k: int) -> int:
    return linear_flops(shape, n_q) + attention_flops(shape, n_q, n_k)


def lm_head_flops(shape: TextShape, positions: int) -> int:
    return 2 * positions * shape.hidden_size * shape.vocab_size


def prefill_flops(shape: TextShape, layer_lengths: list[int], logits_positions: int = 1, causal: bool = False) -> int:
    """Prefill of a prompt whose layer ``l`` ran on ``layer_lengths[l]`` tokens (read off the KV cache).

    ``causal``: count only the query-key pairs a causal kernel must compute (``n (n + 1) / 2`` instead of ``n^2``).
    """
    total = lm_head_flops(shape, logits_positions)
    for n in layer_lengths:
        pairs = n * (n + 1) // 2 if causal else n * n
        total += linear_flops(shape, n) + 2 * 2 * pairs * shape.q_dim
    return total


def decode_flops(shape: TextShape, layer_lengths: list[int], steps: int) -> int:
    """``steps`` single-token decode forwards after a prefill with ``layer_lengths`` cached tokens per layer."""
    total = 0
    for step in range(steps):
        total += sum(layer_flops(shape, 1, n + step + 1) for n in layer_lengths) + lm_head_flops(shape, 1)
    return total


def pio_proxy_flops(
    shape: TextShape, seq_len: int, positions: int, candidates: int, kept: int, fast: bool = True
) -> dict[str, int]:
    """One PIO stage's proxy on ``seq_len`` tokens: ``{"forward", "backward", "nms"}`` FLOPs.

    Fast path (``methods/pio/proxy_loss.py``, its closed form): keys over the sequence; queries, scores (block-diagonal
    queries against all key heads), the attention weights applied to the normed hidden states (``P normed``, then
    ``v_proj`` on those rows), output projection, MLP and LM head at the ``positions`` loss slots. Reference path: the
    full layer and the LM head everywhere. The backward computes input gradients only (no weight gradients): each
    product costs its forward again, twice where both operands need a gradient (scores, ``P normed``; attention twice
    its forward in the reference path); the rows' ``g . x`` reuse the backward's ``x (w dL/d(P n))^T`` (no product
    of their own since branch ``i25e``). NMS: the cosine-similarity matrix over the first prefix the NMS always
    compares (``min(candidates, max(2 kept, 64))`` tokens), a lower bound: the prefix grows when suppression leaves
    fewer than ``kept`` tokens (its fixed-point rounds are matrix-vector products, not counted).
    """
    d = shape.hidden_size
    prefix = min(candidates, max(2 * kept, 64))
    nms = 2 * prefix * prefix * d
    if not fast:
        linear = linear_flops(shape, seq_len) + lm_head_flops(shape, seq_len)
        attention = attention_flops(shape, seq_len, seq_len)
        return {"forward": linear + attention, "backward": linear + 2 * attention, "nms": nms}
    n = positions
    keys = 2 * seq_len * d * shape.kv_dim
    # The closed form multiplies the keys by block-diagonal queries ((H n) x (H_kv hd)): H_kv times the per-head count.
    scores = 2 * n * seq_len * shape.num_heads * shape.kv_dim
    mixed = 2 * shape.num_heads * n * seq_len * d
    small = 2 * n * d * shape.q_dim * 3 + 3 * 2 * n * d * shape.intermediate_size + lm_head_flops(shape, n)  # q, v, o
    forward = keys + scores + mixed + small
    # the rows' g . x take x (w dL/d(P n))^T from the backward of P normed: no product of their own
    return {"forward": forward, "backward": forward + scores + mixed, "nms": nms}


def paper_layer_macs(shape: TextShape, n_visual: float) -> float:
    """The paper's per-layer cost (multiply-adds) of ``n_visual`` visual tokens: ``4nd^2 + 2n^2d + 2ndm``."""
    d, m = shape.hidden_size, shape.intermediate_size
    return 4 * n_visual * d * d + 2 * n_visual * n_visual * d + 2 * n_visual * d * m


def paper_flops(
    shape: TextShape, num_visual: int, stages: list[tuple[int, int]], num_layers: int, proxy_layers: bool = False
) -> float:
    """The paper's formula summed over ``num_layers`` layers.

    Args:
        num_visual: visual tokens before any stage.
        stages: ``(layer, kept)`` per stage: layers ``>= layer`` see ``kept`` visual tokens.
        proxy_layers: add one layer forward on the pre-prune count per stage (the authors' ``extra_fwd_flops_est``,
            the reading that reproduces their 0.45 T for LLaVA-1.5).
    """
    total = 0.0
    for layer in range(num_layers):
        n = num_visual
        for start, kept in stages:
            if layer >= start:
                n = kept
        total += paper_layer_macs(shape, n)
    if proxy_layers:
        before = num_visual
        for _, kept in stages:
            total += paper_layer_macs(shape, before)
            before = kept
    return total


def cache_layer_lengths(cache: Any, computed: bool = False) -> list[int]:
    """Tokens held by each layer of a ``DynamicCache``-like object; with ``computed``, those its prefill computed:
    without the masked slots the mechanism pads the cache-length layer with after a prune before it
    (:func:`piofvlm.core.cache.cache_padding`)."""
    lengths = [int(layer.keys.shape[-2]) for layer in cache.layers]
    if computed:
        padding = cache_padding(cache)
        lengths = [length - padding.get(index, 0) for index, length in enumerate(lengths)]
    return lengths


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of keys and values held by a ``DynamicCache``-like object (every layer, as allocated)."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
