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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.core.cache import (
    _LAYOUT_ATTR,
    _STATIC_OWNER_ATTR,
    CacheLayouts,
    _CacheLayout,
    _pruned_cache_class,
    static_length_of,
)
from piofvlm.core.compiled_prefill import CompiledPrefill, compile_options
from piofvlm.core.guard import guarded
from piofvlm.core.labels import LabelsOverKept
from piofvlm.core.prefill import Prefill, _Call
from piofvlm.core.threads import PerThread, new_state

if TYPE_CHECKING:
    from piofvlm.adapters.base import ModelAdapter
    from piofvlm.core.context import StageRecord
    from piofvlm.methods.base import TokenPruner

logger = logging.getLogger(__name__)

# Models that currently carry a handle; weak, so nothing outlives the model.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PruningHandle] = weakref.WeakKeyDictionary()


class PruningHandle(Prefill, CacheLayouts, LabelsOverKept):
    """Hooks of one method on one model instance. Use :meth:`remove` (or the method's context manager) to undo.

    Any number of threads may call the model at once: what a call owns is per thread (``PerThread``), see
    ``docs/threads.md``.
    """

    _pending: PerThread[tuple[torch.Tensor | None, dict[str, Any]] | None] = PerThread(lambda: None)
    _call: PerThread[_Call | None] = PerThread(lambda: None)
    #: The layout of this thread's last prefill, as a static cache decodes it (its decode plan computed once).
    _static_layout: PerThread[_CacheLayout | None] = PerThread(lambda: None)

    def __init__(
        self,
        method: TokenPruner,
        model: nn.Module,
        adapter: ModelAdapter,
        on_prefill: Callable[[list[StageRecord]], None] | None = None,
        compile_prefill: bool | dict[str, Any] = False,
    ) -> None:
        """``on_prefill(records)`` is called at the start of each prefill with the list the stages of that call fill
        (the calling thread's :attr:`records`); ``Method.apply`` passes its ``remember_selection``.
        ``compile_prefill``: compile the decoder layers after the first prune point for pruned prefills
        (``core/compiled_prefill.py``; ``True`` or ``torch.compile`` options)."""
        options = compile_options(compile_prefill)
        if model in _ACTIVE:
            raise RuntimeError(
                "a piofvlm method is already applied to this model; remove its handle (or leave its `with` block) "
                "before applying another"
            )
        self._per_thread = new_state()  # the state below marked PerThread: one copy per calling thread
        self.method = method
        self.model = model
        self.adapter = adapter
        self.on_prefill = on_prefill
        self._stage_at_layer = {layer: stage for stage, layer in enumerate(method.layers)}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._compiled: CompiledPrefill | None = None
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
            if options is not None:
                self._compiled = CompiledPrefill(self, options)
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
        if self._compiled is not None:
            self._compiled.remove()
            self._compiled = None
        self._call = None
        self._pending = None
        self._segments = []
        self._static_layout = None
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
        static_length = static_length_of(cache)
        if static_length is not None and self.adapter.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                "piofvlm supports a static KV cache with attn_implementation 'sdpa' or 'eager', not "
                f"{self.adapter.attn_implementation!r}; use the default dynamic cache"
            )
        attention_mask = kwargs.get("attention_mask")
        outer_mask = (pending[1] if pending is not None else {}).get("attention_mask")
        prepared = isinstance(attention_mask, dict) or (
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
        )
        if prepared and self.adapter.rebuilds_layer_type_masks:
            # Per-layer-type masks the multimodal model built (Gemma 3; PaliGemma's one 4-D prefix-LM mask): rebuilt
            # from its 2-D padding mask.
            if outer_mask is not None and not (isinstance(outer_mask, torch.Tensor) and outer_mask.dim() == 2):
                static = " (generate() prepared it for a static KV cache: use the default dynamic cache)"
                raise ValueError(
                    "piofvlm needs a 2-D padding attention_mask (or None); a custom or prepared 4-D mask was given"
                    + (static if static_length is not None else "")
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
            self._static_layout = None  # this thread's static layout is the one this prefill makes
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
            layout = self._static_layout
            if layout is None or layout.segments is not self._segments:
                layout = _CacheLayout(self._segments, self._prompt_batch, self.method.positions == "renumber")
                self._static_layout = layout
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
            plan=layout.decode_plan(self.adapter),
            layout_ref=layout,
        )

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

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call = self._call
            if call is None:
                return None
            if not call.prefill:  # decoding: no selection runs, the cheapest path (once per layer and token)
                return self._decode_layer(index, call, args, kwargs)
            if self._selecting:
                return None
            return self._prefill_layer(index, call, args, kwargs)

        return hook
