"""The contract between the shared pruning mechanism and one model family.

An adapter is the only place that knows a family's module tree (where the decoder layers, final norm, LM head and
rotary embedding live), where the visual tokens are in each sample, and how positions are gathered or renumbered
after tokens are dropped. Methods and the mechanism never look at ``config.model_type`` themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from piofvlm import transformers_compat

if TYPE_CHECKING:
    from piofvlm.adapters.boxes import TokenBoxes
    from piofvlm.core.handle import PruningHandle

#: Attention implementations whose masks the mechanism can rebuild after tokens are dropped.
SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
#: Text models whose decoder layers are laid out like Llama's and rotate with Llama's ``apply_rotary_pos_emb``.
LLAMA_STYLE_TEXT_MODELS = ("llama", "mistral", "ministral", "qwen2", "qwen3")


class ModelAdapter:
    """Knows one model family (keyed by ``config.model_type``).

    Subclasses set :attr:`model_types` and implement :meth:`image_token_counts`; the module lookups below fit the
    Hugging Face layout ``model.model.language_model`` + ``model.lm_head`` shared by LLaVA-style models.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: Position ids are laid out as ``(*lead, B, S)``; this is the index of ``B`` (1 for M-RoPE's ``(3, B, S)``).
    position_batch_dim: ClassVar[int] = 0
    #: The rotary tables (cos, sin) are laid out as ``(*lead, B, S, *rest)``; this is the index of ``B``.
    rotary_batch_dim: ClassVar[int] = 0
    #: Whether ``positions="renumber"`` is well defined for this family.
    supports_renumber: ClassVar[bool] = True
    #: The multimodal model hands the language model one prepared mask per layer type (a dict, Gemma 3); the
    #: mechanism then reads the 2-D padding mask of the multimodal call and rebuilds every mask itself.
    rebuilds_layer_type_masks: ClassVar[bool] = False
    #: ``(position, keyword)`` of a decoder-layer argument holding one row per token ``(B, S, ...)`` besides the
    #: hidden states (Gemma 4's ``per_layer_input``): gathered with the kept tokens after a prune point. None: none.
    per_token_layer_input: ClassVar[tuple[int, str] | None] = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ----------------------------------------------------------------------------------------------- module tree
    @property
    def multimodal_model(self) -> nn.Module:
        """The module that receives ``input_ids`` and pixel inputs and calls the language model."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm, rotary embedding)."""
        return self.model.model.language_model

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def model_type(self) -> str:
        """This model's ``config.model_type`` if it is one of :attr:`model_types`, else the first of them (for
        error messages: an adapter serving several types names the one in use)."""
        model_type = getattr(self.model.config, "model_type", None)
        return model_type if model_type in self.model_types else (self.model_types or ("?",))[0]

    @property
    def attn_implementation(self) -> str:
        return transformers_compat.attn_implementation(self.text_config)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # ------------------------------------------------------------------------------------------ visual tokens
    def image_token_counts(self, num_image_tokens: int, model_kwargs: dict[str, Any]) -> list[int] | None:
        """Number of placeholder tokens of each image (and video) of the batch, in prompt order, or ``None``.

        ``model_kwargs`` are the keyword arguments of the multimodal model's forward (``input_ids``, ``pixel_values``,
        ``image_sizes``, ...). ``None`` makes the mechanism treat each contiguous run of visual tokens as one item.

        Default: the per-item sizes of :meth:`item_token_counts` for images and videos, placed in prompt order by
        :func:`items_in_prompt_order` (so text between an item's tokens, e.g. row breaks, does not split it); ``None``
        when the family gives no sizes (each image is then one contiguous run, as in InternVL).
        """
        input_ids = model_kwargs.get("input_ids")
        images = self.item_token_counts(model_kwargs, "image")
        videos = self.item_token_counts(model_kwargs, "video") if self.video_token_id is not None else None
        if input_ids is None or (images is None and videos is None):
            return None
        modality = self.visual_modality(input_ids, model_kwargs)
        return items_in_prompt_order(modality, {0: images or [], 1: videos or []})

    def item_token_counts(self, model_kwargs: dict[str, Any], modality: str) -> list[int] | None:
        """Visual tokens of each image (``modality="image"``) or video of the call, in the order the model consumes
        them, or ``None`` if the family does not know them (then contiguous runs are items).

        Default: from the per-item features ``generate()`` pre-encoded (``mm_encoder_outputs``), if they are a list.
        """
        return self.counts_from_encoder_outputs(model_kwargs, modality)

    @staticmethod
    def counts_from_encoder_outputs(model_kwargs: dict[str, Any], modality: str = "image") -> list[int] | None:
        """Per-item token counts from precomputed encoder outputs, if the call carries them.

        ``generate()`` (transformers 5.x) runs the vision tower before the model call and passes
        ``mm_encoder_outputs`` instead of ``pixel_values``/``image_sizes``; their ``pooler_output`` is a list with
        one ``(tokens, d)`` tensor per item.
        """
        features = transformers_compat.encoded_features(model_kwargs, modality)
        if isinstance(features, (list, tuple)):
            return [int(f.shape[0]) for f in features]
        return None

    @property
    def video_token_id(self) -> int | None:
        """Placeholder id of video tokens, or None for families without video."""
        value = getattr(self.model.config, "video_token_id", None)
        return None if value is None else int(value)

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` bool: which prompt positions hold visual tokens (image, and video where the family has it)."""
        return self.visual_modality(input_ids) >= 0

    def visual_modality(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """``(B, S)`` long: 0 for image tokens, 1 for video tokens, -1 elsewhere (``budget_scope="modality"``).

        ``model_kwargs`` (the multimodal call's keyword arguments) are for families whose video tokens reuse the image
        id and are told apart by another input (GLM-4.xV's ``mm_token_type_ids``).
        """
        modality = torch.full_like(input_ids, -1, dtype=torch.long)
        modality = modality.masked_fill(input_ids == self.image_token_id, 0)
        if self.video_token_id is not None:
            modality = modality.masked_fill(input_ids == self.video_token_id, 1)
        return modality

    # ---------------------------------------------------------------------------------------------- positions
    def default_position_ids(self, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """Positions the language model would use when the caller passes none: ``(1, S)``."""
        return torch.arange(seq_len, device=device)[None]

    def rotary_embeddings(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor, layer_type: str = "full_attention"
    ) -> tuple[torch.Tensor, ...]:
        """Recompute ``position_embeddings`` (cos, sin) of layers of ``layer_type`` for new position ids (used by
        ``positions="renumber"``, and for a layer type whose first layer comes after the prune point)."""
        return self.language_model.rotary_emb(hidden_states, position_ids=position_ids)

    def renumber_positions(self, position_ids: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Subtract a per-slot ``shift`` of shape ``(B, S)`` from position ids of layout ``(*lead, B, S)``."""
        return position_ids - shift

    def layer_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The ``position_ids`` argument the decoder layers get, from the language model's ``position_ids``."""
        return position_ids

    # ------------------------------------------------------------------------------------- per-layer-type masks
    # Layers of one type share one attention mask and one rotary table. The default is one type for every layer (a
    # causal mask, one rotary table); families with local and global layers (Gemma 3) override these.
    def layer_type(self, index: int) -> str:
        """Attention type of decoder layer ``index`` (the key of its mask and rotary table)."""
        return "full_attention"

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The distinct layer types, in the order their first layer comes."""
        return tuple(dict.fromkeys(self.layer_type(i) for i in range(self.num_layers)))

    def prefill_masks(
        self,
        valid: torch.Tensor,
        source: torch.Tensor,
        dtype: torch.dtype,
        key_length: int | None,
        model_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """The attention masks of a rebuilt (pruned, left-padded) prefill, per layer type.

        Args:
            valid: ``(B, S)`` bool, real tokens of the rebuilt sequence.
            source: ``(B, S)`` long, the original prompt slot of each slot (-1 for padding).
            dtype: dtype of the hidden states (eager masks are additive).
            key_length: the static cache's key length (keys after ``S`` are unused and masked), None for a dynamic one.
            model_kwargs: the multimodal call's keyword arguments.

        Default: one causal padding mask for every layer type.
        """
        seq_len = valid.shape[1]
        if key_length is None:
            mask = transformers_compat.causal_padding_mask(self.text_config, valid, seq_len, dtype)
        else:
            key_valid = torch.nn.functional.pad(valid, (0, key_length - seq_len), value=False)
            mask = transformers_compat.causal_padding_mask(self.text_config, key_valid, seq_len, dtype, q_offset=0)
        return dict.fromkeys(self.layer_types, mask)

    def decode_mask(self, layer_type: str, key_valid: torch.Tensor, query_length: int, dtype: torch.dtype) -> Any:
        """The mask of layers of ``layer_type`` for ``query_length`` new tokens over ``key_valid`` ``(B, L_kv)``: the
        keys the layer's KV cache presents (its visible past, then the new tokens). Default: causal."""
        return transformers_compat.causal_padding_mask(self.text_config, key_valid, query_length, dtype)

    def decode_mask_over(
        self, layer_type: str, all_keys: torch.Tensor, visible: int, query_length: int, dtype: torch.dtype
    ) -> Any:
        """The decode mask of layers of ``layer_type`` when their cache presents the last ``visible`` of ``all_keys``
        ``(B, L_all)`` (every slot the layer has seen, padding included, then the ``query_length`` new tokens): for
        masks that depend on a key's absolute slot (Llama 4's chunks). Default: :meth:`decode_mask` over the visible
        keys."""
        return self.decode_mask(layer_type, all_keys[:, all_keys.shape[1] - visible :], query_length, dtype)

    def allowed_keys(
        self,
        layer_type: str,
        valid: torch.Tensor,
        source: torch.Tensor,
        query_slots: torch.Tensor,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """``(B, 1, n, S)`` bool: which keys the queries at ``query_slots`` ``(B, n)`` see in layers of
        ``layer_type`` (for the fast PIO proxy and the explicit-attention methods). Default: causal over real keys."""
        key_index = torch.arange(valid.shape[1], device=valid.device)
        return valid[:, None, None, :] & (key_index[None, None, None, :] <= query_slots[:, None, :, None])

    # ------------------------------------------------------------------------------------------------ hooks
    def attach(self, handle: PruningHandle) -> None:
        """Called once the mechanism's hooks are in place, before the method's own ``attach``.

        For family-specific inputs that must follow the rebuilt sequence (e.g. Qwen3-VL's deepstack features); extra
        hooks go through ``handle.add_hook``. Default: nothing.
        """

    # ------------------------------------------------------------------------------------ hybrid layer stacks
    # Families whose decoder stack mixes attention layers with layers that keep a fixed-size state instead of a KV
    # cache (Qwen3.5's Gated DeltaNet linear attention) override these; the defaults describe an all-attention stack.
    def is_attention_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` attends over a KV cache through a causal mask (its attention map exists).

        False for a linear-attention (recurrent) layer: its layer type gets a 2-D padding mask (:meth:`prefill_masks`),
        decoding leaves its mask alone, and attention-reading methods refuse it (:meth:`check_attention_map`)."""
        return True

    def token_mixer(self, index: int, normed: torch.Tensor, mask: Any) -> torch.Tensor:
        """Output ``(B, S, d)`` of the token mixer of a non-attention layer ``index`` (before the residual add) on its
        normed input ``normed`` ``(B, S, d)`` with the mask its layer type gets, without a cache: the fast proxy's head
        of such a layer."""
        raise ValueError(f"{type(self).__name__} has no token mixer other than attention (layer {index})")

    def check_attention_map(self, index: int, method: str) -> None:
        """Raise a ``ValueError`` naming ``method`` if it cannot read the attention (queries, keys) of layer
        ``index``."""
        if not self.is_attention_layer(index):
            attention = [i for i in range(self.num_layers) if self.is_attention_layer(i)]
            raise ValueError(
                f"{method} reads the attention map (queries and keys) of decoder layer {index}, which in "
                f"{self.model_type} models is a linear-attention layer without one; the full-attention layers are "
                f"{attention}. Choose prune points whose attention layer is one of them, or a method that needs no "
                "attention map (pio, random, divprune, cdpruner, pool)"
            )

    def kv_layer(self, index: int) -> int:
        """The decoder layer whose KV cache layer ``index`` attends to: itself, or for a KV-shared layer (Gemma 4's
        last ``num_kv_shared_layers``) the earlier layer whose keys and values it reads (decode masks are sized from
        that layer's cache)."""
        return index

    def proxy_layer_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments a decoder layer needs when the reference proxy calls it alone, without a cache
        (Gemma 4: an empty ``shared_kv_states`` for the layers that store their keys there). Default: none."""
        return {}

    def check_method(self, method: Any) -> None:
        """Raise a ``ValueError`` naming the method and the family if ``method`` (a configured ``TokenPruner``)
        cannot run on this family. Default: every method may (its own checks still apply)."""

    # ------------------------------------------------------------------------------------ fast proxy support
    def rotary_fn(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
        """The family's own ``apply_rotary_pos_emb(q, k, cos, sin)``, or ``None`` if the fast proxy cannot be used.

        Default: Llama's for the text models of :data:`LLAMA_STYLE_TEXT_MODELS` (pre-norm decoder layers with
        ``input_layernorm``, ``self_attn`` ``q/k/v/o_proj`` (+ optional per-head ``q_norm``/``k_norm``),
        ``post_attention_layernorm`` and ``mlp``: the layout the fast proxy and the explicit-attention methods
        recompute), else ``None`` (the reference proxy path; attention-based methods refuse with an error).
        """
        if getattr(self.text_config, "model_type", None) in LLAMA_STYLE_TEXT_MODELS:
            return transformers_compat.rotary_function("llama")
        return None

    def attention_queries(self, attn: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query states ``(B, n, H, hd)`` of attention module ``attn`` (before per-head norms and RoPE) at normed
        inputs ``(B, n, d)``, and the output gate ``(B, n, H * hd)`` the attention output is multiplied by (after a
        sigmoid) before ``o_proj``, or None. Default: ``q_proj`` alone, no gate."""
        return attn.q_proj(normed).view(*normed.shape[:2], -1, attn.head_dim), None

    def decoder_layer_output(self, layer: nn.Module, hidden: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """What decoder ``layer`` outputs at some slots, from its input there and its attention output (after
        ``o_proj``), both ``(B, n, d)``: the fast proxy's tail of the layer. Default: Llama's pre-norm block
        (``hidden + attn``, then ``+ mlp(post_attention_layernorm(.))``); families with other norms override it."""
        residual = hidden + attn_output
        return residual + layer.mlp(layer.post_attention_layernorm(residual))

    # ------------------------------------------------------------------------- vision tower (encoder-side methods)
    # Families that support encoder-side methods override these; the defaults raise a ValueError saying what is
    # missing, so a method can report which capability a family lacks.
    def _no_vision(self, what: str) -> ValueError:
        return ValueError(
            f"{what} is not available for {self.model_type} models: "
            f"{type(self).__name__} does not implement it (see piofvlm.adapters.base.ModelAdapter)"
        )

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder module."""
        raise self._no_vision("vision_tower")

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's transformer blocks, in order."""
        raise self._no_vision("vision_layers")

    @property
    def vision_feature_layer_index(self) -> int:
        """Index in :attr:`vision_layers` of the block whose output feeds the projector (>= 0)."""
        raise self._no_vision("vision_feature_layer_index")

    @property
    def vision_local_layer_index(self) -> int:
        """Default shallow block of VScan's local scan (``local_layer=None``)."""
        raise self._no_vision("vision_local_layer_index (VScan's default local_layer)")

    @property
    def vision_has_cls(self) -> bool:
        """Whether each vision-encoder input starts with a [CLS] token that is not a visual token of the prompt."""
        raise self._no_vision("vision_has_cls")

    def vision_attention(self, layer_index: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit self-attention of vision block ``layer_index`` from the hidden states entering it.

        Args:
            layer_index: index in :attr:`vision_layers`.
            hidden_states: ``(N_crops, T, d_v)`` input of that block (T includes a [CLS] token if there is one).

        Returns:
            ``(probs, keys)``: ``(N_crops, H, T, T)`` fp32 attention probabilities and ``(N_crops, T, hd)`` keys
            averaged over heads (VisionZip's merge metric).
        """
        raise self._no_vision("vision_attention")

    def vision_token_scores(self, layer_index: int, vision: Any, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision-attention score and merge keys of every visual token source at vision block ``layer_index``.

        Args:
            layer_index: index in :attr:`vision_layers`.
            vision: the :class:`~piofvlm.methods.shared.capture.VisionInputs` of the current call.
            mode: ``"cls"`` (attention from the [CLS] token) or ``"mean"`` (attention received, mean over queries);
                heads are averaged.

        Returns:
            ``(scores, keys)``: ``(N, P)`` fp32 and ``(N, P, hd)``, indexed by the ``crop`` and ``patch`` of
            :meth:`visual_token_sources`. Default: one row per vision-encoder crop, one column per patch.
        """
        probs, keys = self.vision_attention(layer_index, vision.layer_input(layer_index))  # (N, H, T, T), (N, T, hd)
        offset = 1 if self.vision_has_cls else 0
        scores = probs[:, :, 0, offset:].mean(1) if mode == "cls" else probs.mean(1).mean(1)[:, offset:]
        return scores, keys[:, offset:]

    def visual_token_sources(self, model_kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """For each image of the batch, in order, where each of its visual tokens comes from.

        Returns one dict per image with ``(N_img,)`` long tensors: ``crop`` (input of the vision tower's batch),
        ``patch`` (patch index within the crop, not counting [CLS]), ``grid``/``row``/``col`` (place in the image's
        token grid(s)); ``crop``/``patch`` are -1 for tokens without a vision-encoder patch (e.g. row separators).
        """
        raise self._no_vision("visual_token_sources")

    # ------------------------------------------------------------------------------------------------ overlays
    def token_boxes(
        self, model_kwargs: dict[str, Any], source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[TokenBoxes]:
        """Where each visual token of each image / video of a call lies on it (what overlays draw from).

        Args:
            model_kwargs: the processor's outputs for the call (``input_ids``, ``attention_mask``, pixel inputs and
                their sizes / grids), as given to the model.
            source_sizes: ``(width, height)`` of each picture given to the processor (a video: of its frames), in
                flat prompt order; needed where the layout depends on them and the inputs do not say it (InternVL's
                and SmolVLM's tile grids).

        Returns:
            One :class:`~piofvlm.adapters.boxes.TokenBoxes` per image or video in flat (sample-major) prompt order;
            its boxes count every visual token of the item (see :mod:`piofvlm.adapters.boxes`).

        Default: a ``ValueError``; families that can say it override this.
        """
        raise ValueError(
            f"overlays are not available for {self.model_type} models: {type(self).__name__} does not say where its "
            "visual tokens lie on the image (ModelAdapter.token_boxes); draw kept-token counts instead, or teach the "
            "adapter its layout"
        )

    def visual_slots(self, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """``(B, S)`` bool: the visual tokens of a call's prompts (not under ``attention_mask == 0``)."""
        visual = self.visual_token_mask(model_kwargs["input_ids"])
        if model_kwargs.get("attention_mask") is not None:
            visual = visual & model_kwargs["attention_mask"].bool().to(visual.device)
        return visual.cpu()

    # ---------------------------------------------------------------------------------------------- checks
    def check_attention(self) -> None:
        impl = self.attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {impl!r} is not supported: after tokens are dropped the mechanism rebuilds "
                f"the attention mask, which it can do for {', '.join(SUPPORTED_ATTENTION)}. Load the model with "
                "attn_implementation='sdpa' (or one of those)."
            )


def items_in_prompt_order(modality: torch.Tensor, sizes: dict[int, list[int]]) -> list[int] | None:
    """Token counts of the images and videos of a batch in the order they appear, images and videos mixed.

    Args:
        modality: ``(B, S)`` long, as :meth:`ModelAdapter.visual_modality` (0 image, 1 video, -1 elsewhere).
        sizes: per modality, the token count of each of its items in batch order (as the model consumes them).

    Returns:
        The count of each item in flat (sample-major) prompt order, or ``None`` if the counts do not match the tokens.
        A video written frame by frame with text in between is still one item.
    """
    items = prompt_items(modality, sizes)
    return None if items is None else [length for _, _, length in items]


def prompt_items(modality: torch.Tensor, sizes: dict[int, list[int]]) -> list[tuple[int, int, int]] | None:
    """Like :func:`items_in_prompt_order`, but each item as ``(modality, index within its modality, tokens)``."""
    modality = modality.flatten()
    modality = modality[modality >= 0]  # (N_visual,)
    item = torch.empty_like(modality)
    for value in (0, 1):
        counts = sizes.get(value, [])
        slots = modality == value
        if int(slots.sum()) != sum(counts):
            return None
        lengths = torch.tensor(counts, dtype=torch.long, device=modality.device)
        item[slots] = torch.repeat_interleave(torch.arange(len(counts), device=modality.device), lengths)
    # Consecutive visual tokens of the same (modality, index) are one image or video.
    keys, run_lengths = torch.unique_consecutive(modality * (len(item) + 1) + item, return_counts=True)
    return [
        (int(key) // (len(item) + 1), int(key) % (len(item) + 1), int(length))
        for key, length in zip(keys.tolist(), run_lengths.tolist(), strict=True)
    ]
