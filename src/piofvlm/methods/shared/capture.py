"""Hooks that methods register through ``attach`` to see more than the hidden states at their prune point.

* :class:`LayerInputs`: the hidden states entering chosen decoder layers (e.g. layer K-1 for FastV's attention);
* :class:`VisionInputs`: the multimodal call's image inputs (``input_ids``, ``pixel_values``, ``image_sizes``, ...)
  and the hidden states entering chosen vision-encoder layers, plus the map from each visual token of the prompt
  to its image, its vision-encoder crop and patch, and its place in the image's grid(s).

Every hook is owned by the pruning handle, so it is removed with it. Captures made while a method is selecting (e.g.
PIO's proxy re-running a layer) are ignored. What is captured belongs to the calling thread (``core/threads.py``).
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from piofvlm import transformers_compat
from piofvlm.core.context import StageContext
from piofvlm.core.guard import guarded
from piofvlm.core.handle import PruningHandle
from piofvlm.core.threads import PerThread, new_state


class LayerInputs:
    """Hidden states entering decoder layers ``indices`` in the latest forward: ``self.hidden[i]``, ``(B, S, d)``."""

    hidden: PerThread[dict[int, torch.Tensor]] = PerThread(dict)

    def __init__(self, handle: PruningHandle, indices: list[int]) -> None:
        self._per_thread = new_state()
        for index in sorted(set(indices)):
            hook = handle.adapter.layers[index].register_forward_pre_hook(
                guarded(self._store(handle, index)), with_kwargs=True
            )
            handle.add_hook(hook)

    def _store(self, handle: PruningHandle, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not getattr(handle, "_selecting", False):
                self.hidden[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def get(self, index: int, ctx: StageContext) -> torch.Tensor:
        hidden = self.hidden.get(index)
        if hidden is None or tuple(hidden.shape[:2]) != tuple(ctx.valid.shape):
            raise RuntimeError(f"the hidden states entering decoder layer {index} were not captured for this prefill")
        return hidden


@dataclass
class VisualMap:
    """Per visual token of each sample (aligned with ``StageContext.visual_index``): ``(B, N_max)`` long tables.

    ``-1`` marks entries past a sample's visual tokens, and ``crop``/``patch`` are -1 for visual tokens without a
    vision-encoder patch (LLaVA-NeXT's ``image_newline`` tokens).
    """

    image: torch.Tensor  # image index within the sample
    crop: torch.Tensor  # index of the vision-encoder input (crop) in the vision tower's batch
    patch: torch.Tensor  # patch index within the crop (0-based, not counting a [CLS] token)
    grid: torch.Tensor  # which grid of its image the token lies in (LLaVA-NeXT: 0 base view, 1 high-res)
    row: torch.Tensor  # row within that grid
    col: torch.Tensor  # column within that grid

    def at(self, name: str, ctx: StageContext) -> torch.Tensor:
        """``(B, S)`` value of table ``name`` for each slot of the current layout (-1 for non-visual slots)."""
        table = getattr(self, name)
        values = table.gather(1, ctx.visual_index.clamp(min=0))
        return torch.where(ctx.visual_index >= 0, values, -1)


class VisionInputs:
    """Captures the image inputs of the multimodal call and the inputs of vision-encoder layers ``layers``."""

    # Everything captured is the calling thread's.
    kwargs: PerThread[dict[str, Any]] = PerThread(dict)
    input_ids: PerThread[torch.Tensor | None] = PerThread(lambda: None)
    #: ``(modality, layer) ->`` hidden states entering that vision layer in the latest encoding of that modality
    #: (images and videos go through the vision tower in separate calls).
    hidden: PerThread[dict[tuple[str, int], torch.Tensor]] = PerThread(dict)
    #: ``(modality, layer) ->`` the keyword arguments of that call of the layer (Qwen: ``cu_seqlens``, rotary).
    layer_kwargs: PerThread[dict[tuple[str, int], dict[str, Any]]] = PerThread(dict)
    _encoded: PerThread[dict[str, dict[str, Any]]] = PerThread(dict)
    _modality: PerThread[str | None] = PerThread(lambda: None)  # the modality being encoded, if any
    #: Whether an encoding ran since the last multimodal call began. ``generate()`` encodes every image and video
    #: of a prompt just before the prefill; the next encoding after a model call belongs to a new prompt.
    _fresh: PerThread[bool] = PerThread(bool)
    #: The pre-encoded features (``mm_encoder_outputs``) of that encoding.
    _features: PerThread[tuple[Any, ...]] = PerThread(tuple)

    def __init__(self, handle: PruningHandle, layers: list[int]) -> None:
        self._per_thread = new_state()
        self.adapter = handle.adapter
        multimodal = self.adapter.multimodal_model
        hook = multimodal.register_forward_pre_hook(guarded(self._on_multimodal), with_kwargs=True)
        handle.add_hook(hook)
        for modality in ("image", "video"):
            if hasattr(multimodal, f"get_{modality}_features"):
                # transformers' generate() encodes images itself (``mm_encoder_outputs``) and drops ``image_sizes``
                # from the model call, so the inputs are read where they are encoded, on this instance only.
                name = f"get_{modality}_features"
                handle.add_hook(_InstanceWrap(multimodal, name, functools.partial(self._encode, modality)))
        vision_layers = self.adapter.vision_layers if layers else ()  # pool needs the inputs only, not the blocks
        for index in sorted(set(layers)):
            if not -len(vision_layers) <= index < len(vision_layers):
                raise ValueError(
                    f"vision layer {index} does not exist: the vision encoder has {len(vision_layers)} layers"
                )
            hook = vision_layers[index].register_forward_pre_hook(
                guarded(self._store(index % len(vision_layers))), with_kwargs=True
            )
            handle.add_hook(hook)

    def _on_multimodal(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
        features = tuple((kwargs.get("mm_encoder_outputs") or {}).values())
        # generate(use_cache=False) runs the whole sequence again at every step with the features it encoded once:
        # the same objects as at the first step, whose encoding's captures still hold.
        same = (
            bool(features)
            and len(features) == len(self._features)
            and all(map(operator.is_, features, self._features))
        )
        if pixels or not (self._fresh or same):
            # This call encodes its own images / videos, or nothing was encoded for it: forget earlier encodings (a
            # prompt with only images must not see the video of an earlier prompt, and the other way round).
            self._clear()
        if self._fresh:
            self._features = features  # what generate() pre-encoded in the encoding that just ran
        self._fresh = False
        if pixels or transformers_compat.has_encoded_features(kwargs):
            self.kwargs = dict(kwargs)
            self.input_ids = kwargs.get("input_ids", args[0] if args else None)

    def _clear(self) -> None:
        self._features = ()
        self._encoded = {}
        self.hidden = {}
        self.layer_kwargs = {}

    @property
    def image_kwargs(self) -> dict[str, Any]:
        """The inputs of the latest image and video encodings (``pixel_values``, ``image_sizes``, grids, ...)."""
        return {name: value for inputs in self._encoded.values() for name, value in inputs.items()}

    def _encode(self, modality: str, function: Callable, args: tuple, kwargs: dict) -> Any:
        """Run ``get_<modality>_features``, recording its inputs and tagging vision-layer captures with ``modality``.

        A nested call (Qwen3-VL encodes videos through ``get_image_features``) belongs to the outer one.
        """
        if self._modality is not None:
            return function(*args, **kwargs)
        if not self._fresh:  # the first encoding of a new prompt
            self._clear()
            self._fresh = True
        try:
            bound = dict(inspect.signature(function).bind_partial(*args, **kwargs).arguments)
        except TypeError:
            bound = dict(kwargs)
        bound.pop("kwargs", None)
        bound = transformers_compat.encode_call_inputs(modality, bound)
        self._encoded[modality] = {name: value for name, value in bound.items() if value is not None}
        self._modality = modality
        try:
            return function(*args, **kwargs)
        finally:
            self._modality = None

    def _store(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            modality = self._modality or "image"
            self.hidden[(modality, index)] = args[0] if args else kwargs["hidden_states"]
            self.layer_kwargs[(modality, index)] = kwargs

        return hook

    def layer_input(self, index: int, modality: str = "image") -> torch.Tensor:
        """Hidden states entering vision layer ``index`` in the latest encoding of ``modality``.

        LLaVA-style towers: ``(N_crops, T, d_v)``; Qwen: ``(patches, d_v)``, every image (or video) of the call.
        """
        index %= len(self.adapter.vision_layers)
        if (modality, index) not in self.hidden:
            raise RuntimeError(f"vision layer {index} did not run on {modality} inputs in this forward")
        return self.hidden[(modality, index)]

    def layer_call_kwargs(self, index: int, modality: str = "image") -> dict[str, Any]:
        """Keyword arguments vision layer ``index`` received in the latest encoding of ``modality``."""
        self.layer_input(index, modality)
        return self.layer_kwargs[(modality, index % len(self.adapter.vision_layers))]

    def visual_map(self, ctx: StageContext) -> VisualMap:
        """Where each visual token of each sample comes from (see :class:`VisualMap`)."""
        if self.input_ids is None:
            raise RuntimeError("no image inputs were captured for this prefill (call the model with pixel_values)")
        image_inputs = {**self.kwargs, **{k: v for k, v in self.image_kwargs.items() if v is not None}}
        image_inputs["input_ids"] = self.input_ids
        mask = self.kwargs.get("attention_mask")
        visual = self.adapter.visual_token_mask(self.input_ids)  # (B, S)
        if isinstance(mask, torch.Tensor) and mask.shape == visual.shape:  # the 2-D padding mask
            visual = visual & mask.bool()
        else:
            # generate() on a static cache passes a 4-D mask ({"full_attention": ...} for Qwen2-based models): no
            # padding information is needed, padding slots hold no image token (the prefill refuses that). Adapters
            # read attention_mask as the (B, S) padding mask: they get none.
            image_inputs.pop("attention_mask", None)
        images = self.adapter.visual_token_sources(image_inputs)  # per image of the batch, in order
        per_sample = visual.sum(1).tolist()
        width = max(per_sample)
        tables = {
            name: torch.full((len(per_sample), width), -1, dtype=torch.long) for name in VisualMap.__annotations__
        }
        image_iter = iter(images)
        for b, count in enumerate(per_sample):
            filled, image_index = 0, 0
            while filled < count:
                tokens = next(image_iter, None)
                if tokens is None or filled + tokens["crop"].shape[0] > count:
                    raise RuntimeError("the image inputs do not match the image tokens of the prompt")
                n = tokens["crop"].shape[0]
                tables["image"][b, filled : filled + n] = image_index
                for name in ("crop", "patch", "grid", "row", "col"):
                    tables[name][b, filled : filled + n] = tokens[name]
                filled, image_index = filled + n, image_index + 1
        device = ctx.visual_index.device
        return VisualMap(**{name: table.to(device) for name, table in tables.items()})


class _InstanceWrap:
    """Wrap one bound method of one instance: ``around(original, args, kwargs)`` runs instead of it; ``remove()``
    restores it (hook-like)."""

    def __init__(self, obj: Any, name: str, around: Callable[[Callable, tuple, dict], Any]) -> None:
        self.obj, self.name = obj, name
        original = getattr(obj, name)

        @functools.wraps(original)  # keeps the signature, which generate() inspects
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return around(original, args, kwargs)

        wrapper.__piofvlm_guard__ = guarded(around)  # deepcopy / pickle of the instance refuse (see GuardedHook)
        setattr(obj, name, wrapper)

    def remove(self) -> None:
        if self.name in vars(self.obj):
            delattr(self.obj, self.name)
