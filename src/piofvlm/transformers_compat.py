"""The one place that touches ``transformers`` internals which move between releases.

piofvlm hooks into stock models, so it reads keyword names, output fields and helper functions that are not public
API. Every such internal is reached through one function here; adapters keep their family's module layout but call
this module for anything that changed (or may change) between releases. ``tests/test_transformers_compat.py`` has
one contract test per function that fails with a message naming the internal and the installed version, so the next
release that moves something is diagnosed in seconds.

Versions run with the whole fast suite are listed in the README ("Tested transformers versions");
:data:`TESTED_RANGE` is the declared range (``pyproject.toml``), checked at import by :func:`check_version`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
import transformers
from packaging.version import Version

logger = logging.getLogger(__name__)

#: The declared, tested range of transformers versions: ``floor <= version < ceiling`` (same as pyproject.toml).
TESTED_RANGE: tuple[str, str] = ("5.17.0", "5.25")
TRANSFORMERS_VERSION: str = transformers.__version__
#: Releases on which the whole fast suite passed (the README's table); the last one is the lock's.
KNOWN_GOOD_TRANSFORMERS: tuple[str, ...] = ("5.17.0", "5.24.0")


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
    """The KV cache of a model output (``.cache`` from 5.24, ``.past_key_values`` before)."""
    if "cache" in getattr(output, "keys", lambda: ())():
        return output["cache"]
    if "past_key_values" in getattr(output, "keys", lambda: ())():
        return output["past_key_values"]
    for name in _CACHE_KWARGS:
        if hasattr(type(output), name) or name in getattr(output, "__dataclass_fields__", {}):
            return getattr(output, name)
    raise _broken(f"the KV-cache field of {type(output).__name__}", "output_cache")


# ---------------------------------------------------------------------------------------------------------- masks
def causal_padding_mask(
    config: Any, key_valid: torch.Tensor, query_length: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Causal mask over ``key_valid`` keys whose last ``query_length`` keys are the queries, built by the model's
    own mask interface (``masking_utils``: ``q_length``/``q_offset`` arguments since 5.4).

    Args:
        config: the text config (its ``_attn_implementation`` picks the format).
        key_valid: ``(B, L_kv)`` bool, False for padding keys.
        query_length: number of queries ``L_q`` (the last ``L_q`` keys).
        dtype: dtype of the hidden states (eager masks are additive in this dtype).

    Returns:
        sdpa: ``(B, 1, L_q, L_kv)`` bool or None; eager: ``(B, 1, L_q, L_kv)`` float; flash: ``(B, L_kv)`` or None.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    batch_size, kv_length = key_valid.shape
    mask_interface = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    return mask_interface(
        batch_size=batch_size,
        q_length=query_length,
        kv_length=kv_length,
        q_offset=kv_length - query_length,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=key_valid,
        allow_is_causal_skip=True,
        dtype=dtype,
        config=config,
        use_vmap=False,
        device=key_valid.device,
    )


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
}


def rotary_function(family: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The family's ``apply_rotary_pos_emb(q, k, cos, sin)`` taking ``(B, S, head_dim)`` tables.

    Qwen2-VL/2.5-VL before 5.17 returned ``(3, B, S, head_dim)`` tables and applied them with
    ``apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section)``; from 5.17 the sections are merged in the
    rotary module and attention applies them Llama-style, which is what the fast proxy relies on.
    """
    module = importlib.import_module(_ROTARY_MODULES[family])
    function = getattr(module, "apply_rotary_pos_emb", None)
    parameters = list(inspect.signature(function).parameters) if function is not None else []
    if parameters[:4] != ["q", "k", "cos", "sin"]:
        raise _broken(f"{_ROTARY_MODULES[family]}.apply_rotary_pos_emb (expected (q, k, cos, sin))", "rotary_function")
    return function


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
def pil_image_processor_usable(cls: type) -> bool:
    """Whether a ``*ImageProcessorPil`` class works without torchvision (SmolVLM's and Idefics3's did not before
    5.18: they raised an ImportError asking for torchvision)."""
    try:
        cls()
    except ImportError:
        return False
    return True
