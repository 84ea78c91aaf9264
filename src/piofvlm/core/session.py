"""The one mechanism that drops visual tokens between decoder layers, shared by every in-LLM method.

A :class:`PruningHandle` puts forward pre-hooks on one model instance (never on classes):

* on the multimodal model, to read ``input_ids`` and the image inputs of the call;
* on the language model, to tell prefill from decoding and capture the 2-D padding mask and position ids;
* on every decoder layer from the first prune point on. At a prune point during prefill it asks the method which
  visual tokens to keep, then rebuilds the sequence (hidden states, position ids, rotary tables, attention mask) as
  a shorter left-padded batch; the following layers get the rebuilt tensors. During decoding, the layers after a
  prune point get a mask sized for their shorter KV cache (and, with ``positions="renumber"``, shifted positions).

Pruning happens only in prefill, i.e. when the cache is empty. The KV cache of a layer holds exactly the tokens that
layer saw, so layers after a prune point cache only the kept tokens.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.profiler import record_function

from piofvlm import transformers_compat
from piofvlm.adapters.base import ModelAdapter
from piofvlm.core.context import StageContext, StageRecord
from piofvlm.core.guard import guarded
from piofvlm.core.masks import causal_padding_mask
from piofvlm.core.ops import gather_sequence
from piofvlm.core.threads import PerThread, new_state

if TYPE_CHECKING:
    from piofvlm.methods.base import TokenPruner

logger = logging.getLogger(__name__)

# Models that currently carry a handle; weak, so nothing outlives the model.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PruningHandle] = weakref.WeakKeyDictionary()


@dataclass
class _Layout:
    """A (possibly pruned) left-padded prefill sequence. All tensors are ``(B, S_cur)`` unless stated."""

    source: torch.Tensor  # original prompt slot of each slot, -1 for padding
    groups: torch.Tensor  # budget group of visual slots, -1 otherwise
    visual_index: torch.Tensor  # index among the sample's original visual tokens, -1 otherwise
    shift: torch.Tensor  # (B,) tokens dropped so far (decode position shift under "renumber")
    # Per layer type (``adapter.layer_type``): the attention mask and the rotary tables (cos, sin) the layers get.
    masks: dict[str, Any]
    rotary: dict[str, tuple[torch.Tensor, ...]]
    position_ids: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.source >= 0


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
    layout. Static caches keep the handle's layout of its last prefill (compiled decoding reads it)."""

    segments: list[_Segment]
    batch_size: int
    renumber: bool
    padding: dict[int, int] = field(default_factory=dict)  # layer -> masked slots added after the prefill
    model_id: int | None = None  # id() of the model whose hooks pruned it (see _PrunedDynamicCache)


_LAYOUT_ATTR = "_piofvlm_layout"
#: On a KV cache during a language-model forward under a method: the id of the thread running it (two threads
#: writing one cache at once would corrupt it). On a static cache after its prefill: the thread that prefilled it.
_BUSY_ATTR = "_piofvlm_busy"
_STATIC_OWNER_ATTR = "_piofvlm_static_thread"
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
        def write(self: Any, *args: Any, **kwargs: Any) -> Any:
            refuse_without_hooks(self)
            return getattr(super(PrunedDynamicCache, self), name)(*args, **kwargs)

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


@dataclass
class _Call:
    """State of one language-model forward."""

    prefill: bool
    hidden_dtype: torch.dtype
    layout: _Layout | None = None  # prefill only
    pruned: bool = False
    input_ids: torch.Tensor | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # prefill only: the multimodal call's arguments
    original_counts: torch.Tensor | None = None  # (B, G) visual tokens per group before any stage
    sample_keys: torch.Tensor | None = None
    attention_mask_2d: torch.Tensor | None = None  # decode only
    position_ids: torch.Tensor | None = None  # decode only
    static_length: int | None = None  # key length of every layer of a static KV cache, None for a dynamic one
    segments: list[_Segment] = field(default_factory=list)  # decode only: the layout of the cache being continued
    renumber: bool = False  # decode only: that cache was pruned with positions="renumber"
    decode_cache: dict[tuple[int, str], tuple[Any, Any, Any]] = field(default_factory=dict)  # (segment, type)


class PruningHandle:
    """Hooks of one method on one model instance. Use :meth:`remove` (or the method's context manager) to undo.

    Any number of threads may call the model at once: what a call owns is per thread (``PerThread``), see
    ``docs/threads.md``.
    """

    #: Per stage, what the last prefill of the calling thread kept.
    records: PerThread[list[StageRecord]] = PerThread(list)
    # The layout of the calling thread's last prefill (a static cache is decoded with it).
    _segments: PerThread[list[_Segment]] = PerThread(list)
    _prompt_batch: PerThread[int | None] = PerThread(lambda: None)
    _prompt_len: PerThread[int] = PerThread(int)  # padded prompt length (static caches map decode keys with it)
    _pending: PerThread[tuple[torch.Tensor | None, dict[str, Any]] | None] = PerThread(lambda: None)
    _call: PerThread[_Call | None] = PerThread(lambda: None)
    _selecting: PerThread[bool] = PerThread(bool)
    _labels: PerThread[tuple[torch.Tensor, torch.Tensor, Any] | None] = PerThread(lambda: None)  # labels, ids, items
    _final_source: PerThread[torch.Tensor | None] = PerThread(lambda: None)  # (B, S') prompt slot after last stage
    _busy_cache: PerThread[Any] = PerThread(lambda: None)  # the cache this thread's language-model call holds

    def __init__(self, method: TokenPruner, model: nn.Module, adapter: ModelAdapter) -> None:
        if model in _ACTIVE:
            raise RuntimeError(
                "a piofvlm method is already applied to this model; remove its handle (or leave its `with` block) "
                "before applying another"
            )
        self._per_thread = new_state()  # the state below marked PerThread: one copy per calling thread
        self.method = method
        self.model = model
        self.adapter = adapter
        self._stage_at_layer = {layer: stage for stage, layer in enumerate(method.layers)}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        try:
            # Every hook is guarded: a model carrying them refuses copy.deepcopy and pickling (core/guard.py).
            self._hooks.append(model.register_forward_pre_hook(guarded(self._take_labels), with_kwargs=True))
            self._hooks.append(model.register_forward_hook(guarded(self._loss_over_kept), with_kwargs=True))
            self._hooks.append(
                adapter.multimodal_model.register_forward_pre_hook(guarded(self._on_multimodal), with_kwargs=True)
            )
            self._hooks.append(
                adapter.language_model.register_forward_pre_hook(guarded(self._on_language_model), with_kwargs=True)
            )
            self._hooks.append(adapter.language_model.register_forward_hook(guarded(self._after_language_model)))
            self._hooks.append(
                adapter.language_model.register_forward_hook(guarded(self._release_cache), always_call=True)
            )
            # Every layer: a cache pruned under another handle (or another schedule) may be continued under this one.
            for index in range(adapter.num_layers):
                hook = adapter.layers[index].register_forward_pre_hook(
                    guarded(self._layer_hook(index)), with_kwargs=True
                )
                self._hooks.append(hook)
            adapter.attach(self)
            method.attach(self)
        except Exception:
            self.remove()
            raise
        _ACTIVE[model] = self
        transformers_compat.reset_compiled(model)  # a graph traced without these hooks would never run them

    def add_hook(self, hook: torch.utils.hooks.RemovableHandle) -> None:
        """Own an extra hook (e.g. a method's hook on the vision tower): it is removed with this handle."""
        self._hooks.append(hook)

    # --------------------------------------------------------------------------------------------- lifecycle
    def remove(self) -> None:
        """Remove every hook; the model is left exactly as it was."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._call = None
        self._pending = None
        self._segments = []
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
            transformers_compat.reset_compiled(self.model)  # a graph traced with these hooks would keep running them

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def prefill_slots(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """During a prefill, outside a method's selection: the current sequence layout, else None.

        Returns ``(source, visual)``, both ``(B, S_cur)``: the original prompt slot of each slot (-1 for padding) and
        whether it holds a visual token still present. Between layers this is the layout of the hidden states the
        last decoder layer produced (pruning happens before a layer runs).
        """
        call = self._call
        if call is None or not call.prefill or self._selecting:
            return None
        return call.layout.source, call.layout.groups >= 0

    def __enter__(self) -> PruningHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ----------------------------------------------------------------------------------------------- hooks
    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending = (input_ids, kwargs)

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pending, self._pending = self._pending, None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("piofvlm expects the language model to receive inputs_embeds from the multimodal model")
        cache = transformers_compat.cache_from_kwargs(kwargs)
        self._hold_cache(cache)
        static_length = transformers_compat.static_cache_length(cache)
        if static_length is not None and self.adapter.text_config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                "piofvlm supports a static KV cache with attn_implementation 'sdpa' or 'eager', not "
                f"{self.adapter.text_config._attn_implementation!r}; use the default dynamic cache"
            )
        attention_mask = kwargs.get("attention_mask")
        outer_mask = (pending[1] if pending is not None else {}).get("attention_mask")
        if isinstance(attention_mask, dict) and self.adapter.rebuilds_layer_type_masks:
            # Per-layer-type masks the multimodal model built (Gemma 3): rebuilt from its 2-D padding mask.
            if outer_mask is not None and not (isinstance(outer_mask, torch.Tensor) and outer_mask.dim() == 2):
                raise ValueError(
                    "piofvlm needs a 2-D padding attention_mask (or None); a custom or prepared 4-D mask was given"
                )
            attention_mask = outer_mask
        attention_mask, mask_4d = self._split_mask(attention_mask, static_length)
        if static_length is not None and embeds.shape[1] == 1 and self._segments and torch.compiler.is_compiling():
            prefill = False  # a compiled one-token step on a static cache this handle prefilled: no graph break
        else:
            prefill = cache is None or bool(cache.get_seq_length() == 0)
        if prefill and mask_4d is not None:
            attention_mask = self._padding_of_static_mask(mask_4d, static_length, embeds.dtype)
        if prefill:
            self._call = self._start_prefill(embeds, attention_mask, kwargs.get("position_ids"), pending)
            self._call.static_length = static_length
            if static_length is not None and not torch.compiler.is_compiling():
                setattr(cache, _STATIC_OWNER_ATTR, threading.get_ident())
            return
        self._call = None
        input_ids = pending[0] if pending is not None else None
        # One generated token may be the image id by chance; a multi-token continuation holding image tokens
        # (chunked prefill, a new image on an old cache) would be pruned partially or not at all: refused.
        if input_ids is not None and input_ids.shape[1] > 1 and bool(self.adapter.visual_token_mask(input_ids).any()):
            raise ValueError(
                "image tokens arrived on a non-empty KV cache: visual tokens are pruned in one prefill over the whole "
                "prompt, so chunked prefill or adding images to an existing cache is not supported"
            )
        layout: _CacheLayout | None = getattr(cache, _LAYOUT_ATTR, None) if static_length is None else None
        owner = None
        if static_length is not None and not torch.compiler.is_compiling():
            owner = getattr(cache, _STATIC_OWNER_ATTR, None)
        if owner is not None and owner != threading.get_ident():
            raise RuntimeError(
                f"a static KV cache prefilled in thread {owner} is continued in thread {threading.get_ident()}: "
                "under a piofvlm method a static cache is decoded with the layout of the prefill made in the "
                "same thread; continue it in the thread that prefilled it, or use the default dynamic cache "
                "(it carries its own layout)"
            )
        if layout is None and static_length is not None and self._segments:  # a static cache: this thread's layout
            layout = _CacheLayout(self._segments, self._prompt_batch, self.method.positions == "renumber")
        if layout is None:
            return  # a cache no piofvlm prefill pruned: nothing to adjust
        if embeds.shape[0] != layout.batch_size:
            raise RuntimeError(
                f"decoding a batch of {embeds.shape[0]} on a cache pruned for a batch of {layout.batch_size} "
                "(beam search and cache reordering are not supported while pruning)"
            )
        self._call = _Call(
            prefill=False,
            hidden_dtype=embeds.dtype,
            attention_mask_2d=attention_mask,
            position_ids=kwargs.get("position_ids"),
            static_length=static_length,
            segments=layout.segments,
            renumber=layout.renumber,
        )

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
        self._busy_cache = cache

    def _release_cache(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Runs after every language-model forward, also when it raised: the cache is free again."""
        cache, self._busy_cache = self._busy_cache, None
        if cache is not None and getattr(cache, _BUSY_ATTR, None) == threading.get_ident():
            with _BUSY_LOCK:
                setattr(cache, _BUSY_ATTR, None)

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
        self, segment: _Segment, call: _Call, cache: Any, index: int, query_length: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The decode mask of a pruned segment on a static cache, in tensor operations only (compiled decoding traces
        it): the segment's cached prompt keys, then every token written since the prompt up to each query (causal),
        then the unused slots of the buffer (masked)."""
        seg_len, length = segment.valid.shape[1], call.static_length
        device = segment.valid.device
        written = transformers_compat.static_cache_position(cache, index)  # this layer's write position (tensor)
        keys = torch.arange(length, device=device)
        rows = torch.arange(query_length, device=device)
        generated = (keys >= seg_len)[None, :] & (keys[None, :] <= written + rows[:, None])  # (L_q, L)
        prompt = torch.nn.functional.pad(segment.valid, (0, length - seg_len), value=False)[:, None, None, :]
        allowed = torch.where(keys < seg_len, prompt, generated[None, None])  # (B, 1, L_q, L)
        mask_2d = call.attention_mask_2d
        if mask_2d is not None and mask_2d.shape[1] > self._prompt_len:  # padding among appended tokens
            appended = mask_2d[:, self._prompt_len :].to(device=device, dtype=torch.bool)
            appended = appended[:, : length - seg_len]
            appended = torch.nn.functional.pad(appended, (seg_len, length - seg_len - appended.shape[1]), value=True)
            allowed = allowed & appended[:, None, None, :]
        if self.adapter.text_config._attn_implementation == "eager":  # additive, as transformers' eager masks
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return allowed

    def _after_language_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        call, self._call = self._call, None
        self._final_source = call.layout.source if call is not None and call.prefill else None
        if call is None or not call.prefill or not self._segments or call.static_length is not None:
            return
        cache = transformers_compat.output_cache(output)
        if cache is None or not transformers_compat.is_dynamic_cache(cache):
            return
        padding = {}
        if self._segments[0].first_layer <= transformers_compat.cache_length_layer(cache):
            padding = self._pad_first_layer_cache(call, cache)
        layout = _CacheLayout(
            list(self._segments), call.input_ids.shape[0], self.method.positions == "renumber", padding, id(self.model)
        )
        setattr(cache, _LAYOUT_ATTR, layout)
        pruned_class = _pruned_cache_class(type(cache))
        if pruned_class is not None:
            cache.__class__ = pruned_class  # refuses to be continued once the method is removed

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

    # ------------------------------------------------------------------------------------------------- labels
    def _take_labels(self, module: nn.Module, args: tuple, kwargs: dict):
        """``labels=`` are applied to the pruned logits by :meth:`_loss_over_kept`; the model never sees them."""
        self._labels = None
        if kwargs.get("labels") is None:
            return None
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or tuple(input_ids.shape) != tuple(labels.shape):
            raise ValueError(
                "labels under a piofvlm method need input_ids of the same shape (the loss follows the kept tokens)"
            )
        self._labels = (labels, input_ids, kwargs.get("num_items_in_batch"))
        return args, kwargs

    def _loss_over_kept(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The causal-LM loss over the kept sequence: the logits at a kept slot predict the label of the prompt slot
        after it (``-100`` where that slot is a visual token, kept or not, or padding), as the unpruned model's
        logits at that slot would."""
        if self._labels is None:
            return
        (labels, input_ids, num_items), self._labels = self._labels, None
        source, logits = self._final_source, getattr(output, "logits", None)
        if source is None or logits is None or logits.shape[1] != source.shape[1]:
            raise ValueError(
                "labels under a piofvlm method need the logits of every kept position: call the model on the whole "
                "prompt with an empty cache and logits_to_keep=0"
            )
        source = source.to(labels.device)
        following = (source + 1).clamp(max=labels.shape[1] - 1)
        text = ~self.adapter.visual_token_mask(input_ids.to(labels.device))
        usable = (source >= 0) & (source + 1 < labels.shape[1]) & text.gather(1, following)
        targets = torch.where(usable, labels.gather(1, following), -100)
        output["loss"] = module.loss_function(
            logits=logits,
            labels=None,
            vocab_size=logits.shape[-1],
            shift_labels=targets,
            num_items_in_batch=num_items,
        )

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call = self._call
            if call is None or self._selecting:
                return None
            if call.prefill:
                return self._prefill_layer(index, call, args, kwargs)
            return self._decode_layer(index, call, args, kwargs)

        return hook

    # ---------------------------------------------------------------------------------------------- prefill
    @torch.compiler.disable  # data-dependent set-up: run eagerly inside a compiled forward
    def _start_prefill(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        pending: tuple[torch.Tensor | None, dict[str, Any]] | None,
    ) -> _Call:
        adapter = self.adapter
        adapter.check_attention()  # also here: set_attn_implementation() may have run after the method was applied
        batch_size, seq_len, _ = embeds.shape
        device = embeds.device
        input_ids = pending[0] if pending is not None else None
        if input_ids is None or tuple(input_ids.shape[:2]) != (batch_size, seq_len):
            raise ValueError(
                "piofvlm needs the prompt's input_ids to find the visual tokens: call the model with input_ids "
                "(as produced by its processor), not inputs_embeds"
            )
        valid = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        if attention_mask is not None:
            valid = attention_mask.to(device=device, dtype=torch.bool)
            if bool((valid[:, 1:] < valid[:, :-1]).any()):
                raise ValueError(
                    "piofvlm needs left padding (padding tokens before the prompt): set "
                    "processor.tokenizer.padding_side = 'left'"
                )
        visual = adapter.visual_token_mask(input_ids.to(device))
        hidden_visual = (visual & ~valid).any(1).nonzero()[:, 0].tolist()
        if hidden_visual:
            raise ValueError(
                f"sample(s) {hidden_visual} have image tokens where attention_mask is 0 (e.g. a row that is all "
                "padding): each image's tokens must all be attended; drop such rows from the batch"
            )
        if not bool(visual.any()):
            raise ValueError(
                f"no image tokens (id {adapter.image_token_id}) in the prompt: visual-token pruning needs an image; "
                "build the inputs with the model's processor from a prompt containing the image placeholder, or "
                "run without the method"
            )
        model_kwargs = pending[1] if pending is not None else {}
        image_ids = self._image_ids(visual, model_kwargs)
        scope = self.method.budget_scope
        if scope == "image":
            groups = image_ids
        elif scope == "modality":
            groups = torch.where(visual, adapter.visual_modality(input_ids.to(device), model_kwargs), -1)
        else:
            groups = image_ids.clamp(max=0)
        num_groups = int(groups.max().item()) + 1
        original_counts = torch.stack([(groups == g).sum(1) for g in range(num_groups)], dim=1)  # (B, G)
        visual_index = torch.where(visual, visual.long().cumsum(1) - 1, -1)
        if position_ids is None:
            position_ids = adapter.default_position_ids(batch_size, seq_len, device)
        source = torch.where(valid, torch.arange(seq_len, device=device)[None], -1)
        layout = _Layout(
            source=source,
            groups=groups,
            visual_index=visual_index,
            shift=torch.zeros(batch_size, dtype=torch.long, device=device),
            masks={},  # filled in by the first hooked layer of each type from its own arguments
            rotary={},
            position_ids=position_ids,
        )
        self._segments = []
        self._prompt_batch = batch_size
        self._prompt_len = seq_len
        self.records = []
        self.method.remember_selection(self.records)
        return _Call(
            prefill=True,
            hidden_dtype=embeds.dtype,
            layout=layout,
            input_ids=input_ids,
            model_kwargs=model_kwargs,
            original_counts=original_counts,
            sample_keys=_sample_keys(input_ids.to(device), valid),
        )

    def _image_ids(self, visual: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """``(B, S)`` index of the image each visual slot belongs to, within its sample; -1 for text."""
        flat = visual.flatten()
        total = int(flat.sum().item())
        counts = self.adapter.image_token_counts(total, model_kwargs)
        if counts is not None and sum(counts) == total:
            global_image = torch.repeat_interleave(
                torch.arange(len(counts), device=visual.device), torch.tensor(counts, device=visual.device)
            )
        else:
            if counts is not None:
                logger.warning(
                    "image token counts %s do not add up to the %d image tokens; treating each run as one image",
                    counts,
                    total,
                )
            starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]  # first slot of each run
            global_image = (starts.flatten().long().cumsum(0) - 1)[flat]
        image_of_slot = torch.full_like(flat, -1, dtype=torch.long)
        image_of_slot[flat] = global_image
        image_of_slot = image_of_slot.view_as(visual)
        # Renumber per sample: the first image of each sample is 0.
        first_image = torch.where(visual, image_of_slot, image_of_slot.max() + 1).min(1, keepdim=True).values
        return torch.where(visual, image_of_slot - first_image, -1)

    def _prefill_layer(self, index: int, call: _Call, args: tuple, kwargs: dict):
        layout = call.layout
        layer_type = self.adapter.layer_type(index)
        if not call.pruned and layer_type not in layout.rotary:
            layout.masks[layer_type] = kwargs.get("attention_mask")
            layout.rotary[layer_type] = tuple(kwargs["position_embeddings"])
        hidden = args[0] if args else kwargs["hidden_states"]
        if index in self._stage_at_layer:
            layer_inputs = self._layer_inputs(layout, args, kwargs)
            hidden, layout = self._prune(self._stage_at_layer[index], index, call, hidden, layer_inputs)
            call.layout, call.pruned = layout, True
        if not call.pruned:
            return None
        kwargs = dict(kwargs)
        mask, rotary = layout.masks[layer_type], layout.rotary[layer_type]
        position_ids = self.adapter.layer_position_ids(layout.position_ids)
        query_length = hidden.shape[1]
        if query_length < layout.source.shape[1]:
            # generate()'s prefill runs KV-shared layers on the last logits_to_keep tokens only (Gemma 4): the same
            # query rows of the rebuilt mask, rotary tables and positions.
            if mask is None and query_length > 1:  # sdpa's is_causal would align the shorter queries top-left
                slots = torch.arange(
                    layout.source.shape[1] - query_length, layout.source.shape[1], device=hidden.device
                )
                mask = self.adapter.allowed_keys(
                    layer_type, layout.valid, layout.source, slots[None].expand(hidden.shape[0], -1), call.model_kwargs
                )  # (B, 1, L_q, S) bool
            mask, rotary, position_ids = _last_queries(mask, rotary, position_ids, query_length, self.adapter)
        kwargs["attention_mask"] = mask
        kwargs["position_embeddings"] = rotary
        kwargs["position_ids"] = position_ids
        args = self._gather_per_token_input(layout, args, kwargs, query_length)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _layer_inputs(self, layout: _Layout, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The per-token argument of a decoder layer (``adapter.per_token_layer_input``) in ``layout`` (gathered
        through its prompt slots), by keyword: what a method calling that layer alone must pass it."""
        spec = self.adapter.per_token_layer_input
        if spec is None:
            return {}
        position, keyword = spec
        value = args[position] if len(args) > position else kwargs.get(keyword)
        if not isinstance(value, torch.Tensor):
            return {}
        return {keyword: gather_sequence(value, layout.source.to(value.device).clamp(min=0), 0)}

    def _gather_per_token_input(self, layout: _Layout, args: tuple, kwargs: dict, query_length: int) -> tuple:
        """Gather a decoder layer's per-token argument (Gemma 4's ``per_layer_input``, ``(B, S_prompt, d)``) with the
        kept tokens: slot j gets the row of its prompt slot ``layout.source[:, j]``. In a prefill sliced to its last
        ``query_length`` tokens the model already took the prompt's last rows: they must be the kept sequence's."""
        spec = self.adapter.per_token_layer_input
        if spec is None:
            return args
        position, keyword = spec
        in_args = len(args) > position
        value = args[position] if in_args else kwargs.get(keyword)
        if not isinstance(value, torch.Tensor):
            return args
        source = layout.source.to(value.device)
        if query_length < source.shape[1]:
            tail = source[:, -query_length:]
            prompt_tail = torch.arange(value.shape[1], device=value.device) + self._prompt_len - value.shape[1]
            if value.shape[1] != query_length or not bool((tail == prompt_tail[None]).all()):
                raise ValueError(
                    f"a prefill sliced to its last {query_length} tokens (logits_to_keep) reaches pruned visual "
                    "tokens: "
                    "use logits_to_keep no larger than the text after the last image, or logits_to_keep=0"
                )
            return args
        value = gather_sequence(value, source.clamp(min=0), 0)
        if in_args:
            return (*args[:position], value, *args[position + 1 :])
        kwargs[keyword] = value
        return args

    def _budgets(self, stage: int, call: _Call, layout: _Layout) -> torch.Tensor:
        num_groups = call.original_counts.shape[1]
        current = torch.stack([(layout.groups == g).sum(1) for g in range(num_groups)], dim=1)
        budgets = self.method.stage_budgets(stage, call.original_counts)
        too_many = budgets > current
        if bool(too_many.any()):
            b, g = (int(i) for i in too_many.nonzero()[0])
            raise ValueError(
                f"stage {stage} (after layer {self.method.layers[stage]}) asks to keep {int(budgets[b, g])} visual "
                f"tokens of group {g} of sample {b}, which has only {int(current[b, g])} left "
                f"({int(call.original_counts[b, g])} before pruning); keep={self.method.keep!r}"
            )
        return budgets

    @torch.compiler.disable  # data-dependent set-up: run eagerly inside a compiled forward
    def _prune(
        self, stage: int, index: int, call: _Call, hidden: torch.Tensor, layer_inputs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, _Layout]:
        layout = call.layout
        budgets = self._budgets(stage, call, layout)
        adapter = self.adapter
        for layer_type in adapter.layer_types:  # types whose first layer comes after this one: from the positions
            if layer_type not in layout.rotary:
                layout.rotary[layer_type] = tuple(adapter.rotary_embeddings(hidden, layout.position_ids, layer_type))
        if any(kind not in layout.masks for kind in adapter.layer_types):  # and their masks (same mask functions)
            built = self._prefill_masks(call, layout, hidden.dtype)
            layout.masks = {kind: layout.masks.get(kind, built[kind]) for kind in adapter.layer_types}
        layer_type = adapter.layer_type(index)
        source, valid, model_kwargs = layout.source, layout.valid, call.model_kwargs

        def key_mask(layer_index: int, query_slots: torch.Tensor) -> torch.Tensor:
            kind = adapter.layer_type(layer_index)
            return adapter.allowed_keys(kind, valid, source, query_slots, model_kwargs)

        ctx = StageContext(
            stage=stage,
            layer=index,
            hidden_states=hidden,
            valid=layout.valid,
            groups=layout.groups,
            visual_index=layout.visual_index,
            budgets=budgets,
            attention_mask=layout.masks.get(layer_type),
            position_embeddings=layout.rotary[layer_type],
            position_ids=layout.position_ids,
            sample_keys=call.sample_keys,
            adapter=self.adapter,
            model=self.model,
            masks=dict(layout.masks),
            rotary=dict(layout.rotary),
            key_mask=key_mask,
            layer_inputs=layer_inputs or {},
        )
        self._selecting = True
        try:
            with record_function("piofvlm.select"):  # profiler label, free when no profiler runs
                selection = self.method.select(ctx)
        finally:
            self._selecting = False
        keep_visual = selection.keep.to(torch.bool) & (layout.groups >= 0)
        kept_per_group = torch.stack([(keep_visual & (layout.groups == g)).sum(1) for g in range(budgets.shape[1])], 1)
        if not torch.equal(kept_per_group, budgets):
            raise RuntimeError(
                f"{type(self.method).__name__}.select kept {kept_per_group.tolist()} visual tokens per group, "
                f"the budgets are {budgets.tolist()}"
            )
        self._record(stage, index, layout, keep_visual, selection.scores)
        if selection.hidden_states is not None:
            if selection.hidden_states.shape != hidden.shape:
                raise RuntimeError(
                    f"{type(self.method).__name__}.select returned hidden states of shape "
                    f"{tuple(selection.hidden_states.shape)}, expected {tuple(hidden.shape)}"
                )
            hidden = selection.hidden_states.to(hidden.dtype)
        keep_slot = layout.valid & ((layout.groups < 0) | keep_visual)
        with record_function("piofvlm.rebuild"):
            new_layout, gather_index = self._rebuild(layout, keep_slot, hidden)
            hidden = hidden.gather(1, gather_index[..., None].expand(-1, -1, hidden.shape[-1]))
            if self.method.positions == "renumber":
                new_layout.rotary = {
                    kind: tuple(adapter.rotary_embeddings(hidden, new_layout.position_ids, kind))
                    for kind in adapter.layer_types
                }
            new_layout.masks = self._prefill_masks(call, new_layout, hidden.dtype)
        self._segments.append(_Segment(first_layer=index, valid=new_layout.valid, shift=new_layout.shift))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "stage %d after %d layers: visual tokens per sample %s -> %s",
                stage,
                index,
                (layout.groups >= 0).sum(1).tolist(),
                (new_layout.groups >= 0).sum(1).tolist(),
            )
        return hidden, new_layout

    def _prefill_masks(self, call: _Call, layout: _Layout, dtype: torch.dtype) -> dict[str, Any]:
        """The masks of a rebuilt prefill, per layer type (the adapter builds them: causal by default); on a static
        cache their keys span the whole buffer (unused: masked)."""
        return self.adapter.prefill_masks(layout.valid, layout.source, dtype, call.static_length, call.model_kwargs)

    def _rebuild(self, layout: _Layout, keep_slot: torch.Tensor, hidden: torch.Tensor) -> tuple[_Layout, torch.Tensor]:
        """Compact the kept slots of every sample to the right of a new, shorter, left-padded sequence."""
        batch_size, seq_len = keep_slot.shape
        device = keep_slot.device
        lengths = keep_slot.sum(1)  # (B,)
        new_len = int(lengths.max().item())
        destination = (new_len - lengths)[:, None] + keep_slot.long().cumsum(1) - 1  # (B, S_cur)
        destination = torch.where(keep_slot, destination, new_len)  # dropped slots go to a scratch column
        gather_index = torch.full((batch_size, new_len + 1), -1, dtype=torch.long, device=device)
        gather_index.scatter_(1, destination, torch.arange(seq_len, device=device)[None].expand(batch_size, -1))
        gather_index = gather_index[:, :new_len]
        new_valid = gather_index >= 0
        # Padding slots read a slot of their own row (slot j, or the last one); they are masked everywhere.
        filler = torch.arange(new_len, device=device).clamp(max=seq_len - 1)[None].expand(batch_size, -1)
        gather_index = torch.where(new_valid, gather_index, filler)

        def take(values: torch.Tensor, fill: int) -> torch.Tensor:
            return torch.where(new_valid, values.gather(1, gather_index), fill)

        dropped = layout.valid & ~keep_slot
        position_ids = gather_sequence(layout.position_ids, gather_index, self.adapter.position_batch_dim)
        if self.method.positions == "renumber":
            dropped_before = dropped.long().cumsum(1) - dropped.long()  # (B, S_cur) dropped slots before each slot
            position_ids = self.adapter.renumber_positions(
                position_ids, gather_sequence(dropped_before, gather_index, 0)
            )
            rotary: dict[str, tuple[torch.Tensor, ...]] = {}
        else:
            rotary = {
                kind: tuple(gather_sequence(t, gather_index, self.adapter.rotary_batch_dim) for t in tables)
                for kind, tables in layout.rotary.items()
            }
        new_layout = _Layout(
            source=take(layout.source, -1),
            groups=take(layout.groups, -1),
            visual_index=take(layout.visual_index, -1),
            shift=layout.shift + dropped.sum(1),
            masks={},
            rotary=rotary,
            position_ids=position_ids,
        )
        return new_layout, gather_index

    def _record(
        self, stage: int, index: int, layout: _Layout, keep_visual: torch.Tensor, scores: torch.Tensor | None
    ) -> None:
        record = StageRecord(stage=stage, layer=index)
        visual = layout.groups >= 0
        for b in range(visual.shape[0]):
            record.candidates.append(layout.visual_index[b][visual[b]])
            record.kept.append(layout.visual_index[b][keep_visual[b]])
            record.scores.append(None if scores is None else scores[b][visual[b]].float())
        self.records.append(record)

    # ---------------------------------------------------------------------------------------------- decode
    def _decode_layer(self, index: int, call: _Call, args: tuple, kwargs: dict):
        if not self.adapter.is_attention_layer(index):
            return None  # a linear-attention layer: fixed-size state, its 2-D padding mask covers only the new tokens
        before = [i for i, seg in enumerate(call.segments) if seg.first_layer <= index]
        if not before:
            return None  # a layer before the cache's first prune point: its cache is the unpruned prompt
        key = (before[-1], self.adapter.layer_type(index))
        if key not in call.decode_cache:
            call.decode_cache[key] = self._decode_inputs(key[0], index, call, args, kwargs)
        mask, position_embeddings, position_ids = call.decode_cache[key]
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

    def _decode_inputs(self, segment_id: int, index: int, call: _Call, args: tuple, kwargs: dict):
        """Mask (and, under "renumber", positions) of the layers of one segment and layer type while decoding."""
        segment = call.segments[segment_id]
        layer_type = self.adapter.layer_type(index)
        hidden = args[0] if args else kwargs["hidden_states"]
        query_length = hidden.shape[1]
        cache = transformers_compat.cache_from_kwargs(kwargs)
        kv_index = self.adapter.kv_layer(index)  # a KV-shared layer attends to an earlier layer's cache
        cached = cache.get_seq_length(kv_index) if cache is not None else segment.valid.shape[1]
        if call.static_length is not None:
            mask = self._segment_static_mask(segment, call, cache, index, query_length, hidden.dtype)
        else:
            new_tokens = cached + query_length - segment.valid.shape[1]  # generated/appended tokens incl. this call's
            new_valid = torch.ones(hidden.shape[0], new_tokens, dtype=torch.bool, device=hidden.device)
            mask_2d = call.attention_mask_2d
            if mask_2d is not None and mask_2d.shape[1] >= new_tokens:
                new_valid = mask_2d[:, mask_2d.shape[1] - new_tokens :].to(device=hidden.device, dtype=torch.bool)
            key_valid = torch.cat([segment.valid, new_valid], dim=1)
            if cache is not None:  # a sliding-window layer presents only its last keys (counted in kept slots)
                past = transformers_compat.visible_past_keys(cache, kv_index, query_length)
                key_valid = key_valid[:, key_valid.shape[1] - past - query_length :]
            mask = self.adapter.decode_mask(layer_type, key_valid, query_length, hidden.dtype)
        if not call.renumber:
            return mask, None, None
        position_ids = call.position_ids
        if position_ids is None:
            position_ids = self.adapter.default_position_ids(hidden.shape[0], query_length, hidden.device) + cached
        position_ids = self.adapter.renumber_positions(position_ids, segment.shift[:, None])
        position_embeddings = tuple(self.adapter.rotary_embeddings(hidden, position_ids, layer_type))
        return mask, position_embeddings, position_ids


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


@torch.compiler.disable  # inductor's value-range analysis evaluates the wrapping products exactly: int64 overflow
def _sample_keys(input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B,)`` int64 fingerprint of each sample's real tokens, counted from its end (so padding does not matter).

    It runs eagerly under torch.compile (one graph break in a compiled prefill): inductor bounds ``from_end * A``
    in exact integers and fails with "too big to convert to int64_t" on the intended wrap-around.
    """
    from_end = torch.arange(input_ids.shape[1], 0, -1, device=input_ids.device)  # 1-based distance from the end
    weights = from_end * 6364136223846793005 + 1442695040888963407  # int64 arithmetic wraps: a fixed hash
    return (input_ids.long() * weights * valid.long()).sum(1)
