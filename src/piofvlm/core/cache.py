"""The only code that knows how a pruned KV cache is laid out: per-layer segments of kept prompt slots, dynamic and
static caches, the masks (and, under ``positions="renumber"``, positions) of decoding, and the padding of the layer
transformers reads the cache length from.

A dynamic cache carries its layout (:class:`_CacheLayout` on the cache object), so it decodes correctly whichever
handle, prompt or thread comes next; a static cache is decoded with the layout of its thread's last prefill.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.core.masks import causal_padding_mask
from piofvlm.core.threads import PerThread

if TYPE_CHECKING:
    from piofvlm.adapters.base import ModelAdapter
    from piofvlm.core.prefill import _Call
    from piofvlm.methods.base import TokenPruner

logger = logging.getLogger(__name__)


@dataclass
class _Segment:
    """Layers ``first_layer ..`` share one KV-cache layout after the prefill."""

    first_layer: int
    valid: torch.Tensor  # (B, S_seg) bool, real tokens of the cached prefill
    shift: torch.Tensor  # (B,) dropped tokens before this segment (renumber mode)


@dataclass
class _CacheLayout:
    """How a pruned dynamic KV cache is laid out: stored on the cache object itself (attribute :data:`_LAYOUT_ATTR`),
    so a cache continued later (a second turn, after other prompts, under another handle) is decoded with its own
    layout. Static caches keep the layout of their thread's last prefill (compiled decoding reads it)."""

    segments: list[_Segment]
    batch_size: int
    renumber: bool
    padding: dict[int, int] = field(default_factory=dict)  # layer -> masked slots added after the prefill
    model_id: int | None = None  # id() of the model whose hooks pruned it (see _PrunedDynamicCache)
    _plan: tuple[tuple[int, str] | None, ...] | None = field(default=None, repr=False, compare=False)
    _unpadded: dict[int, bool] = field(default_factory=dict, repr=False, compare=False)
    #: Static caches: per (segment, buffer length, device, dtype), the step-independent parts of the decode mask
    #: (:func:`_static_mask_parts`), built at the first decode step instead of at every step.
    _static_parts: dict[tuple[Any, ...], _StaticMaskParts] = field(default_factory=dict, repr=False, compare=False)

    def static_mask_parts(
        self, segment_id: int, length: int, device: torch.device, dtype: torch.dtype | None
    ) -> _StaticMaskParts:
        """:func:`_static_mask_parts` of a segment, kept on the layout (computed afresh inside compiled code, which
        must not write Python state)."""
        if torch.compiler.is_compiling():
            return _static_mask_parts(self.segments[segment_id].valid, length, device, dtype)
        key = (segment_id, length, device, dtype)
        parts = self._static_parts.get(key)
        if parts is None:
            parts = _static_mask_parts(self.segments[segment_id].valid, length, device, dtype)
            self._static_parts[key] = parts
        return parts

    def unpadded(self, segment_id: int) -> bool:
        """Whether every cached prompt slot of a segment is a real token (no padding, no masked slot): read once per
        layout (one device sync), not per token."""
        value = self._unpadded.get(segment_id)
        if value is None:
            value = self._unpadded[segment_id] = bool(self.segments[segment_id].valid.all())
        return value

    def decode_plan(self, adapter: ModelAdapter) -> tuple[tuple[int, str] | None, ...]:
        """Per decoder layer, what decoding changes in its inputs: ``None`` (a layer before the first prune point, or
        a linear-attention layer: nothing), else ``(segment, layer type)``, the key of the mask (and positions) it
        shares with the other layers of that segment and type. Computed once per layout, not per layer and token."""
        if self._plan is None:
            plan: list[tuple[int, str] | None] = []
            for index in range(adapter.num_layers):
                before = [i for i, seg in enumerate(self.segments) if seg.first_layer <= index]
                attends = bool(before) and adapter.is_attention_layer(index)
                plan.append((before[-1], adapter.layer_type(index)) if attends else None)
            self._plan = tuple(plan)
        return self._plan


@dataclass
class _StaticMaskParts:
    """What a pruned segment's decode mask on a static cache of ``length`` slots keeps from step to step: the
    segment's cached prompt keys ``prompt`` ``(B, 1, 1, L)`` (its valid slots, False from ``seg_len`` on), and for
    every slot the index to compare with the layer's write position, ``generated`` ``(L,)`` (the slot itself from
    ``seg_len`` on, ``L`` before it: a prompt slot never counts as a generated key). Eager masks are additive:
    ``zero`` and ``low`` are the 0-d values of an allowed and a masked key (None under SDPA)."""

    prompt: torch.Tensor
    generated: torch.Tensor
    zero: torch.Tensor | None
    low: torch.Tensor | None


def _static_mask_parts(
    valid: torch.Tensor, length: int, device: torch.device, dtype: torch.dtype | None
) -> _StaticMaskParts:
    seg_len = valid.shape[1]
    keys = torch.arange(length, device=device)
    generated = torch.where(keys >= seg_len, keys, length)
    prompt = torch.nn.functional.pad(valid.to(device), (0, length - seg_len), value=False)[:, None, None, :]
    zero = low = None
    if dtype is not None:
        zero = torch.zeros((), dtype=dtype, device=device)
        low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    return _StaticMaskParts(prompt, generated, zero, low)


_LAYOUT_ATTR = "_piofvlm_layout"
#: On a KV cache during a language-model forward under a method: the id of the thread running it (two threads
#: writing one cache at once would corrupt it). On a static cache after its prefill: the thread that prefilled it.
_BUSY_ATTR = "_piofvlm_busy"
_STATIC_OWNER_ATTR = "_piofvlm_static_thread"
#: On a KV cache during a language-model forward under a method: ``id()`` of that model (the write guard of a pruned
#: cache then needs no look-up per layer).
_WRITER_ATTR = "_piofvlm_writer"
#: On a KV cache: ``(number of layers, static_cache_length)``, so a decode step does not walk every layer to learn it.
_STATIC_LENGTH_ATTR = "_piofvlm_static_length"


def static_length_of(cache: Any) -> int | None:
    """:func:`transformers_compat.static_cache_length`, remembered on the cache object (its kind never changes; the
    number of layers is checked). Compiled code reads it afresh (no attribute writes in a traced step)."""
    if cache is None or torch.compiler.is_compiling():
        return transformers_compat.static_cache_length(cache)
    layers = getattr(cache, "layers", None)
    count = len(layers) if layers is not None else -1
    memo = getattr(cache, _STATIC_LENGTH_ATTR, None)
    if memo is not None and memo[0] == count:
        return memo[1]
    length = transformers_compat.static_cache_length(cache)
    try:
        setattr(cache, _STATIC_LENGTH_ATTR, (count, length))
    except AttributeError:  # a cache object without a __dict__: read it every time
        pass
    return length


_BUSY_LOCK = threading.Lock()


def _pruned_cache_class(base: type) -> type | None:
    """The class a pruned ``DynamicCache`` is switched to: the same cache whose writes refuse to run while no
    method is applied to the model that pruned it (its layers hold fewer slots than the prompt: without the hooks the
    model would decode it with wrong masks, silently on some families). Only plain ``DynamicCache`` objects are
    switched (a subclass keeps its class)."""
    from transformers.cache_utils import DynamicCache

    return _PrunedDynamicCache if base is DynamicCache else None


def _make_pruned_dynamic_cache() -> type:
    from transformers.cache_utils import DynamicCache

    def refuse_without_hooks(cache: Any) -> None:
        layout = getattr(cache, _LAYOUT_ATTR, None)
        if isinstance(layout, _CacheLayout) and layout.model_id is not None:
            if getattr(cache, _WRITER_ATTR, None) == layout.model_id:
                return  # written inside a forward of its own model under a method (set by the handle's hook)
        from piofvlm.core.handle import _ACTIVE  # the handle imports this module

        if (
            isinstance(layout, _CacheLayout)
            and layout.model_id is not None
            and not any(id(model) == layout.model_id for model in list(_ACTIVE.keys()))
            and cache.get_seq_length() > 0
        ):
            raise RuntimeError(
                "this KV cache was pruned by piofvlm and is continued with no method applied: its layers hold fewer "
                "tokens than the prompt and only piofvlm's hooks mask them right. Keep a method applied (any method, "
                "e.g. `with piofvlm.get_method(...)(model):`) while the cache is in use, or start the conversation "
                "again without a cache"
            )

    def guarded_write(name: str) -> Any:
        write_through = getattr(DynamicCache, name)  # what DynamicCache does (looked up once, not per write)

        def write(self: Any, *args: Any, **kwargs: Any) -> Any:
            refuse_without_hooks(self)
            return write_through(self, *args, **kwargs)

        write.__name__ = name
        return write

    # What writes into a cache (attention keys; linear-attention states where this release has them): a refused call
    # leaves the cache unchanged.
    names = ("update", "update_conv_state", "update_recurrent_state")
    writes = [name for name in names if hasattr(DynamicCache, name)]
    PrunedDynamicCache = type(
        "PrunedDynamicCache",
        (DynamicCache,),
        {
            "__doc__": "A ``DynamicCache`` piofvlm pruned: written only while a method is applied to its model.",
            **{name: guarded_write(name) for name in writes},
        },
    )
    PrunedDynamicCache.__module__ = __name__
    PrunedDynamicCache.__qualname__ = "_PrunedDynamicCache"
    return PrunedDynamicCache


_PrunedDynamicCache = _make_pruned_dynamic_cache()


def cache_padding(cache: Any) -> dict[int, int]:
    """Masked slots the mechanism added to layers of a dynamic KV cache it pruned (layer index -> count).

    A prune point at or before the layer transformers reads the cache length from (layer 0; a hybrid stack's first
    attention layer) leaves that layer's cache left-padded to the prompt length (see
    ``PruningHandle._pad_first_layer_cache``): the slots hold memory and decoding attends over them (masked), but the
    prefill never computed them. Empty for a cache the mechanism did not prune or pad.
    """
    layout = getattr(cache, _LAYOUT_ATTR, None)
    return dict(layout.padding) if isinstance(layout, _CacheLayout) else {}


class CacheLayouts:
    """The cache side of :class:`~piofvlm.core.handle.PruningHandle`: what a prefill leaves in the KV cache and how
    decoding reads it. Owns the calling thread's last prefill layout (``_segments``) and the cache it holds."""

    # Set by the handle (PruningHandle.__init__).
    method: TokenPruner
    model: nn.Module
    adapter: ModelAdapter
    # The layout of the calling thread's last prefill (a static cache is decoded with it).
    _segments: PerThread[list[_Segment]] = PerThread(list)
    _prompt_batch: PerThread[int | None] = PerThread(lambda: None)
    _prompt_len: PerThread[int] = PerThread(int)  # padded prompt length (static caches map decode keys with it)
    _busy_cache: PerThread[Any] = PerThread(lambda: None)  # the cache this thread's language-model call holds

    def _hold_cache(self, cache: Any) -> None:
        """Mark ``cache`` as written by this thread until the language model returns (:meth:`_release_cache`); a
        cache another thread is writing at this moment is refused (its layers would interleave two calls)."""
        if cache is None or torch.compiler.is_compiling():
            return
        me = threading.get_ident()
        with _BUSY_LOCK:
            owner = getattr(cache, _BUSY_ATTR, None)
            if owner is not None and owner != me:
                raise RuntimeError(
                    f"this KV cache is in use by another thread ({owner}) at the same time: two threads cannot "
                    "continue one cache concurrently; give each thread (each conversation) its own cache"
                )
            setattr(cache, _BUSY_ATTR, me)
            setattr(cache, _WRITER_ATTR, id(self.model))
        self._busy_cache = cache

    def _release_cache(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Runs after every language-model forward, also when it raised: the cache is free again."""
        cache, self._busy_cache = self._busy_cache, None
        if cache is not None and getattr(cache, _BUSY_ATTR, None) == threading.get_ident():
            with _BUSY_LOCK:
                setattr(cache, _BUSY_ATTR, None)
                setattr(cache, _WRITER_ATTR, None)

    # ------------------------------------------------------------------------------------------- static caches
    @staticmethod
    def _split_mask(attention_mask: Any, static_length: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(2-D padding mask, None)``, or ``(None, 4-D mask)`` for the mask ``generate()`` prepares for a static
        cache (keys span the cache's ``static_length``); any other mask is refused."""
        if attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            return attention_mask, None
        mask = transformers_compat.full_attention_mask(attention_mask)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and static_length == mask.shape[-1]:
            return None, mask
        raise ValueError(
            "piofvlm needs a 2-D padding attention_mask (or None); a custom 4-D mask was given (4-D masks are "
            "accepted only as generate() prepares them for a static cache)"
        )

    def _padding_of_static_mask(self, mask_4d: torch.Tensor, static_length: int, dtype: torch.dtype) -> torch.Tensor:
        """The ``(B, S)`` padding mask behind the prefill mask ``generate()`` built for a static cache, checked by
        rebuilding that mask from it (a mask that is not plain causal + left padding is refused)."""
        seq_len = mask_4d.shape[2]
        allowed = mask_4d if mask_4d.dtype == torch.bool else mask_4d == 0
        valid = allowed[:, 0, -1, :seq_len]
        key_valid = torch.nn.functional.pad(valid, (0, static_length - seq_len), value=False)
        expected = causal_padding_mask(self.adapter.text_config, key_valid, seq_len, dtype, q_offset=0)
        if expected is None or expected.shape != mask_4d.shape or not torch.equal(expected, mask_4d):
            raise ValueError(
                "piofvlm needs a 2-D padding attention_mask (or None); the 4-D mask given with the static cache is "
                "not causal with left padding"
            )
        return valid.long()

    def _segment_static_mask(
        self, segment_id: int, call: _Call, cache: Any, index: int, query_length: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The decode mask of a pruned segment on a static cache, in tensor operations only (compiled decoding traces
        it): the segment's cached prompt keys, then every token written since the prompt up to each query (causal),
        then the unused slots of the buffer (masked). The step-independent parts are built once per layout
        (:meth:`_CacheLayout.static_mask_parts`); a step compares the layer's write position with the slots (one
        comparison and one OR; eager: one more select)."""
        segment = call.segments[segment_id]
        seg_len, length = segment.valid.shape[1], call.static_length
        device = segment.valid.device
        eager = self.adapter.attn_implementation == "eager"  # additive masks, as transformers' eager masks
        parts = call.layout_ref.static_mask_parts(segment_id, length, device, dtype if eager else None)
        written = transformers_compat.static_cache_position(cache, index)  # this layer's write position (tensor)
        if query_length == 1:
            generated = parts.generated <= written  # (L,)
        else:
            last = written + torch.arange(query_length, device=device)[:, None]  # (L_q, 1): the key each row sees
            generated = parts.generated[None, :] <= last  # (L_q, L)
        allowed = parts.prompt | generated  # (B, 1, L_q, L)
        mask_2d = call.attention_mask_2d
        if mask_2d is not None and mask_2d.shape[1] > self._prompt_len:  # padding among appended tokens
            appended = mask_2d[:, self._prompt_len : self._prompt_len + length - seg_len]
            allowed[..., seg_len : seg_len + appended.shape[1]] &= appended.to(device=device, dtype=torch.bool)[
                :, None, None, :
            ]
        if eager:
            return torch.where(allowed, parts.zero, parts.low)
        return allowed

    def _pad_first_layer_cache(self, call: _Call, cache: Any) -> dict[int, int]:
        """After a prefill pruned before layer L, the layer transformers reads the cache length from (layer 0; on a
        hybrid cache of 5.17-5.24 the first attention layer, :func:`transformers_compat.cache_length_layer`): left-pad
        layer L's KV cache to the unpruned prompt length (a linear-attention layer L, 5.25+: raise its token count).

        transformers reads the length of the whole cache from layer L (``generate()`` slices the next turn's
        ``input_ids`` with it, the model derives positions from it). Pruned before it, it would report the pruned
        length, and a later turn would re-feed already cached tokens. The padding slots are masked: layer L gets a
        segment of its own whose first slots are invalid.
        """
        index = transformers_compat.cache_length_layer(cache)
        position = max(i for i, seg in enumerate(self._segments) if seg.first_layer <= index)
        segment = self._segments[position]
        missing = call.input_ids.shape[1] - segment.valid.shape[1]
        if missing <= 0:
            return {}
        transformers_compat.pad_cache_layer(cache, index, missing)
        if not self.adapter.is_attention_layer(index):
            return {}  # a linear-attention layer (5.25+ counts its tokens): its count grew, it holds no slot to mask
        padding = torch.zeros(segment.valid.shape[0], missing, dtype=torch.bool, device=segment.valid.device)
        padded = _Segment(first_layer=index, valid=torch.cat([padding, segment.valid], 1), shift=segment.shift)
        kept = [segment] if segment.first_layer < index else []  # the (linear) layers before L keep their segment
        after = _Segment(first_layer=index + 1, valid=segment.valid, shift=segment.shift)
        self._segments[position : position + 1] = [*kept, padded, after]
        return {index: missing}

    # ---------------------------------------------------------------------------------------------- decode
    def _decode_layer(self, index: int, call: _Call, args: tuple, kwargs: dict):
        # Per layer and token only a tuple index and a dict look-up: the plan is computed once per cache layout, the
        # mask (and positions) once per step for each (segment, layer type) (:meth:`_decode_inputs`).
        key = call.plan[index]
        if key is None:
            # A layer before the cache's first prune point (its cache is the unpruned prompt), or a linear-attention
            # layer (fixed-size state, its 2-D padding mask covers only the new tokens): nothing to change.
            return None
        inputs = call.decode_cache.get(key)
        if inputs is None:
            inputs = call.decode_cache[key] = self._decode_inputs(key[0], index, call, args, kwargs)
        mask, position_embeddings, position_ids = inputs
        if mask is _AS_GIVEN:
            if position_embeddings is None:
                return None  # the model's own inputs are this layer's: nothing to change
            mask = kwargs.get("attention_mask")
        query_length = (args[0] if args else kwargs["hidden_states"]).shape[1]
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2] > query_length:
            # a multi-token continuation whose KV-shared layers run on its last logits_to_keep tokens (Gemma 4)
            mask, position_embeddings, position_ids = _last_queries(
                mask, position_embeddings, position_ids, query_length, self.adapter
            )
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
            kwargs["position_ids"] = self.adapter.layer_position_ids(position_ids)
        return args, kwargs

    def _mask_as_given(self, call: _Call, segment_id: int, index: int, query_length: int, given: Any) -> bool:
        """Whether the mask the model built for this step (``given``, what it passes every layer) is already this
        segment's decode mask, so that none is built: SDPA, one new token, a dynamic cache, a full-attention layer
        with the default decode mask, the model's mask ``None`` and the segment without padding.

        Exact, not a heuristic: the model's SDPA mask is ``None`` for one query only when no key of the step is padding
        (``masking_utils`` skips the causal mask then); the segment's keys are its own prompt slots (all real, checked
        once per layout) and the same new tokens, so its mask built by the same function is ``None`` too."""
        adapter = self.adapter
        return (
            given is None
            and query_length == 1
            and call.static_length is None
            and call.layout_ref is not None
            and adapter.attn_implementation == "sdpa"
            and adapter.layer_type(index) == "full_attention"
            and adapter.default_decode_mask
            and not torch.compiler.is_compiling()
            and call.layout_ref.unpadded(segment_id)
        )

    def _decode_inputs(self, segment_id: int, index: int, call: _Call, args: tuple, kwargs: dict):
        """Mask (and, under "renumber", positions) of the layers of one segment and layer type while decoding."""
        segment = call.segments[segment_id]
        layer_type = self.adapter.layer_type(index)
        hidden = args[0] if args else kwargs["hidden_states"]
        query_length = hidden.shape[1]
        as_given = self._mask_as_given(call, segment_id, index, query_length, kwargs.get("attention_mask", _AS_GIVEN))
        if as_given and not call.renumber:
            return _AS_GIVEN, None, None
        cache = transformers_compat.cache_from_kwargs(kwargs)
        kv_index = self.adapter.kv_layer(index)  # a KV-shared layer attends to an earlier layer's cache
        cached: Any = None  # tokens the layer's cache holds (read where needed: a static cache's is a tensor)
        if call.static_length is None or call.renumber:
            cached = cache.get_seq_length(kv_index) if cache is not None else segment.valid.shape[1]
        if as_given:
            mask = _AS_GIVEN
        elif call.static_length is not None:
            mask = self._segment_static_mask(segment_id, call, cache, index, query_length, hidden.dtype)
        else:
            new_tokens = cached + query_length - segment.valid.shape[1]  # generated/appended tokens incl. this call's
            new_valid = torch.ones(hidden.shape[0], new_tokens, dtype=torch.bool, device=hidden.device)
            mask_2d = call.attention_mask_2d
            if mask_2d is not None and mask_2d.shape[1] >= new_tokens:
                new_valid = mask_2d[:, mask_2d.shape[1] - new_tokens :].to(device=hidden.device, dtype=torch.bool)
            key_valid = torch.cat([segment.valid, new_valid], dim=1)
            visible = key_valid.shape[1]
            if cache is not None:  # a sliding-window layer presents only its last keys (counted in kept slots)
                visible = transformers_compat.visible_past_keys(cache, kv_index, query_length) + query_length
            mask = self.adapter.decode_mask_over(layer_type, key_valid, visible, query_length, hidden.dtype)
        if not call.renumber:
            return mask, None, None
        position_ids = call.position_ids
        if position_ids is None:
            position_ids = self.adapter.default_position_ids(hidden.shape[0], query_length, hidden.device) + cached
        position_ids = self.adapter.renumber_positions(position_ids, segment.shift[:, None])
        position_embeddings = tuple(self.adapter.rotary_embeddings(hidden, position_ids, layer_type))
        return mask, position_embeddings, position_ids


#: A decode input meaning "the mask the model gave this layer" (see :meth:`CacheLayouts._mask_as_given`).
_AS_GIVEN: Any = object()


def _last_queries(
    mask: Any,
    rotary: tuple[torch.Tensor, ...] | None,
    position_ids: torch.Tensor | None,
    query_length: int,
    adapter: ModelAdapter,
) -> tuple[Any, tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
    """The last ``query_length`` query rows of a layer's inputs: mask ``(B, 1, L_q, L_kv)`` rows, rotary tables
    ``(B, L_q, hd)`` and position ids ``(..., L_q)`` (as ``Gemma4TextModel._maybe_slice_kv_shared_inputs`` slices)."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        mask = mask[:, :, -query_length:, :]
    elif mask is None and query_length > 1:
        raise ValueError(
            f"cannot run the KV-shared layers on the last {query_length} queries of a continuation without a "
            "materialised mask: use logits_to_keep=1 (as generate() does) or 0"
        )
    elif mask is not None:
        raise ValueError(
            f"cannot slice a {type(mask).__name__} attention mask to the last {query_length} queries "
            "(KV-shared layers of a logits_to_keep prefill): use attn_implementation='sdpa' or 'eager'"
        )
    if rotary is not None:
        dim = adapter.rotary_batch_dim + 1
        rotary = tuple(t.narrow(dim, t.shape[dim] - query_length, query_length) for t in rotary)
    if position_ids is not None:
        position_ids = position_ids[..., -query_length:]
    return mask, rotary, position_ids
