"""Explicit attention of one decoder layer, computed from that layer's own queries and keys.

Attention-based methods (FastV, PyramidDrop, SparseVLM, DART's key norms) need a few rows of one layer's attention
map. Asking the model for ``output_attentions`` would force eager attention on every layer; instead we recompute the
one layer's projections (input norm, q/k projections, optional per-head q/k norms, the family's RoPE) from the hidden
states entering it. The result does not depend on the attention implementation the model runs with.

Under tensor parallelism (``DistributedConfig(tp_plan="auto")``) ``q_proj`` / ``k_proj`` are column-sharded and
each rank computes only its own heads; :func:`_all_heads` gathers every head over the tensor-parallel group, so every
rank scores with all heads, as one process does (``docs/scaling.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from piofvlm import transformers_compat
from piofvlm.adapters.base import ModelAdapter
from piofvlm.core.ops import gather_sequence


def _all_heads(adapter: ModelAdapter, states: torch.Tensor, proj: torch.nn.Module, kind: str) -> torch.Tensor:
    """``states`` ``(B, n, h, hd)`` with every head of the layer: as they are in one process; under tensor parallelism
    (``proj.weight`` a DTensor sharded by rows, this rank's ``h`` heads) gathered over the tensor-parallel group.

    Raises:
        ValueError: a sharding that does not give each rank whole heads, evenly (naming tensor parallelism).
    """
    if not torch.distributed.is_available():
        return states
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(states, DTensor):
        return states.full_tensor()
    weight = getattr(proj, "weight", None)
    if not isinstance(weight, DTensor):
        return states
    config = adapter.text_config
    total = config.num_attention_heads if kind == "query" else getattr(config, "num_key_value_heads", None)
    total = total or config.num_attention_heads
    mesh = weight.device_mesh
    if states.shape[2] == total and weight.placements == (Shard(0),) and weight.to_local().shape == weight.shape:
        return states  # not actually split (a mesh of one)
    if mesh.ndim != 1 or weight.placements != (Shard(0),) or states.shape[2] * mesh.size() != total:
        raise ValueError(
            f"explicit attention scores under tensor parallelism need each rank to hold whole {kind} heads of "
            f"{type(proj).__name__} (row-sharded evenly over a 1-D mesh); got {states.shape[2]} of {total} heads on "
            f"this rank, placements {weight.placements}, mesh {tuple(mesh.shape)}: load the model without tp_plan "
            "or use a method that does not read attention (pio, divprune, cdpruner, random, pool, visionzip, vscan)"
        )
    return DTensor.from_local(states.contiguous(), mesh, [Shard(2)], run_check=False).full_tensor()


def _rotary(adapter: ModelAdapter, reason: str):
    rotary = adapter.rotary_fn()
    if rotary is None:
        raise ValueError(
            f"{reason} needs the model family's rotary function (adapter.rotary_fn()), which "
            f"{type(adapter).__name__} does not provide for text model type {adapter.text_config.model_type!r}"
        )
    return rotary


def layer_keys(
    adapter: ModelAdapter,
    layer_index: int,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Keys of decoder layer ``layer_index``: ``(B, H_kv, S, hd)``, rotated by RoPE if ``position_embeddings``."""
    adapter.check_attention_map(layer_index, "key states")
    layer = adapter.layers[layer_index]
    attn = transformers_compat.layer_attention_parts(layer)
    batch_size, seq_len, _ = hidden.shape
    normed = transformers_compat.layer_input_norm(layer)(hidden)
    k = _all_heads(adapter, attn.k_proj(normed).view(batch_size, seq_len, -1, attn.head_dim), attn.k_proj, "key")
    if attn.k_norm is not None:  # Qwen3-style per-head norms
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    if position_embeddings is not None:
        _, k = _rotary(adapter, "key states")(k, k, position_embeddings[0], position_embeddings[1])
    return k


def layer_attention(
    adapter: ModelAdapter,
    layer_index: int,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, ...],
    valid: torch.Tensor,
    query_slots: torch.Tensor,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention of decoder layer ``layer_index`` for the given query slots, in fp32.

    Args:
        adapter: the model family's adapter.
        layer_index: decoder layer whose ``self_attn`` projections are used.
        hidden: ``(B, S, d)`` hidden states entering that layer.
        position_embeddings: ``(cos, sin)`` of the current layout.
        valid: ``(B, S)`` bool, real tokens (padding keys are masked out).
        query_slots: ``(B, n)`` long, slots whose attention rows are wanted.
        allowed: ``(B, 1, n, S)`` bool keys each query sees (``StageContext.allowed_keys``); None: causal.

    Returns:
        ``(B, H, n, S)`` attention probabilities (rows sum to 1 over the allowed keys).
    """
    adapter.check_attention_map(layer_index, "explicit attention scores")
    rotary = _rotary(adapter, "explicit attention scores")
    layer = adapter.layers[layer_index]
    attn = transformers_compat.layer_attention_parts(layer)
    batch_size, seq_len, _ = hidden.shape
    normed = transformers_compat.layer_input_norm(layer)(hidden)
    normed_q = normed.gather(1, query_slots[..., None].expand(-1, -1, normed.shape[-1]))  # (B, n, d)
    q, _ = adapter.attention_queries(attn.module, normed_q)  # (B, n, H, hd); an output gate does not change the map
    q = _all_heads(adapter, q, attn.q_proj, "query")
    if attn.q_norm is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)  # (B, H, n, hd)
    batch_dim = adapter.rotary_batch_dim  # cos/sin tables (Qwen: already (B, S, hd))
    cos_q = gather_sequence(position_embeddings[0], query_slots, batch_dim)
    sin_q = gather_sequence(position_embeddings[1], query_slots, batch_dim)
    q, _ = rotary(q, q, cos_q, sin_q)
    k = layer_keys(adapter, layer_index, hidden, position_embeddings)  # (B, H_kv, S, hd)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling  # (B, H, n, S)
    if allowed is None:
        key_index = torch.arange(seq_len, device=hidden.device)
        allowed = valid[:, None, None, :] & (key_index[None, None, None, :] <= query_slots[:, None, :, None])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def attention_received(
    adapter: ModelAdapter,
    layer_index: int,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, ...],
    valid: torch.Tensor,
    query: str,
    chunk: int = 256,
    key_mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(B, S)`` attention each slot receives, averaged over heads, from the last query or from every query.

    Args:
        query: ``"last"``: the last prompt token's row; ``"mean"``: the mean over every real query row (rows that
            cannot see a key contribute 0 to it, as in an eager attention map).
        chunk: query rows per step for ``"mean"`` (bounds memory to ``B * H * chunk * S``).
        key_mask: ``query_slots (B, n) -> (B, 1, n, S)`` bool keys those queries see; None: causal.
    """
    batch_size, seq_len = valid.shape
    if query == "last":
        slots = torch.full((batch_size, 1), seq_len - 1, dtype=torch.long, device=valid.device)
        allowed = None if key_mask is None else key_mask(slots)
        probs = layer_attention(adapter, layer_index, hidden, position_embeddings, valid, slots, allowed)
        return probs[:, :, 0].mean(1)
    total = torch.zeros(batch_size, seq_len, dtype=torch.float32, device=valid.device)
    for start in range(0, seq_len, chunk):
        slots = torch.arange(start, min(start + chunk, seq_len), device=valid.device)[None].expand(batch_size, -1)
        allowed = None if key_mask is None else key_mask(slots)
        probs = layer_attention(adapter, layer_index, hidden, position_embeddings, valid, slots, allowed).mean(1)
        probs = torch.nan_to_num(probs) * valid.gather(1, slots)[..., None]  # padding query rows are empty
        total += probs.sum(1)
    return total / valid.sum(1, keepdim=True).clamp(min=1)
