"""The selection step of the vLLM plugin, in plain torch (no vLLM import): piofvlm's own method code run on one
batch of images' projected features, as vLLM's ``embed_multimodal`` hands them over.

vLLM fixes the number of placeholder tokens of an image in its front-end processor, before the encoder runs, and the
model's ``embed_multimodal`` returns exactly that many embeddings per image. So only methods that choose among an
image's visual tokens from the image alone, with a count known from the image size, can run there: the
input/encoder-side methods at prune point 0. Their ``select`` is called here on a :class:`StageContext` holding one
image per row, so the kept tokens (and merged features) are those piofvlm computes on transformers with
``positions="renumber"`` (vLLM numbers the shorter prompt's positions contiguously, which is what renumbering does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from piofvlm.adapters.base import ModelAdapter
from piofvlm.budget import stage_budget
from piofvlm.core.context import StageContext
from piofvlm.methods.base import TokenPruner
from piofvlm.methods.shared.capture import VisualMap
from piofvlm.registry import get_method

#: Methods the plugin runs (inside ``embed_multimodal``, before the language model).
ENCODER_METHODS = ("pool", "random", "divprune", "visionzip", "vscan", "chain")
#: Methods that prune inside the language model (at layer K > 0, or reading its attention / gradients).
IN_LLM_METHODS = ("pio", "fastv", "pdrop", "sparsevlm", "dart")
#: The key of the model config (``hf_overrides``) that carries the method and its hyperparameters.
CONFIG_KEY = "piofvlm"

_WHY_IN_LLM = (
    "it prunes inside the language model (after decoder layer K), and vLLM builds one attention metadata and one "
    "paged KV-cache layout per request for all layers (chunked prefill, prefix caching and CUDA graphs rely on it), "
    "so a plugin cannot drop tokens between layers; see docs/vllm.md ('Layer-K pruning'). Use one of "
)
_WHY_CDPRUNER = (
    "cdpruner needs the instruction's text, and vLLM's embed_multimodal sees only the image (its encoder outputs "
    "are also cached per image, across prompts; embed_input_ids sees the prompt's tokens only after the image's "
    "token count and embeddings are fixed); see docs/vllm.md ('CDPruner's text'). Use one of "
)


def method_from_config(spec: Mapping[str, Any] | None, positions: str = "renumber") -> TokenPruner | None:
    """Build the method named by ``spec`` (``{"method": "divprune", "keep": 64, ...}``) for the vLLM plugin;
    ``{"method": "none"}`` gives ``None`` (the plugin's model, nothing pruned: the baseline).

    Defaults differ from piofvlm's in two places, both forced by vLLM: ``layers=[0]`` (also for ``random``, whose
    piofvlm default is 2) and the family's ``positions`` mode: ``"renumber"`` for 1-D RoPE families (vLLM numbers
    the shorter prompt contiguously), ``"keep"`` for M-RoPE families (Qwen-VL: the plugin gives the kept tokens their
    own grid positions, :mod:`piofvlm.integrations.vllm.qwen_vl`). ``chain`` runs its ``encoder`` part only and
    refuses an ``llm`` part. Raises ``ValueError`` (saying what to do) for anything vLLM cannot run.
    """
    if not isinstance(spec, Mapping) or "method" not in spec:
        raise ValueError(
            f"the model config's {CONFIG_KEY!r} entry must be a dict with a 'method' key, e.g. "
            f'hf_overrides={{"{CONFIG_KEY}": {{"method": "divprune", "keep": 64}}, "architectures": [...]}}; '
            f"got {spec!r}"
        )
    fields = dict(spec)
    name = fields.pop("method")
    supported = ", ".join(m for m in ENCODER_METHODS)
    if name == "none":
        if fields:
            raise ValueError(f"method 'none' takes no hyperparameters, got {sorted(fields)}")
        return None
    if name in IN_LLM_METHODS:
        raise ValueError(f"method {name!r} cannot run in vLLM: {_WHY_IN_LLM}{supported}")
    if name == "cdpruner":
        raise ValueError(f"method 'cdpruner' cannot run in vLLM: {_WHY_CDPRUNER}{supported}")
    if name == "chain":
        if fields.pop("llm", None) is not None:
            raise ValueError(
                "chain: only the encoder part runs in vLLM; its llm part "
                f"({spec['llm']!r}) cannot: {_WHY_IN_LLM}{supported} (or chain with 'encoder' only)"
            )
        encoder = fields.pop("encoder", None)
        if not isinstance(encoder, Mapping):
            raise ValueError(f"chain needs an 'encoder' dict with a 'method' key, got {encoder!r}")
        if fields:
            raise ValueError(f"chain in vLLM takes 'encoder' (and no 'llm') only, got extra keys {sorted(fields)}")
        if encoder.get("method") in ("chain", "none"):
            raise ValueError(f"chain: the encoder part cannot be {encoder.get('method')!r}")
        return method_from_config(encoder, positions)
    if name not in ENCODER_METHODS:
        raise ValueError(f"unknown method {name!r} for vLLM; the plugin runs: {supported}")
    fields.setdefault("layers", [0])
    fields.setdefault("positions", positions)
    if fields["positions"] != positions:
        why = {
            "renumber": "vLLM numbers the kept tokens contiguously (the prompt is shorter), which is piofvlm's "
            "positions='renumber'",
            "keep": "this family's M-RoPE positions are grid coordinates; the plugin gives the kept tokens their own "
            "(piofvlm's positions='keep', the only mode piofvlm defines for it)",
        }[positions]
        raise ValueError(f"positions={fields['positions']!r}: {why}; drop the key or use {positions!r}")
    if fields.get("budget_scope", "image") != "image":
        raise ValueError(
            f"budget_scope={fields['budget_scope']!r}: vLLM needs each image's token count before encoding, so the "
            "budget counts per image; use 'image' (the default)"
        )
    method = get_method(name, **fields)
    if list(method.layers) != [0] or len(method.keep) != 1:
        raise ValueError(
            f"{name} with layers={method.layers!r}: in vLLM a method runs before the language model only, at "
            "layers=[0] with one keep value"
        )
    return method


def tokens_per_image(method: TokenPruner, num_tokens: int) -> int:
    """Visual tokens an image of ``num_tokens`` keeps (a count, or a ratio rounded half up, as piofvlm counts)."""
    return int(stage_budget(method.keep[0], torch.tensor([[num_tokens]]))[0, 0])


class _Vision:
    """Stands in for :class:`piofvlm.methods.shared.capture.VisionInputs`: the captured vision-layer inputs and the
    map."""

    def __init__(self, vmap: VisualMap, hidden: Mapping[int, torch.Tensor], num_layers: int) -> None:
        self._vmap, self._hidden, self._num_layers = vmap, dict(hidden), num_layers

    def visual_map(self, ctx: StageContext) -> VisualMap:
        return self._vmap

    def layer_input(self, index: int, modality: str = "image") -> torch.Tensor:
        index %= self._num_layers
        if index not in self._hidden:
            raise RuntimeError(f"vision layer {index} was not captured in this encoding")
        return self._hidden[index]


@dataclass
class VisionTower:
    """What the encoder-side methods read from a vLLM model's vision tower (LLaVA-style: one crop per image).

    ``attention(layer, hidden)`` returns ``(probs (N, H, T, T) fp32, keys (N, T, hd) mean over heads)`` of vision
    block ``layer`` from the hidden states entering it, every head included (as
    :meth:`piofvlm.adapters.base.ModelAdapter.vision_attention`).
    """

    num_layers: int  # blocks the tower has
    feature_layer_index: int  # the block whose output feeds the projector
    has_cls: bool  # each crop starts with a [CLS] token that is not a visual token
    side: int  # the crop's patch grid is side x side
    attention: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    local_layer_index: int | None = None  # VScan's default local layer, if the family has one


class _Adapter:
    """Stands in for the model's :class:`~piofvlm.adapters.base.ModelAdapter` where a method reads it: the checks
    of ``TokenPruner.check_model`` and the vision-attention scores (piofvlm's own formula)."""

    attn_implementation = "sdpa"
    supports_renumber = True
    vision_token_scores = ModelAdapter.vision_token_scores

    def __init__(self, tower: VisionTower, num_text_layers: int, model_type: str) -> None:
        self.tower, self.num_layers, self.model_type = tower, num_text_layers, model_type

    def check_attention(self) -> None:
        pass

    def check_attention_map(self, index: int, method: str) -> None:
        pass

    def check_method(self, method: Any) -> None:
        pass

    @property
    def vision_layers(self) -> range:
        return range(self.tower.num_layers)

    @property
    def vision_feature_layer_index(self) -> int:
        return self.tower.feature_layer_index

    @property
    def vision_local_layer_index(self) -> int:
        if self.tower.local_layer_index is None:
            raise ValueError(
                f"{self.model_type} has no default local layer for VScan (vision_local_layer_index); set local_layer"
            )
        return self.tower.local_layer_index

    @property
    def vision_has_cls(self) -> bool:
        return self.tower.has_cls

    def vision_attention(self, layer_index: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tower.attention is None:
            raise ValueError(f"the vision attention of {self.model_type} is not available to the vLLM plugin")
        return self.tower.attention(layer_index, hidden_states)


def vision_layers_needed(method: TokenPruner, tower: VisionTower) -> list[int]:
    """Vision blocks whose inputs ``method`` reads (their hidden states must be captured during encoding)."""
    if method.name == "visionzip":
        return [tower.feature_layer_index]
    if method.name == "vscan":
        local = tower.local_layer_index if method.local_layer is None else method.local_layer
        deep = tower.feature_layer_index if method.global_layer is None else method.global_layer
        return sorted({local % tower.num_layers, deep % tower.num_layers})
    return []


def check_method(method: TokenPruner, tower: VisionTower, num_text_layers: int, model_type: str) -> None:
    """Run piofvlm's own checks of ``method`` against the vLLM model (e.g. VScan's layers exist)."""
    method.check_model(_Adapter(tower, num_text_layers, model_type))


def _bind(method: TokenPruner, vision: _Vision, tower: VisionTower) -> None:
    """What each method's ``attach`` sets up on transformers, pointed at the vLLM captures."""
    if method.name == "pool":
        method._vision = vision
    elif method.name == "visionzip":
        method._layer = tower.feature_layer_index
        method._vision = vision
    elif method.name == "vscan":
        local = tower.local_layer_index if method.local_layer is None else method.local_layer
        deep = tower.feature_layer_index if method.global_layer is None else method.global_layer
        method._local, method._global = local % tower.num_layers, deep % tower.num_layers
        method._vision = vision


@dataclass
class ImageSelection:
    """Per image of the batch: the kept token indices (sorted) and the ``(k, d)`` embeddings the LLM receives."""

    kept: list[torch.Tensor]
    embeddings: list[torch.Tensor]


def merged_grid_sources(grid_thw: Sequence[int], merge_size: int, crop: int) -> dict[str, torch.Tensor]:
    """Where each visual token of a Qwen-VL image comes from: its merged ``(h / merge) x (w / merge)`` grid in raster
    order (``crop`` = the image's row of the vision scores, ``patch`` = its token), as
    :meth:`piofvlm.adapters.qwen_vl.QwenVLAdapter.visual_token_sources` for an image."""
    t, h, w = (int(v) for v in grid_thw)
    width, per_frame = w // merge_size, h * w // merge_size**2
    token = torch.arange(t * per_frame)
    return {
        "crop": torch.full_like(token, crop),
        "patch": token,
        "grid": token // per_frame,
        "row": token % per_frame // width,
        "col": token % width,
    }


def kept_mrope_channels(grid_thw: Sequence[int], merge_size: int, kept: torch.Tensor) -> torch.Tensor:
    """The 4 position channels the plugin appends to an image's kept embeddings (Qwen-VL, ``positions="keep"``):
    each kept token's (t, h, w) M-RoPE coordinate on the merged grid, counted from the image's start, and the text
    continuation after the image (its largest coordinate + 1, as in the unpruned prompt). ``(len(kept), 4)`` int64;
    the layout of vLLM's EVS channels (``compute_mrope_for_media``) for an image."""
    t, h, w = (int(v) for v in grid_thw)
    height, width = h // merge_size, w // merge_size
    index = torch.arange(t * height * width)
    coordinates = torch.stack([index // (height * width), index % (height * width) // width, index % width], dim=1)
    continuation = max(t - 1, height - 1, width - 1) + 1
    kept = kept.cpu().long()
    return torch.cat([coordinates[kept], torch.full((len(kept), 1), continuation)], dim=1)


def shorter_prompt_mrope_positions(
    num_tokens: int, items: Sequence[tuple[int, int, int, int, int, float]]
) -> tuple[torch.Tensor, int]:
    """M-RoPE positions ``(3, num_tokens)`` of a prompt whose images were pruned, before the kept tokens are known:
    text where the unpruned prompt has it (after an item, at its start + its largest grid coordinate + 1), every slot
    of an item at the item's start (its (0, 0, 0) coordinate), and the delta of the next position over
    ``num_tokens`` (vLLM's ``mrope_position_delta``). Adding each kept token's coordinate
    (:func:`kept_mrope_channels`) to its slot gives piofvlm's ``positions="keep"``.

    ``items``: ``(offset, slots, t, h, w, t_factor)`` of each image / video in prompt order (``h``, ``w`` on the
    merged grid; ``t_factor`` scales a video's temporal coordinate, 1.0 for images)."""
    pieces: list[torch.Tensor] = []
    start, next_position = 0, 0
    for offset, length, t, h, w, t_factor in items:
        text = offset - start
        pieces.append(torch.arange(text).expand(3, text) + next_position)
        base = next_position + text
        pieces.append(torch.full((3, length), base, dtype=torch.long))
        last_t = int((t - 1) * t_factor) if t_factor != 1.0 else t - 1
        next_position = base + max(last_t, h - 1, w - 1) + 1
        start = offset + length
    if start < num_tokens:
        text = num_tokens - start
        pieces.append(torch.arange(text).expand(3, text) + next_position)
    positions = torch.cat(pieces, dim=1).reshape(3, -1)
    return positions, int(positions.max()) + 1 - num_tokens


def with_kept_rows(
    embeddings: Sequence[torch.Tensor], extras: Sequence[torch.Tensor | None], kept: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Each image's kept embeddings ``(k, d)`` followed by the rows ``kept`` of its per-token extras ``(n, e)``
    (Qwen3-VL: the deepstack levels of each kept token, so each kept token brings its own; ``None``: none)."""
    return [
        row if extra is None else torch.cat([row, extra[index.to(extra.device)].to(row.dtype)], dim=1)
        for row, extra, index in zip(embeddings, extras, kept, strict=True)
    ]


def grid_sources(side: int) -> dict[str, torch.Tensor]:
    """Where each visual token of a LLaVA-1.5 image comes from: one ``side x side`` crop in raster order."""
    patch = torch.arange(side * side)
    return {
        "crop": torch.zeros_like(patch),
        "patch": patch,
        "grid": torch.zeros_like(patch),
        "row": patch // side,
        "col": patch % side,
    }


def anyres_sources(
    image_size: tuple[int, int], side: int, grid_pinpoints: list[list[int]], crop_size: int, first_crop: int = 0
) -> dict[str, torch.Tensor]:
    """Where each visual token of a LLaVA-NeXT image of ``(height, width)`` comes from, in the order the model packs
    them (transformers' ``pack_image_features``, vLLM's ``_merge_image_patch_embeddings``): the base view (crop
    ``first_crop``, grid 0, ``side x side``), then the unpadded high-resolution grid (its tiles are crops
    ``first_crop + 1 ...``, grid 1) with one ``image_newline`` token closing each row (crop and patch -1). This is
    :meth:`piofvlm.adapters.llava_next.LlavaNextAdapter.visual_token_sources` for the "default" feature strategy,
    computed from the image size alone (vLLM's model has no transformers packing to run on labels).
    """
    from piofvlm import transformers_compat

    anyres = transformers_compat.anyres_helpers("llava_next")
    size = [int(image_size[0]), int(image_size[1])]
    base = grid_sources(side)
    base["crop"] = base["crop"] + first_crop
    rows, cols = anyres.get_anyres_image_grid_shape(size, grid_pinpoints, crop_size)
    # (crop, patch) labels of the tiles, arranged as the model arranges the features, then unpadded the same way
    tile = torch.arange(rows * cols)[:, None].expand(-1, side * side) + first_crop + 1
    patch = torch.arange(side * side)[None].expand(rows * cols, -1)
    labels = torch.stack([tile, patch], dim=-1).double().view(rows, cols, side, side, 2)
    labels = labels.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # (2, rows*side, cols*side)
    labels = anyres.unpad_image(labels, torch.as_tensor(size))
    height, width = labels.shape[1], labels.shape[2]
    newline = torch.full((2, height, 1), -1.0, dtype=labels.dtype)
    labels = torch.cat([labels, newline], dim=-1).flatten(1, 2).long()  # (2, height * (width + 1))
    index = torch.arange(height * (width + 1))
    high = {
        "crop": labels[0],
        "patch": labels[1],
        "grid": torch.ones_like(index),
        "row": index // (width + 1),
        "col": index % (width + 1),
    }
    return {name: torch.cat([base[name], high[name]]) for name in base}


def select_image_tokens(
    method: TokenPruner,
    features: torch.Tensor | Sequence[torch.Tensor],
    tower: VisionTower,
    vision_hidden: Mapping[int, torch.Tensor] | None = None,
    sample_keys: torch.Tensor | None = None,
    num_text_layers: int = 1,
    model_type: str = "llava",
    sources: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> ImageSelection:
    """Run ``method``'s selection on each image's projected visual tokens, as one batch (one image per row).

    Args:
        features: ``(N_images, T, d)``, or one ``(T_i, d)`` tensor per image (LLaVA-NeXT: counts differ).
        vision_hidden: ``{block: (N_crops, T_v, d_v)}`` hidden states entering the vision blocks the method reads
            (:func:`vision_layers_needed`), every crop of every image of the call.
        sample_keys: ``(N_images,)`` int64 seeds of ``random`` (piofvlm uses a fingerprint of the prompt); default 0.
        sources: per image, where each token comes from (:func:`anyres_sources`; ``crop`` indexes the rows of
            ``vision_hidden``). Default: each image is one ``side x side`` crop, crop ``i`` for image ``i``.
    """
    rows = list(features) if not isinstance(features, torch.Tensor) or features.dim() == 3 else [features]
    num = len(rows)
    if sources is None:
        sources = []
        for b, row in enumerate(rows):
            if row.shape[0] != tower.side * tower.side:
                raise ValueError(f"an image of {row.shape[0]} tokens is not a {tower.side} x {tower.side} patch grid")
            grid = grid_sources(tower.side)
            sources.append({**grid, "crop": grid["crop"] + b})
    if len(sources) != num:
        raise ValueError(f"{num} images of features but {len(sources)} token layouts")
    lengths = [row.shape[0] for row in rows]
    for b, (row, source) in enumerate(zip(rows, sources, strict=True)):
        if source["crop"].shape[0] != row.shape[0]:
            raise ValueError(f"image {b} has {row.shape[0]} feature tokens but its layout has {len(source['crop'])}")
    device = rows[0].device
    length = max(lengths)
    hidden = rows[0].new_zeros(num, length, rows[0].shape[-1])
    valid = torch.zeros(num, length, dtype=torch.bool, device=device)
    tables = {name: torch.full((num, length), -1, dtype=torch.long) for name in VisualMap.__annotations__}
    for b, (row, source) in enumerate(zip(rows, sources, strict=True)):
        hidden[b, : lengths[b]] = row
        valid[b, : lengths[b]] = True
        tables["image"][b, : lengths[b]] = 0
        for name in ("crop", "patch", "grid", "row", "col"):
            tables[name][b, : lengths[b]] = source[name].long().cpu()
    vmap = VisualMap(**{name: table.to(device) for name, table in tables.items()})
    position = torch.arange(length, device=device)[None].expand(num, length)
    visual_index = torch.where(valid, position, -1)
    adapter = _Adapter(tower, num_text_layers, model_type)
    vision = _Vision(vmap, vision_hidden or {}, tower.num_layers)
    _bind(method, vision, tower)
    budgets = stage_budget(method.keep[0], torch.tensor(lengths)[:, None]).to(device)
    ctx = StageContext(
        stage=0,
        layer=0,
        hidden_states=hidden,
        valid=valid,
        groups=torch.where(valid, 0, -1),
        visual_index=visual_index,
        budgets=budgets,
        attention_mask=None,
        position_embeddings=(),
        position_ids=position.contiguous(),
        sample_keys=torch.zeros(num, dtype=torch.long) if sample_keys is None else sample_keys.long().cpu(),
        adapter=adapter,  # type: ignore[arg-type]
        model=None,  # type: ignore[arg-type]
    )
    selection = method.select(ctx)
    chosen = hidden if selection.hidden_states is None else selection.hidden_states
    kept, embeddings = [], []
    for b in range(num):
        index = (selection.keep[b] & valid[b]).nonzero()[:, 0]
        if len(index) != int(budgets[b, 0]):
            raise RuntimeError(f"{method.name} kept {len(index)} tokens of image {b}, not {int(budgets[b, 0])}")
        kept.append(index)
        embeddings.append(chosen[b, index].to(rows[b].dtype))
    return ImageSelection(kept=kept, embeddings=embeddings)
