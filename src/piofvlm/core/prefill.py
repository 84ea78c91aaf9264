"""The prefill: the layout of the prompt, the budgets, the method's selection at each prune point, the rebuilt
(shorter, left-padded) sequence with its positions, rotary tables and masks, and the records of what was kept."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.profiler import record_function

from piofvlm.core.cache import _last_queries, _Segment
from piofvlm.core.context import StageContext, StageRecord
from piofvlm.core.ops import gather_sequence
from piofvlm.core.threads import PerThread

if TYPE_CHECKING:
    from piofvlm.adapters.base import ModelAdapter
    from piofvlm.methods.base import TokenPruner

logger = logging.getLogger(__name__)


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
    plan: tuple[tuple[int, str] | None, ...] = ()  # decode only: _CacheLayout.decode_plan of that cache
    layout_ref: Any = None  # decode only: that cache's _CacheLayout


class Prefill:
    """The prefill side of :class:`~piofvlm.core.handle.PruningHandle`. Owns the calling thread's records."""

    # Set by the handle (PruningHandle.__init__).
    method: TokenPruner
    model: nn.Module
    adapter: ModelAdapter
    on_prefill: Callable[[list[StageRecord]], None] | None
    #: Per stage, what the last prefill of the calling thread kept.
    records: PerThread[list[StageRecord]] = PerThread(list)
    _selecting: PerThread[bool] = PerThread(bool)

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
        if self.on_prefill is not None:
            self.on_prefill(self.records)
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


@torch.compiler.disable  # inductor's value-range analysis evaluates the wrapping products exactly: int64 overflow
def _sample_keys(input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B,)`` int64 fingerprint of each sample's real tokens, counted from its end (so padding does not matter).

    It runs eagerly under torch.compile (one graph break in a compiled prefill): inductor bounds ``from_end * A``
    in exact integers and fails with "too big to convert to int64_t" on the intended wrap-around.
    """
    from_end = torch.arange(input_ids.shape[1], 0, -1, device=input_ids.device)  # 1-based distance from the end
    weights = from_end * 6364136223846793005 + 1442695040888963407  # int64 arithmetic wraps: a fixed hash
    return (input_ids.long() * weights * valid.long()).sum(1)
