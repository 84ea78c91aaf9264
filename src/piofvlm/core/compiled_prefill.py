"""The opt-in compiled post-prune prefill (issue 25 item 3): ``method.apply(model, compile_prefill=...)``.

After the first prune point the decoder layers of a prefill run on the kept sequence, whose length is fixed by the
budget and the text (``B x (text + kept visual tokens)``), so their forward can be compiled with static shapes. With
the option set, the handle replaces, on this model instance only, the ``forward`` of every decoder layer from the
first prune point on by a dispatcher:

* in a pruned prefill (after the selection, outside a method's own calls of a layer) it calls
  ``torch.compile(type(layer).forward)`` with the options given (default ``dynamic=False``: static shapes; on a GPU
  ``mode="reduce-overhead"`` adds CUDA graphs);
* everywhere else (decoding, the layers before the prune point are not wrapped at all, a method's proxy call, a forward
  the user compiled as a whole) it calls the layer's own forward.

The layers' hooks (the mechanism's own pre-hooks that rebuild masks, positions and rotary tables) run eagerly, outside
the compiled code, as always; the compiled code is the layer's forward alone: attention (with its KV-cache write),
MLP, norms. Each layer gets its own compiled function (its own code object: a layer's index is a constant of its
graph, and one code object would hit dynamo's recompile limit after 8 layers), kept per layer module and options
(weakly), so applying the method again reuses it. A new batch size or kept length compiles again (dynamo's
``recompile_limit``, 8 per layer, then that layer runs eagerly with dynamo's warning); pass ``{"dynamic": None}`` to
let dynamo generalise the length instead.

Removing the handle restores every ``forward`` (the model is left as it was); the compiled code is only ever called
through the dispatchers, so a later unhooked call never reaches it. Like the hooks, the dispatchers refuse
``copy.deepcopy`` and pickling while the method is applied (:mod:`piofvlm.core.guard`).
"""

from __future__ import annotations

import logging
import types
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.core.guard import guarded

if TYPE_CHECKING:
    from piofvlm.core.handle import PruningHandle

logger = logging.getLogger(__name__)

#: The ``torch.compile`` keywords ``compile_prefill`` accepts.
COMPILE_OPTIONS = ("backend", "mode", "fullgraph", "dynamic", "options")
#: What ``compile_prefill=True`` means: inductor, static shapes.
DEFAULT_OPTIONS: dict[str, Any] = {"dynamic": False}
#: Modes whose code replays CUDA graphs: their outputs live in the graphs' memory pool and are copied out.
_GRAPHED_MODES = ("reduce-overhead", "max-autotune")

# layer module -> (options key -> compiled function); weak, so nothing outlives the model.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[str, Callable[..., Any]]] = weakref.WeakKeyDictionary()


def compile_options(value: Any) -> dict[str, Any] | None:
    """``compile_prefill`` as ``torch.compile`` keywords, or ``None`` (off). ``True``: :data:`DEFAULT_OPTIONS`; a
    mapping: those keywords over the defaults. Anything else raises ``ValueError`` quoting it."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(DEFAULT_OPTIONS)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(COMPILE_OPTIONS))
        if unknown:
            raise ValueError(
                f"compile_prefill: unknown torch.compile option(s) {unknown}; accepted: {list(COMPILE_OPTIONS)}"
            )
        return {**DEFAULT_OPTIONS, **value}
    raise ValueError(
        f"compile_prefill must be True, False or a dict of torch.compile options {list(COMPILE_OPTIONS)} (e.g. "
        f'{{"mode": "reduce-overhead"}}), got {value!r}'
    )


def _call_layer(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's own forward (the function each layer's compiled copy runs)."""
    return type(layer).forward(layer, *args, **kwargs)


def _compiled_for(layer: nn.Module, index: int, options: dict[str, Any]) -> Callable[..., Any]:
    key = repr(sorted(options.items()))
    per_layer = _COMPILED.setdefault(layer, {})
    if key not in per_layer:
        # A code object of its own per layer: dynamo keeps compiled code and counts recompiles per code object.
        code = _call_layer.__code__.replace(co_name=f"piofvlm_compiled_layer_{index}")
        function = types.FunctionType(code, _call_layer.__globals__, code.co_name)
        per_layer[key] = torch.compile(function, **options)
    return per_layer[key]


class CompiledPrefill:
    """The dispatchers one handle put on its model's decoder layers (see the module docstring)."""

    def __init__(self, handle: PruningHandle, options: dict[str, Any]) -> None:
        self.options = options
        self.graphed = options.get("mode") in _GRAPHED_MODES
        self._restore: list[nn.Module] = []
        adapter = handle.adapter
        first = handle.method.layers[0]
        layers = {index: adapter.layers[index] for index in range(first, adapter.num_layers)}
        replaced = [index for index, layer in layers.items() if "forward" in vars(layer)]
        if replaced:
            raise ValueError(
                f"compile_prefill: decoder layer(s) {replaced} already have a forward of their own (accelerate "
                "offloading, or a layer compiled by hand); apply the method without compile_prefill, or compile "
                "the model as a whole"
            )
        for index, layer in layers.items():
            layer.forward = self._dispatcher(handle, layer, index)  # type: ignore[method-assign]
            self._restore.append(layer)

    def _dispatcher(self, handle: PruningHandle, layer: nn.Module, index: int) -> Callable[..., Any]:
        compiled = _compiled_for(layer, index, self.options)
        own = types.MethodType(type(layer).forward, layer)
        graphed = self.graphed

        def forward(*args: Any, **kwargs: Any) -> Any:
            call = handle._call
            if (
                call is None
                or not call.prefill
                or not call.pruned
                or handle._selecting
                or torch.compiler.is_compiling()
            ):
                return own(*args, **kwargs)
            output = compiled(layer, *args, **kwargs)
            if graphed:  # copy out of the CUDA graphs' pool what outlives the next replay of this graph
                transformers_compat.own_cache_layer(transformers_compat.cache_from_kwargs(kwargs), index)
                output = (
                    tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in output)
                    if isinstance(output, tuple)
                    else output.clone()
                )
            return output

        # Guarded like every hook: a deep copy (or pickle) of a wrapped layer would carry a forward bound to this
        # layer and handle; it is refused with the same message while the method is applied.
        return guarded(forward)

    def remove(self) -> None:
        """Give every wrapped layer its own forward back."""
        for layer in self._restore:
            vars(layer).pop("forward", None)
        self._restore.clear()
