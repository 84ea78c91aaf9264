"""The one place that touches ``transformers`` internals which move between releases.

piofvlm hooks into stock models, so it reads keyword names, output fields and helper functions that are not public
API. Every such internal is reached through one function here; adapters keep their family's module layout but call
this module for anything that changed (or may change) between releases. ``tests/test_transformers_compat.py`` has
one contract test per function that fails with a message naming the internal and the installed version, so the next
release that moves something is diagnosed in seconds.

Versions run with the whole fast suite are listed in ``docs/versions.md``; :data:`TESTED_RANGE` is the declared range
(``pyproject.toml``), checked at import by :func:`check_version`.

**Formulas piofvlm owns** (it only needs the arithmetic, so a release that wraps or moves the function cannot break
it): the rotary application (:func:`apply_rotary_halves`, :func:`apply_rotary_pairs`; :func:`rotary_function` still
checks them bit for bit against the family's ``apply_rotary_pos_emb``, so a model whose attention computes something
else is refused rather than approximated) and the RMS norm of the closed-form proxy (``methods/pio/proxy_loss.
_rms_norm_formula``, recognised per module on a probe; only its epsilon is read, :func:`norm_epsilon`).

**Internals that remain, and why** (each behind one function here, with a contract test):

* keyword and field names the hooks see (``cache`` / ``past_key_values``, output cache fields): the hooks receive
  what the model passes, piofvlm cannot choose the names;
* ``Cache`` layouts (dynamic, sliding, static, linear-attention layers, Gemma 4's ``DummyLayer``; which layer
  ``get_seq_length`` reads, how a layer is padded): a pruned cache must stay a stock cache object that ``generate()``
  and the model keep using between calls;
* mask functions (``masking_utils``) and the Gemma block-id helpers: the rebuilt masks must equal the model's own bit
  for bit (keep-all identity), including its sdpa / eager / flash formats;
* the decoder layers' module names (``self_attn`` with ``q/k/v/o_proj``, ``head_dim``, ``scaling``, per-head
  norms; ``input_layernorm``, ``post_attention_layernorm``, ``mlp``): the fast PIO proxy and the explicit-attention
  methods recompute parts of a stock layer with its own modules (:func:`layer_attention_parts`, ...);
* the recurrent padding mask, the Qwen vision rotary and window index, the image-processor tiling, pre-encoded
  features (``mm_encoder_outputs``), ``CompileConfig``: piofvlm reuses what the model or ``generate()`` computes or
  expects, so owning a copy would let the two drift apart silently.

``piofvlm serve`` uses no serving internal of transformers (``transformers.cli.serving`` was rewritten in 5.25): it
owns its app and chat-completion core and calls only public API (``from_pretrained``, the processor's
``apply_chat_template``, ``generate`` with a ``TextStreamer``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.version import Version

logger = logging.getLogger(__name__)

#: The declared, tested range of transformers versions: ``floor <= version < ceiling`` (same as pyproject.toml).
TESTED_RANGE: tuple[str, str] = ("5.17.0", "5.26")
TRANSFORMERS_VERSION: str = transformers.__version__
#: Releases on which the whole fast suite passed (docs/versions.md); the last one is what doctor recommends pinning.
KNOWN_GOOD_TRANSFORMERS: tuple[str, ...] = ("5.17.0", "5.24.0", "5.25.0")


class TransformersInternalsError(RuntimeError):
    """A transformers internal piofvlm relies on is missing or changed in the installed release."""


def _broken(internal: str, fix: str) -> TransformersInternalsError:
    return TransformersInternalsError(
        f"transformers {TRANSFORMERS_VERSION} changed {internal}; piofvlm.transformers_compat.{fix} must learn it. "
        f"Install a tested release (pip install 'transformers>={TESTED_RANGE[0]},<{TESTED_RANGE[1]}') or report an "
        "issue."
    )


# ------------------------------------------------------------------------------------------------------- versions
def version_status(version: str | None = None) -> str:
    """``"tested"``, ``"older"`` (below the floor) or ``"newer"`` (at or above the ceiling) for ``version``."""
    installed = Version(version or TRANSFORMERS_VERSION)
    if installed < Version(TESTED_RANGE[0]):
        return "older"
    if installed >= Version(TESTED_RANGE[1]):
        return "newer"
    return "tested"


def version_message(version: str | None = None) -> str | None:
    """A warning for an installed version outside :data:`TESTED_RANGE`, else ``None``."""
    version = version or TRANSFORMERS_VERSION
    status = version_status(version)
    if status == "tested":
        return None
    floor, ceiling = TESTED_RANGE
    where = (
        f"older than the oldest tested ({floor})" if status == "older" else f"newer than the tested range (<{ceiling})"
    )
    return (
        f"transformers {version} is {where}; piofvlm hooks into transformers internals and may fail or give wrong "
        f"results. Run `piofvlm doctor` to check this installation, or pin 'transformers>={floor},<{ceiling}'."
    )


def check_version() -> None:
    """Warn (``logging`` and :mod:`warnings`) once if the installed transformers is outside the tested range."""
    message = version_message()
    if message is not None:
        import warnings

        warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------------------------ KV cache
# 5.24 renamed the cache argument of the language model and the decoder layers ``past_key_values`` -> ``cache``
# (the old name is still accepted until 5.40, but hooks receive the new one); model outputs' field likewise.
_CACHE_KWARGS = ("cache", "past_key_values")


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The KV cache a language model or decoder layer was called with (``cache=`` or ``past_key_values=``)."""
    for name in _CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    parameters = inspect.signature(cls.forward).parameters
    for name in _CACHE_KWARGS:
        if name in parameters:
            return name
    raise _broken(f"the KV-cache argument of {cls.__name__}.forward (neither of {_CACHE_KWARGS})", "cache_kwarg_name")


def cache_kwarg_name(module: torch.nn.Module) -> str:
    """The name under which ``module``'s forward takes the KV cache: ``"cache"`` (5.24+) or ``"past_key_values"``."""
    return _cache_kwarg_of(type(module))


def without_cache(module: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments that run ``module`` (a decoder layer) without reading or writing a KV cache."""
    return {cache_kwarg_name(module): None, "use_cache": False}


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (``.cache`` from 5.24, ``.past_key_values`` before); None if it has none."""
    keys = output.keys() if hasattr(output, "keys") else ()  # a ModelOutput lists its non-None fields
    for name in _CACHE_KWARGS:
        if name in keys:
            return output[name]
    for name in _CACHE_KWARGS:
        if name in getattr(output, "__dataclass_fields__", {}):
            return getattr(output, name)  # the declared field, left empty (use_cache=False)
    raise _broken(f"the KV-cache field of {type(output).__name__}", "output_cache")


def is_dynamic_cache(cache: Any) -> bool:
    """Whether ``cache`` is a plain ``DynamicCache`` whose every layer is a ``DynamicLayer`` (grows by concatenation)
    or a ``DynamicSlidingWindowLayer`` (keeps the last ``sliding_window - 1`` slots it saw, Gemma 3's local layers).

    The pruning mechanism gives the layers after a prune point KV caches of their own, shorter lengths; only this
    layout can hold that. Static, quantized and offloaded caches are not of it."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not isinstance(layers, list):
        return False
    linear = _linear_attention_layer_class()  # Qwen3.5's Gated DeltaNet layers: fixed-size states, no sequence
    # Gemma 4's KV-shared layers hold no cache (``DummyLayer``): they read an earlier layer's.
    from transformers import cache_utils

    dummy = getattr(cache_utils, "DummyLayer", None)
    return all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
        or (linear is not None and type(layer) is linear)
        or (dummy is not None and type(layer) is dummy)
        for layer in layers
    )


def own_cache_layer(cache: Any, layer_idx: int) -> None:
    """Replace the keys and values layer ``layer_idx`` of a dynamic ``cache`` holds by copies (a compiled layer that
    replays a CUDA graph wrote tensors of the graph's memory pool, which its next replay overwrites). Nothing for
    another kind of cache or layer."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or layer_idx >= len(layers):
        return
    layer = layers[layer_idx]
    for name in ("keys", "values"):
        value = getattr(layer, name, None)
        if isinstance(value, torch.Tensor):
            setattr(layer, name, value.clone())


def _linear_attention_layer_class() -> type | None:
    from transformers import cache_utils

    return getattr(cache_utils, "LinearAttentionLayer", None)


def cache_length_layer(cache: Any) -> int:
    """The layer whose length ``cache.get_seq_length()`` reports (``generate()`` and the model read the prompt length
    there): layer 0, unless layer 0 is a linear-attention layer that does not count its tokens (5.17-5.24: ``Cache.
    get_seq_length`` skips such layers and reads the first attention layer). From 5.25 a ``LinearAttentionLayer``
    counts the tokens it saw (``cumulative_length_linear``, its own ``get_seq_length``) and the cache reads layer 0
    whatever its kind."""
    linear = _linear_attention_layer_class()
    layers = getattr(cache, "layers", None) or []
    for index, layer in enumerate(layers):
        if linear is None or not isinstance(layer, linear) or _counts_tokens(layer):
            return index
    return 0


def _counts_tokens(layer: Any) -> bool:
    """Whether a linear-attention cache layer reports a sequence length (5.25+: ``cumulative_length_linear``)."""
    return callable(getattr(layer, "get_seq_length", None)) and hasattr(layer, "cumulative_length_linear")


def linear_attention_states(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv_state, recurrent_state)`` of linear-attention layer ``layer`` of a cache (``Cache.get_conv_state`` /
    ``get_recurrent_state`` in 5.24; before, e.g. 5.17, the layer's ``conv_states[0]`` / ``recurrent_states[0]``):
    Gated DeltaNet's ``(B, conv_dim, kernel)`` and ``(B, H_v, d_k, d_v)``."""
    get_conv, get_recurrent = getattr(cache, "get_conv_state", None), getattr(cache, "get_recurrent_state", None)
    if get_conv is not None and get_recurrent is not None:
        conv, recurrent = get_conv(layer), get_recurrent(layer)
    else:
        cache_layer = cache.layers[layer] if layer < len(getattr(cache, "layers", ())) else None
        conv_states, recurrent_states = (
            getattr(cache_layer, "conv_states", None),
            getattr(cache_layer, "recurrent_states", None),
        )
        if not isinstance(conv_states, dict) or not isinstance(recurrent_states, dict):
            raise _broken(
                f"{type(cache).__name__}.get_conv_state / get_recurrent_state (or its layers' conv_states / "
                "recurrent_states)",
                "linear_attention_states",
            )
        conv, recurrent = conv_states.get(0), recurrent_states.get(0)
    if not isinstance(conv, torch.Tensor) or not isinstance(recurrent, torch.Tensor):
        raise _broken("the conv / recurrent states of a linear-attention layer (tensors)", "linear_attention_states")
    return conv, recurrent


def pad_cache_layer(cache: Any, layer_idx: int, count: int) -> None:
    """Make layer ``layer_idx`` of a dynamic cache count ``count`` more slots before its first one (masked by whoever
    reads the cache). ``DynamicLayer.keys``/``.values`` are ``(B, H, S, D)`` tensors: ``count`` zero slots are
    prepended. A ``DynamicSlidingWindowLayer`` counts the slots it saw in ``cumulative_length`` and keeps only its
    last ``sliding_window - 1``: the count grows by ``count`` and zero slots are prepended only as far as the window
    reaches back into them."""
    if count <= 0:
        return
    if not is_dynamic_cache(cache):
        raise _broken(f"the layers of {type(cache).__name__} (expected DynamicLayer)", "pad_cache_layer")
    layer = cache.layers[layer_idx]
    linear = _linear_attention_layer_class()
    if linear is not None and isinstance(layer, linear):
        # A linear-attention layer holds fixed-size states, no slots: only its token count (5.25+) grows.
        counter = getattr(layer, "cumulative_length_linear", None)
        if not isinstance(counter, torch.Tensor) or not _counts_tokens(layer):
            raise _broken("LinearAttentionLayer.cumulative_length_linear (a tensor count)", "pad_cache_layer")
        counter.add_(count)  # in place: the layer may have marked it as a static address
        return
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or not isinstance(values, torch.Tensor):
        raise _broken("DynamicLayer.keys/values (expected (B, H, S, D) tensors)", "pad_cache_layer")
    if getattr(layer, "is_sliding", False):
        window, seen = getattr(layer, "sliding_window", None), getattr(layer, "cumulative_length", None)
        if not isinstance(window, int) or not isinstance(seen, int):
            raise _broken("DynamicSlidingWindowLayer.sliding_window/cumulative_length (ints)", "pad_cache_layer")
        layer.cumulative_length = seen + count
        count = max(0, min(seen + count, window - 1) - keys.shape[2])
    layer.keys = torch.cat([keys.new_zeros(*keys.shape[:2], count, keys.shape[3]), keys], dim=2)
    layer.values = torch.cat([values.new_zeros(*values.shape[:2], count, values.shape[3]), values], dim=2)


def visible_past_keys(cache: Any, layer_idx: int, query_length: int) -> int:
    """How many cached keys layer ``layer_idx`` attends to besides the ``query_length`` new ones: everything it
    holds for a full-attention layer, at most ``sliding_window - 1`` for a sliding one (``Cache.get_mask_sizes``,
    ``(query_length, layer_idx) -> (kv_length, kv_offset)`` in 5.x)."""
    try:
        kv_length, _ = cache.get_mask_sizes(query_length, layer_idx)
    except TypeError as error:
        raise _broken("Cache.get_mask_sizes(query_length, layer_idx)", "visible_past_keys") from error
    return int(kv_length) - query_length


# ---------------------------------------------------------------------------------------------------------- norms
def norm_epsilon(norm: torch.nn.Module) -> float | None:
    """The epsilon of an RMS norm module: ``variance_epsilon`` (Llama's, and Gemma 4's from 5.25) or ``eps`` (Gemma
    4's up to 5.24, Gemma 3's); ``None`` when it has neither (not an RMS norm piofvlm can write in closed form)."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    return None


# ----------------------------------------------------------------------------------------- decoder-layer parts
@dataclass(frozen=True)
class AttentionParts:
    """The pieces of a Llama-style self-attention module that the fast PIO proxy and the explicit-attention methods
    recompute with (:func:`attention_parts`): projections, optional per-head norms (Qwen3), head size, scaling."""

    module: torch.nn.Module
    q_proj: torch.nn.Module
    k_proj: torch.nn.Module
    v_proj: torch.nn.Module
    o_proj: torch.nn.Module
    #: Per-head RMS norms on queries / keys before the rotation (Qwen3, Gemma 3), or None.
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    head_dim: int
    #: The factor on ``q k^T`` (``head_dim ** -0.5`` for Llama, ``query_pre_attn_scalar ** -0.5`` for Gemma 3).
    scaling: float


def attention_parts(attn: torch.nn.Module) -> AttentionParts:
    """The :class:`AttentionParts` of a Llama-style attention module (``q/k/v/o_proj``, ``head_dim``, ``scaling``,
    optional ``q_norm`` / ``k_norm``): what the decoder layers of every family with a fast proxy carry in 5.17-5.25."""
    try:
        return AttentionParts(
            attn,
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            getattr(attn, "q_norm", None),
            getattr(attn, "k_norm", None),
            int(attn.head_dim),
            attn.scaling,
        )
    except AttributeError as error:
        raise _broken(
            f"{type(attn).__name__}'s layout (q_proj / k_proj / v_proj / o_proj, head_dim, scaling)", "attention_parts"
        ) from error


def _layer_module(layer: torch.nn.Module, name: str, fix: str) -> torch.nn.Module:
    module = getattr(layer, name, None)
    if module is None:
        raise _broken(f"{type(layer).__name__}'s layout (no {name})", fix)
    return module


def layer_attention_parts(layer: torch.nn.Module) -> AttentionParts:
    """:func:`attention_parts` of decoder layer ``layer``'s self-attention (``layer.self_attn``)."""
    return attention_parts(_layer_module(layer, "self_attn", "layer_attention_parts"))


def layer_input_norm(layer: torch.nn.Module) -> torch.nn.Module:
    """The norm a pre-norm decoder layer applies to its input before its token mixer (``input_layernorm``)."""
    return _layer_module(layer, "input_layernorm", "layer_input_norm")


def layer_post_attention_norm(layer: torch.nn.Module) -> torch.nn.Module:
    """The norm a Llama-style decoder layer applies to the residual before its MLP (``post_attention_layernorm``)."""
    return _layer_module(layer, "post_attention_layernorm", "layer_post_attention_norm")


def layer_mlp(layer: torch.nn.Module) -> torch.nn.Module:
    """A decoder layer's feed-forward block (``mlp``: dense, or a per-token MoE block)."""
    return _layer_module(layer, "mlp", "layer_mlp")


# ---------------------------------------------------------------------------------------------------------- masks
def _mask_from_function(
    config: Any,
    key_valid: torch.Tensor,
    query_length: int,
    dtype: torch.dtype,
    mask_function: Any,
    *,
    kv_length: int | None = None,
    q_offset: int | None = None,
    kv_offset: int = 0,
    **options: Any,
) -> torch.Tensor | None:
    """``mask_function`` materialised by the model's own mask interface (``masking_utils.ALL_MASK_ATTENTION_FUNCTIONS``
    of ``config._attn_implementation``) over ``key_valid`` ``(B, L)`` keys: ``kv_length`` of them (default ``L``)
    from ``kv_offset``, the queries from ``q_offset`` (default ``L - query_length``); ``options`` are the interface's
    other arguments (``allow_is_causal_skip``, ``use_vmap``, ``local_size``)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    batch_size, length = key_valid.shape
    return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
        batch_size=batch_size,
        q_length=query_length,
        kv_length=length if kv_length is None else kv_length,
        q_offset=length - query_length if q_offset is None else q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=key_valid,
        dtype=dtype,
        config=config,
        device=key_valid.device,
        **options,
    )


def causal_padding_mask(
    config: Any, key_valid: torch.Tensor, query_length: int, dtype: torch.dtype, q_offset: int | None = None
) -> torch.Tensor | None:
    """Causal mask over ``key_valid`` keys whose last ``query_length`` keys are the queries, built by the model's
    own mask interface (``masking_utils``: ``q_length``/``q_offset`` arguments since 5.4).

    Args:
        config: the text config (its ``_attn_implementation`` picks the format).
        key_valid: ``(B, L_kv)`` bool, False for padding keys.
        query_length: number of queries ``L_q`` (the last ``L_q`` keys unless ``q_offset`` is given).
        dtype: dtype of the hidden states (eager masks are additive in this dtype).
        q_offset: key index of the first query (a static cache: the queries sit at its write position and the keys
            run to its full length); default ``L_kv - L_q``.

    Returns:
        sdpa: ``(B, 1, L_q, L_kv)`` bool or None; eager: ``(B, 1, L_q, L_kv)`` float; flash: ``(B, L_kv)`` or None.
    """
    from transformers.masking_utils import causal_mask_function

    return _mask_from_function(
        config,
        key_valid,
        query_length,
        dtype,
        causal_mask_function,
        q_offset=q_offset,
        allow_is_causal_skip=True,
        use_vmap=False,
    )


def layer_type_mask(
    config: Any,
    key_valid: torch.Tensor,
    query_length: int,
    dtype: torch.dtype,
    sliding_window: int | None = None,
    block_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The mask of a full-attention (``sliding_window=None``) or sliding-window layer over ``key_valid`` keys whose
    last ``query_length`` keys are the queries, composed as Gemma 3 composes it (``modeling_gemma3.
    create_masks_for_vision_model``, ``masking_utils.create_sliding_window_causal_mask``):

    * with ``block_ids`` ``(B, L_kv)`` (image block of each key, -1 for text): full = causal OR same block; sliding =
      (causal OR same block) AND ``kv > q - sliding_window``; always materialised;
    * without: causal, or causal AND the window (``sliding_window_causal_mask_function``, ``local_size``).
    """
    from transformers import masking_utils as mu

    mask_function: Any = mu.causal_mask_function
    extra: dict[str, Any] = {"allow_is_causal_skip": True, "use_vmap": False}
    if block_ids is not None:
        mask_function = mu.or_masks(mask_function, mu.blockwise_overlay(block_ids))
        extra = {"allow_is_causal_skip": False, "use_vmap": False}
        if sliding_window is not None:
            mask_function = mu.and_masks(mask_function, mu.sliding_window_overlay(sliding_window))
            extra["use_vmap"] = True
    elif sliding_window is not None:
        mask_function = mu.sliding_window_causal_mask_function(sliding_window)
        extra["local_size"] = sliding_window
    return _mask_from_function(config, key_valid, query_length, dtype, mask_function, **extra)


def prefix_lm_mask(
    config: Any,
    key_valid: torch.Tensor,
    query_length: int,
    dtype: torch.dtype,
    sliding_window: int | None = None,
    block_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The mask of a PaliGemma layer over ``key_valid`` keys whose last ``query_length`` keys are the queries, composed
    as ``modeling_paligemma.PaliGemmaModel.forward`` composes it through ``create_causal_mask`` /
    ``create_sliding_window_causal_mask`` with ``block_sequence_ids``: full = causal OR same block; sliding = (causal
    AND ``kv > q - sliding_window``) OR same block (the window does not cut the prefix block, unlike Gemma 3's image
    blocks: :func:`layer_type_mask`). Without ``block_ids`` (decoding): :func:`layer_type_mask`'s causal masks."""
    if block_ids is None:
        return layer_type_mask(config, key_valid, query_length, dtype, sliding_window=sliding_window)
    from transformers import masking_utils as mu

    if sliding_window is None:
        mask_function: Any = mu.causal_mask_function
        extra: dict[str, Any] = {}
    else:
        mask_function = mu.sliding_window_causal_mask_function(sliding_window)
        extra = {"local_size": sliding_window}
    mask_function = mu.or_masks(mask_function, mu.blockwise_overlay(block_ids))
    return _mask_from_function(
        config, key_valid, query_length, dtype, mask_function, allow_is_causal_skip=False, use_vmap=False, **extra
    )


def chunked_causal_mask(
    config: Any,
    key_valid: torch.Tensor,
    query_length: int,
    dtype: torch.dtype,
    chunk_size: int,
    visible: int | None = None,
) -> torch.Tensor | None:
    """The mask of a chunked-attention layer (Llama 4) as ``masking_utils.create_chunked_causal_mask`` builds it:
    causal AND the same chunk, chunks of ``chunk_size`` slots counted from each sample's first real slot
    (``key_valid`` ``(B, L)``: every slot the layer has seen, left padding first, the last ``query_length`` are the
    queries), over the last ``visible`` keys (default all; a sliding cache presents its last ``chunk_size - 1`` past
    keys: ``kv_offset = L - visible`` as ``Cache.get_mask_sizes`` gives it)."""
    from transformers import masking_utils as mu

    length = key_valid.shape[1]
    visible = length if visible is None else visible
    left_padding = (key_valid.long().cumsum(-1) == 0).sum(-1)
    return _mask_from_function(
        config,
        key_valid,
        query_length,
        dtype,
        mu.chunked_causal_mask_function(chunk_size, left_padding),
        kv_length=visible,
        kv_offset=length - visible,
        allow_is_causal_skip=True,
        local_size=chunk_size,
        use_vmap=False,
    )


def image_block_ids(token_type_ids: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` long: the index of the image block each token of a Gemma 3 prompt belongs to (-1 for text), from
    its ``token_type_ids`` (``modeling_gemma3.get_block_sequence_ids_for_mask``): tokens of one block attend to each
    other bidirectionally in every layer."""
    from transformers.models.gemma3 import modeling_gemma3

    function = getattr(modeling_gemma3, "get_block_sequence_ids_for_mask", None)
    if function is None:
        raise _broken("modeling_gemma3.get_block_sequence_ids_for_mask", "image_block_ids")
    return function(token_type_ids, device=token_type_ids.device)


def vision_block_ids(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` long: the index of the image block each token of a Gemma 4 prompt belongs to (-1 for text), from
    its ``mm_token_type_ids`` (1 image, 2 video: ``modeling_gemma4.get_block_sequence_ids_for_mask``): tokens of one
    block attend to each other bidirectionally in the sliding layers."""
    from transformers.models.gemma4 import modeling_gemma4

    function = getattr(modeling_gemma4, "get_block_sequence_ids_for_mask", None)
    if function is None:
        raise _broken("modeling_gemma4.get_block_sequence_ids_for_mask", "vision_block_ids")
    return function(mm_token_type_ids, device=mm_token_type_ids.device)


def recurrent_padding_mask(config: Any, valid: torch.Tensor) -> torch.Tensor | None:
    """The 2-D padding mask linear-attention layers (Qwen3.5's Gated DeltaNet) get for a prefill whose real tokens are
    ``valid`` ``(B, S)``, built by the model's own ``masking_utils.create_recurrent_attention_mask`` (5.x): ``(B, S)``
    long (the layers zero the padded slots' inputs), or None when nothing is padded."""
    from transformers import masking_utils

    create = getattr(masking_utils, "create_recurrent_attention_mask", None)
    if create is None:
        raise _broken("masking_utils.create_recurrent_attention_mask", "recurrent_padding_mask")
    shape_only = valid.new_empty(*valid.shape, 0, dtype=torch.float32)  # (B, S, 0): only its length is read
    return create(config=config, inputs_embeds=shape_only, attention_mask=valid.long(), cache=None)


def static_cache_length(cache: Any) -> int | None:
    """The fixed key length of a static KV cache (``StaticCache``, ``cache_implementation="static"``), ``None`` for a
    growing one (``DynamicCache``) or no cache.

    Static layers (``cache_utils.StaticLayer``, 5.x) keep one write position per layer (``cumulative_length``) and
    return their whole ``max_cache_len`` buffer of keys, so every layer's mask spans ``max_cache_len`` keys. Sliding
    static layers (and quantized or linear-attention layers) are refused: their key layout is not a plain prefix.
    """
    from transformers import cache_utils

    layers = getattr(cache, "layers", None)
    if cache is None or not layers:
        return None
    static = [isinstance(layer, cache_utils.StaticLayer) for layer in layers]
    if not any(static):
        return None
    if not all(static) or any(getattr(layer, "is_sliding", False) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise ValueError(
            f"piofvlm supports static KV caches of full-attention layers only (StaticLayer); this cache has {kinds}. "
            "Use cache_implementation='static' on a model without sliding-window or linear-attention layers, or the "
            "default dynamic cache"
        )
    lengths = {int(layer.max_cache_len) for layer in layers}
    if len(lengths) != 1:
        raise _broken(f"StaticLayer.max_cache_len (layers differ: {sorted(lengths)})", "static_cache_length")
    return lengths.pop()


def static_cache_position(cache: Any, layer: int) -> Any:
    """Where static layer ``layer`` writes its next keys: the tokens it holds (a 0-d tensor, not a Python int, so
    that compiled decoding does not specialise on it)."""
    position = getattr(cache.layers[layer], "cumulative_length", None)
    if not isinstance(position, torch.Tensor):
        raise _broken("StaticLayer.cumulative_length (a tensor)", "static_cache_position")
    return position


def full_attention_mask(mask: Any) -> Any:
    """The full-attention mask of a mask mapping (``{"full_attention": ...}`` that ``generate()`` prepares for models
    with per-layer-type masks, e.g. Qwen2), or ``mask`` itself when it is not a mapping.

    A mapping with a sliding-window mask is refused: pruning rebuilds one causal mask per segment of layers.
    """
    if not isinstance(mask, dict):
        return mask
    other = sorted(key for key, value in mask.items() if key != "full_attention" and value is not None)
    if other or "full_attention" not in mask:
        raise ValueError(
            f"piofvlm rebuilds full-attention masks only; the model prepared masks for {sorted(mask)} (sliding-window "
            "layers are not supported)"
        )
    return mask["full_attention"]


# ---------------------------------------------------------------------------------------------------- compiling
def compile_config(**kwargs: Any) -> Any:
    """A ``transformers.CompileConfig`` that ``generate()`` honours on every device, the CPU included.

    ``generate()`` compiles decoding with a static cache on accelerators only unless the private flag
    ``_compile_all_devices`` is set (5.x); ``kwargs`` go to ``CompileConfig`` (``backend``, ``mode``, ``fullgraph``).
    """
    from transformers import CompileConfig

    config = CompileConfig(**kwargs)
    if not hasattr(config, "_compile_all_devices"):
        raise _broken("CompileConfig._compile_all_devices", "compile_config")
    config._compile_all_devices = True
    return config


def compiled_forward(model: torch.nn.Module) -> str | None:
    """What of ``model`` is compiled, or ``None``: ``torch.compile(model)``, ``module.compile()``,
    ``module.forward = torch.compile(module.forward)``, or the forward ``generate()`` compiled for static-cache
    decoding (``_compiled_call``, made by ``GenerationMixin.get_compiled_call``)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return "the model (torch.compile(model))"
    if "_compiled_call" in model.__dict__:
        return "the model's decoding (generate() with a compile_config or a static cache on an accelerator)"
    for name, module in model.named_modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            return f"{name or 'the model'} (.compile())"
        if hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable"):
            return f"{name or 'the model'}.forward (torch.compile)"
    return None


def reset_compiled(model: torch.nn.Module) -> None:
    """Make the next compiled call of ``model`` trace the hooks now on it.

    torch.compile does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): a graph traced
    before a method's hooks were added keeps running without them (unpruned), and one traced with them keeps running
    them after they are removed. When any part of ``model`` is compiled, this drops ``generate()``'s compiled forward
    and resets torch.compile's caches (``torch.compiler.reset()``, process-wide: other compiled code recompiles on
    its next call).
    """
    what = compiled_forward(model)
    if what is None:
        return
    logger.info("%s is compiled: resetting torch.compile's caches so that it is traced again with the hooks", what)
    model.__dict__.pop("_compiled_call", None)
    torch.compiler.reset()


# ------------------------------------------------------------------------------------------------------- gemma4
#: The first release whose Gemma 4 the ``gemma4`` adapter is tested on. 5.17's differs: ``get_per_layer_inputs``
#: takes other arguments and ``generate()`` runs the KV-shared layers' prefill on every row (no
#: ``_maybe_slice_kv_shared_inputs``); the releases between were not tested with it.
GEMMA4_TESTED_FROM = "5.24.0"


def _family_needs_release(model_type: str, tested_from: str, why: str, version: str | None) -> str | None:
    """Why ``model_type`` models are refused on transformers ``version`` (default: the installed one) when piofvlm
    tests them from ``tested_from`` on, or ``None``; ``why`` (formatted with ``installed``) says what differs below."""
    installed = Version(version or TRANSFORMERS_VERSION)
    if installed >= Version(tested_from):
        return None
    return (
        f"piofvlm supports {model_type} models on transformers >= {tested_from} only (tested there); "
        f"{why.format(installed=installed)} Install pip install 'transformers>={tested_from},<{TESTED_RANGE[1]}'"
    )


def gemma4_unsupported_reason(version: str | None = None) -> str | None:
    """Why ``gemma4`` models are refused on transformers ``version`` (default: the installed one), or ``None``."""
    why = (
        "the Gemma 4 of transformers {installed} lays out its per-layer inputs and its KV-shared prefill differently."
    )
    return _family_needs_release("gemma4", GEMMA4_TESTED_FROM, why, version)


#: First transformers release whose ``Llama4ForConditionalGeneration`` runs (5.24.0's forward reads
#: ``outputs.image_outputs`` off the language model's output and raises on every call) and where piofvlm tests it.
LLAMA4_TESTED_FROM = "5.25.0"


def llama4_unsupported_reason(version: str | None = None) -> str | None:
    """Why ``llama4`` models are refused on transformers ``version`` (default: the installed one), or ``None``."""
    why = (
        "transformers 5.24's Llama4ForConditionalGeneration.forward fails by itself (AttributeError: "
        "'image_outputs'), earlier releases are untested."
    )
    return _family_needs_release("llama4", LLAMA4_TESTED_FROM, why, version)


# ------------------------------------------------------------------------------------------------- rotary tables
def rotary_table_flops(head_dim: int, num_positions: int) -> int:
    """FLOPs of one Llama-style rotary-table computation over ``num_positions`` as ``FlopCounterMode`` counts them.

    Before 5.19 the frequencies were an ``inv_freq @ position_ids`` matmul (``2 * head_dim / 2`` per position); from
    5.19 they are an elementwise product, which the counter does not count.
    """
    if Version(TRANSFORMERS_VERSION) >= Version("5.19"):
        return 0
    return head_dim * num_positions


_ROTARY_MODULES = {
    "llama": "transformers.models.llama.modeling_llama",
    "qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "qwen3_vl": "transformers.models.qwen3_vl.modeling_qwen3_vl",
    # GLM-4.xV text model: interleaved pairs (``rotate_half_llm``), only the first ``cos.shape[-1]`` dims rotated
    "glm4v": "transformers.models.glm4v.modeling_glm4v",
    "gemma3": "transformers.models.gemma3.modeling_gemma3",  # Llama's rotate_half; q/k normed before rotating
    # Qwen3.5 full-attention layers: Llama-style halves, only the first ``cos.shape[-1]`` dims rotated
    "qwen3_5": "transformers.models.qwen3_5.modeling_qwen3_5",
    # the MoE flagships: the same attention as their dense siblings (GLM-4.5V: Llama's halves, not GLM-4.1V's pairs)
    "qwen3_vl_moe": "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
    "qwen3_5_moe": "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "glm4v_moe": "transformers.models.glm4v_moe.modeling_glm4v_moe",
    # PaliGemma's text models (Gemma, Gemma 2): Llama's rotate_half over the whole head
    "gemma": "transformers.models.gemma.modeling_gemma",
    "gemma2": "transformers.models.gemma2.modeling_gemma2",
}
#: Families whose attention rotates interleaved pairs ``(x0, x1), (x2, x3), ...`` instead of halves.
_PAIRWISE_ROTARY = frozenset({"glm4v"})
#: Families whose tables may cover only the first dims of a head (``partial_rotary_factor``).
_PARTIAL_ROTARY = frozenset({"glm4v", "qwen3_5"})


def _rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """``(-x2, x1)`` for the halves ``(x1, x2)`` of the last dim (Llama's ``rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(-x1, x0, -x3, x2, ...)`` for interleaved pairs (GLM's ``rotate_half_llm``)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int,
    rotate: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    if rotary_dim == q.shape[-1]:
        return (q * cos) + (rotate(q) * sin), (k * cos) + (rotate(k) * sin)
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = (q_rot * cos) + (rotate(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate(k_rot) * sin)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


def apply_rotary_halves(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary application ``t cos + rotate_half(t) sin`` with ``(..., S, r)`` tables unsqueezed at
    ``unsqueeze_dim``; a table narrower than the head (``r < head_dim``) rotates the first ``r`` dims and passes the
    rest (Qwen3.5). The same operations in the same order as transformers' ``apply_rotary_pos_emb`` (bit-equal)."""
    return _apply_rotary(q, k, cos, sin, unsqueeze_dim, _rotate_halves)


def apply_rotary_pairs(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-4.xV's rotary application: as :func:`apply_rotary_halves` with interleaved pairs (``rotate_half_llm``)."""
    return _apply_rotary(q, k, cos, sin, unsqueeze_dim, _rotate_pairs)


@functools.cache
def rotary_function(family: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The rotary application of ``family``'s attention, ``(q, k, cos, sin, unsqueeze_dim=1)`` with ``(B, S, r)``
    tables: piofvlm's own formula (:func:`apply_rotary_halves` or :func:`apply_rotary_pairs`), returned only after
    it was checked bit for bit against the family's ``apply_rotary_pos_emb`` on probes.

    piofvlm owns the formula (it only needs the arithmetic, not transformers' function object), and the probe tells
    whether the model still computes it: a wrapped function that behaves the same is accepted (5.25 decorates it with
    kernels' ``use_kernel_forward_from_hub("rotary_pos_emb")``, a module with a ``(*args, **kwargs)`` signature), a
    function that cannot be called as ``(q, k, cos, sin)`` or gives other values is refused
    (:class:`TransformersInternalsError`). Qwen2-VL/2.5-VL before 5.17 returned ``(3, B, S, head_dim)`` tables and
    applied them with ``apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section)``; from 5.17 the sections are
    merged in the rotary module and attention applies them Llama-style, which is what the fast proxy relies on.
    """
    name = f"{_ROTARY_MODULES[family]}.apply_rotary_pos_emb"
    theirs = getattr(importlib.import_module(_ROTARY_MODULES[family]), "apply_rotary_pos_emb", None)
    ours = apply_rotary_pairs if family in _PAIRWISE_ROTARY else apply_rotary_halves
    if not callable(theirs):
        raise _broken(f"{name} (missing)", "rotary_function")
    generator = torch.Generator().manual_seed(0)
    head_dim = 8
    for rotary_dim in (head_dim, head_dim // 2) if family in _PARTIAL_ROTARY else (head_dim,):
        q, k = (torch.randn(2, 3, 5, head_dim, generator=generator) for _ in range(2))  # (B, H, S, hd)
        cos, sin = (torch.randn(2, 5, rotary_dim, generator=generator) for _ in range(2))  # (B, S, r)
        try:
            with torch.no_grad():
                got = theirs(q, k, cos, sin)
        except Exception as error:
            raise _broken(f"{name} (expected to be called as (q, k, cos, sin): {error})", "rotary_function") from error
        expected = ours(q, k, cos, sin)
        same = (
            isinstance(got, tuple)
            and len(got) == 2
            and all(isinstance(t, torch.Tensor) and torch.equal(t, e) for t, e in zip(got, expected, strict=True))
        )
        if not same:
            raise _broken(
                f"{name} (it no longer computes {ours.__name__} on (B, S, {rotary_dim}) tables)", "rotary_function"
            )
    return ours


def qwen_vision_rotary_function() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Qwen2-VL's vision-tower ``apply_rotary_pos_emb_vision(q, k, cos, sin)``."""
    module = importlib.import_module(_ROTARY_MODULES["qwen2_vl"])
    function = getattr(module, "apply_rotary_pos_emb_vision", None)
    if function is None:
        raise _broken("modeling_qwen2_vl.apply_rotary_pos_emb_vision", "qwen_vision_rotary_function")
    return function


def vision_window_index(grid_thw: torch.Tensor, vision_config: Any) -> torch.Tensor:
    """Qwen2.5-VL's window permutation of merge units (``transformers.vision_utils``, from 5.9)."""
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError as error:  # before 5.9
        raise _broken("transformers.vision_utils.get_vision_window_index", "vision_window_index") from error
    window_index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=vision_config.spatial_merge_size,
        window_size=vision_config.window_size,
        patch_size=vision_config.patch_size,
    )
    return window_index


# --------------------------------------------------------------------------------------- vision-encoder outputs
def encoded_features(model_kwargs: dict[str, Any], modality: str = "image") -> Any:
    """Per-item features ``generate()`` pre-encoded for this call (``mm_encoder_outputs[modality].pooler_output``,
    5.18+), or ``None`` when the call carries its own pixels."""
    outputs = (model_kwargs.get("mm_encoder_outputs") or {}).get(modality)
    return getattr(outputs, "pooler_output", None)


def has_encoded_features(model_kwargs: dict[str, Any]) -> bool:
    """Whether the call carries features ``generate()`` pre-encoded (``mm_encoder_outputs``)."""
    return bool(model_kwargs.get("mm_encoder_outputs"))


def encode_call_inputs(modality: str, bound: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a ``get_<modality>_features`` call under the names the model's forward uses.

    LLaVA-OneVision's ``get_video_features`` took the video as ``pixel_values`` before 5.18 (``pixel_values_videos``
    since); it is renamed so that image and video inputs of one call do not overwrite each other.
    """
    if modality == "video" and "pixel_values" in bound and "pixel_values_videos" not in bound:
        bound = dict(bound)
        bound["pixel_values_videos"] = bound.pop("pixel_values")
    return bound


# ---------------------------------------------------------------------------------------------- image processors
def tiled_canvas(height: int, width: int, tile: int, tiles: int) -> tuple[int, int]:
    """``(columns, rows)`` of the grid of ``tiles`` tiles GOT-OCR2's / InternVL's image processor cuts a
    ``height x width`` picture into (``get_optimal_tiled_canvas`` restricted to that many tiles: the processor's own
    choice, ties included, among the grids of its tile count)."""
    try:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    except ImportError as error:
        raise _broken("got_ocr2.image_processing_pil_got_ocr2.get_optimal_tiled_canvas", "tiled_canvas") from error
    columns, rows = get_optimal_tiled_canvas((height, width), (tile, tile), tiles, tiles)
    return int(columns), int(rows)


def pil_image_processor_usable(cls: type) -> bool:
    """Whether a ``*ImageProcessorPil`` class works without torchvision (SmolVLM's and Idefics3's did not before
    5.18: they raised an ImportError asking for torchvision)."""
    try:
        cls()
    except ImportError:
        return False
    return True


def image_text_to_text_model_types() -> dict[str, str]:
    """``config.model_type`` -> model class name of every entry of transformers' image-text-to-text auto-mapping
    (what ``AutoModelForImageTextToText`` loads): the families ``piofvlm families`` reports on."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    except ImportError as error:
        raise _broken(
            "transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
            "image_text_to_text_model_types",
        ) from error
    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


# ------------------------------------------------------------------------------------------- config and anyres
def attn_implementation(config: Any) -> str:
    """The attention implementation a (text) config selects: ``config._attn_implementation`` (set by
    ``from_pretrained(attn_implementation=...)`` and ``set_attn_implementation``)."""
    try:
        return config._attn_implementation
    except AttributeError as error:
        raise _broken("PretrainedConfig._attn_implementation", "attn_implementation") from error


@functools.cache
def anyres_helpers(family: str) -> Any:
    """The anyres helpers of ``transformers.models.<family>.modeling_<family>`` (``llava_next``,
    ``llava_onevision``): ``image_size_to_num_patches``, ``get_anyres_image_grid_shape`` and ``unpad_image``, as
    attributes of the returned namespace."""
    from types import SimpleNamespace

    names = ("image_size_to_num_patches", "get_anyres_image_grid_shape", "unpad_image")
    try:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        return SimpleNamespace(**{name: getattr(module, name) for name in names})
    except (ImportError, AttributeError) as error:
        raise _broken(f"the anyres helpers of modeling_{family} ({', '.join(names)})", "anyres_helpers") from error


# ------------------------------------------------------------------------------------------- tensor parallelism
def tensor_parallel_kwargs(plan: str = "auto") -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that shard a model over the ranks of ``torchrun`` with the checkpoint's
    own plan: ``distributed_config=DistributedConfig(tp_plan=plan)`` (every release of the range has it; the older
    ``tp_plan=`` keyword warns that it is deprecated since 5.17)."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError as error:
        raise _broken("transformers.distributed.DistributedConfig", "tensor_parallel_kwargs") from error
    return {"distributed_config": DistributedConfig(tp_plan=plan)}
