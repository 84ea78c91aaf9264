"""ViP-LLaVA (``VipLlavaForConditionalGeneration``): LLaVA-1.5's layout (a fixed number of tokens per image, the CLIP
[CLS] token dropped, 1-D RoPE on a Llama text model, ``LlavaProcessor``) with image features taken from several
vision layers at once.

Read from transformers 5.24 (``modeling_vipllava.py``): ``get_image_features`` concatenates
``hidden_states[i][:, 1:]`` over ``config.vision_feature_layers`` (``[-2, -5, -8, -11, 6]`` in the checkpoints) along
the channels and projects them (``VipLlavaMultiModalProjector``: a LayerNorm and two linears), always dropping
[CLS]; there is no ``vision_feature_select_strategy``. What this changes for piofvlm: nothing in the decoder (the
adapter is LLaVA's), but the encoder-side methods that read one vision layer's attention (``visionzip``, ``vscan``,
``chain``) refuse a list of feature layers (the visual tokens mix several layers); with an int
``vision_feature_layers`` they run as for LLaVA. ``pool`` pools the patch grid as for LLaVA.

Its adapter is a data entry (``facts.COMMON_FAMILIES``): LLaVA's parts with
:class:`~piofvlm.adapters.parts.PatchGridPerImage` for the counts and the settings ``feature_layer_field =
"vision_feature_layers"``, ``select_strategy_field = None``; :data:`VipLlavaAdapter` is that registered class.
"""

from __future__ import annotations

from piofvlm.adapters.facts import ADAPTERS_FROM_FACTS

#: The registered ``vipllava`` adapter, built from its data entry.
VipLlavaAdapter = ADAPTERS_FROM_FACTS["vipllava"]
