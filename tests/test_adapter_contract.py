"""The adapter contract's shape (issue 26): ``ModelAdapter`` composes one class per concern
(``adapters/contract/``), each member of the contract defined in exactly one of them under its old name (families and
the mechanism override / call those names), no adapter reaches a grandparent's member by class name, and no module
of the adapters or the mechanism grows past ~450 lines."""

from __future__ import annotations

import pathlib
import re

from piofvlm.adapters import contract
from piofvlm.adapters.base import ModelAdapter
from piofvlm.adapters.contract import checks, hybrid, layer_types, positions, proxy, tokens, tree, vision

SRC = pathlib.Path(contract.__file__).parents[2]

#: The contract's members by concern (what adapters override and the mechanism / methods call).
CONCERNS = {
    tree.ModuleTree: "model_types multimodal_model language_model text_config layers num_layers final_norm lm_head "
    "model_type attn_implementation",
    tokens.VisualTokens: "image_token_id image_token_counts item_token_counts counts_from_encoder_outputs "
    "video_token_id visual_token_mask visual_modality",
    positions.Positions: "position_batch_dim rotary_batch_dim supports_renumber default_position_ids "
    "rotary_embeddings renumber_positions layer_position_ids",
    layer_types.LayerTypeMasks: "rebuilds_layer_type_masks per_token_layer_input layer_type layer_types "
    "prefill_masks decode_mask decode_mask_over default_decode_mask allowed_keys",
    hybrid.HybridStack: "is_attention_layer token_mixer check_attention_map kv_layer",
    proxy.FastProxySupport: "proxy_layer_kwargs rotary_fn attention_queries decoder_layer_output",
    vision.VisionTower: "_no_vision vision_tower vision_layers vision_feature_layer_index vision_local_layer_index "
    "vision_has_cls vision_attention vision_token_scores visual_token_sources",
    vision.Overlays: "token_boxes visual_slots",
    checks.Checks: "check_method check_attention",
}


def test_model_adapter_composes_one_class_per_concern():
    assert set(ModelAdapter.__bases__) == set(CONCERNS)
    assert {name for name in vars(ModelAdapter) if not name.startswith("__")} == {"attach"}
    seen: dict[str, type] = {}
    for concern, names in CONCERNS.items():
        own = {name for name in vars(concern) if not name.startswith("__")}
        assert own == set(names.split()), concern.__name__
        for name in own:
            assert name not in seen, f"{name} in {seen.get(name)} and {concern}"
            seen[name] = concern
            assert getattr(ModelAdapter, name) is getattr(concern, name)
    # the 53 members of the old one-class ModelAdapter (attach included) + decode_mask_over + default_decode_mask
    assert len(seen) + 1 == 55


def test_no_adapter_calls_a_member_through_a_class_name():
    """Overrides call shared helpers (``check_supported_attention``, ``llama_layer_output``), not
    ``ModelAdapter.check_attention(self)`` or a grandparent's method by name."""
    calls = re.compile(r"\b(ModelAdapter|[A-Z]\w*Adapter)\.\w+\(self\b")
    offenders = [
        f"{path.name}:{number}"
        for path in sorted((SRC / "piofvlm" / "adapters").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if calls.search(line)
    ]
    assert offenders == [], offenders


def test_no_module_of_the_adapters_or_the_mechanism_is_over_450_lines():
    long = {
        str(path.relative_to(SRC)): n
        for folder in ("adapters", "core")
        for path in (SRC / "piofvlm" / folder).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 450
    }
    assert long == {}
