"""The vLLM plugin's selection step (piofvlm.integrations.vllm.selection, plain torch) against piofvlm on
transformers: on the testbed, the tokens it keeps from the projected features and the vision tower's inputs are the
ones piofvlm keeps with ``positions="renumber"``, and the embeddings it hands to vLLM are the ones the language model
receives there. Needs no vLLM (the plugin's vLLM classes are tested in the vLLM venv: ``make test-vllm``)."""

from __future__ import annotations

import functools

import pytest
import torch

from piofvlm.adapters import get_adapter
from piofvlm.core.prefill import _sample_keys
from piofvlm.integrations.vllm.selection import (
    VisionTower,
    method_from_config,
    select_image_tokens,
    tokens_per_image,
    vision_layers_needed,
)
from piofvlm.testbed import data as testbed_data
from piofvlm.testbed import model as testbed_model

CONFIGS = [
    {"method": "divprune", "keep": 64},
    {"method": "pool", "keep": 0.25},
    {"method": "random", "keep": 64, "seed": 3},
    {"method": "visionzip", "keep": 64},
    {"method": "vscan", "keep": 64, "local_layer": 1, "window": 4},
    {"method": "chain", "encoder": {"method": "vscan", "keep": 48, "local_layer": 0, "window": 8}},
]


@functools.cache
def _testbed():
    return testbed_model.load_testbed()


def _inputs(n: int = 3):
    model, processor = _testbed()
    samples = [testbed_data.make_sample("test", i) for i in range(n)]
    inputs = processor(
        images=[s["image"] for s in samples],
        text=[testbed_model.prompt(s["question"]) for s in samples],
        return_tensors="pt",
        padding=True,
    )
    return model, inputs


def _tower(model) -> VisionTower:
    adapter = get_adapter(model)
    return VisionTower(
        num_layers=len(adapter.vision_layers),
        feature_layer_index=adapter.vision_feature_layer_index,
        has_cls=adapter.vision_has_cls,
        side=16,
        attention=adapter.vision_attention,
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["method"])
@torch.no_grad()
def test_plugin_selection_equals_piofvlm_on_transformers(config):
    model, inputs = _inputs()
    method = method_from_config(config)
    # piofvlm on transformers, positions="renumber": the kept indices and the embeddings entering decoder layer 0
    reference = method_from_config(config)
    entering = {}
    with reference(model):

        def store(module, args, kwargs) -> None:
            entering.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

        hook = model.model.language_model.layers[0].register_forward_pre_hook(store, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
    kept_reference = reference.last_selection[0].kept
    # the plugin's selection, from what vLLM's embed_multimodal has: projected features + vision-block inputs
    adapter = get_adapter(model)
    tower = _tower(model)
    captured = {}
    hooks = [
        adapter.vision_layers[i].register_forward_pre_hook(
            functools.partial(lambda i, module, args: captured.__setitem__(i, args[0]), i)
        )
        for i in vision_layers_needed(method, tower)
    ]
    try:
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    finally:
        for hook in hooks:
            hook.remove()
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
    valid = inputs["attention_mask"].bool()
    keys = _sample_keys(inputs["input_ids"], valid)
    got = select_image_tokens(method, features, tower, captured, sample_keys=keys)
    k = tokens_per_image(method, 256)
    first_image = (inputs["input_ids"] == testbed_model.IMAGE_TOKEN_ID).int().argmax(1)
    for b in range(len(kept_reference)):
        assert len(got.kept[b]) == k
        assert torch.equal(got.kept[b].cpu(), kept_reference[b].cpu()), f"sample {b}"
        start = int(first_image[b])
        torch.testing.assert_close(got.embeddings[b], entering["hidden"][b, start : start + k], rtol=1e-5, atol=1e-6)


def test_random_draw_depends_on_the_key_only():
    """Same image features, different keys: different draws; same key: same draw, alone or in a batch."""
    method = method_from_config({"method": "random", "keep": 16})
    tower = VisionTower(num_layers=3, feature_layer_index=2, has_cls=True, side=16)
    features = torch.randn(2, 256, 8)
    both = select_image_tokens(method, features, tower, sample_keys=torch.tensor([5, 6]))
    alone = select_image_tokens(method, features[1:], tower, sample_keys=torch.tensor([6]))
    assert torch.equal(both.kept[1], alone.kept[0])
    assert not torch.equal(both.kept[0], both.kept[1])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "pio", "layers": [2], "keep": 0.111}, "cannot run in vLLM"),
        ({"method": "fastv"}, "prunes inside the language model"),
        ({"method": "cdpruner", "keep": 64}, "needs the instruction's text"),
        ({"method": "chain", "encoder": {"method": "vscan", "keep": 96}, "llm": {"method": "pio"}}, "llm part"),
        ({"method": "divprune", "keep": 64, "positions": "keep"}, "renumber"),
        ({"method": "divprune", "keep": 64, "budget_scope": "sample"}, "per image"),
        ({"method": "random", "keep": 64, "layers": [2]}, r"at layers=\[0\]"),
        ({"method": "nosuch"}, "nosuch"),
        ({"keep": 64}, "'method' key"),
        ({"method": "divprune", "keep": 64, "colour": 1}, "unknown hyperparameter"),
    ],
)
def test_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        method_from_config(config)


def test_budget_counts_and_vscan_layer_check():
    assert tokens_per_image(method_from_config({"method": "pool", "keep": 0.111}), 576) == 64
    assert tokens_per_image(method_from_config({"method": "divprune", "keep": 64}), 576) == 64
    method = method_from_config({"method": "vscan", "keep": 64})  # local_layer=5 default; the testbed has 3 blocks
    tower = VisionTower(num_layers=3, feature_layer_index=2, has_cls=True, side=16)
    from piofvlm.integrations.vllm.selection import check_method

    with pytest.raises(ValueError, match="local_layer=5 does not exist"):
        check_method(method, tower, num_text_layers=8, model_type="llava")


def test_hf_overrides_names_the_plugin_class_and_refuses_what_it_cannot_run(tmp_path):
    from piofvlm.integrations.vllm import hf_overrides
    from piofvlm.testbed.model import CHECKPOINT_DIR

    assert hf_overrides(str(CHECKPOINT_DIR), "divprune", keep=64) == {
        "architectures": ["PiofvlmLlavaForConditionalGeneration"],
        "piofvlm": {"method": "divprune", "keep": 64},
    }
    assert hf_overrides("LlavaForConditionalGeneration", "none")["architectures"] == [
        "PiofvlmLlavaForConditionalGeneration"
    ]
    assert hf_overrides("LlavaNextForConditionalGeneration", "visionzip", keep=0.25)["architectures"] == [
        "PiofvlmLlavaNextForConditionalGeneration"
    ]
    assert hf_overrides("Qwen2_5_VLForConditionalGeneration", "pool", keep=0.25) == {
        "architectures": ["PiofvlmQwen2_5_VLForConditionalGeneration"],
        "piofvlm": {"method": "pool", "keep": 0.25},
    }
    with pytest.raises(ValueError, match="M-RoPE positions are grid coordinates"):
        hf_overrides("Qwen2_5_VLForConditionalGeneration", "divprune", keep=64, positions="renumber")
    with pytest.raises(ValueError, match="positions='renumber'"):
        hf_overrides("LlavaNextForConditionalGeneration", "divprune", keep=64, positions="keep")
    assert hf_overrides("Qwen3VLForConditionalGeneration", "random", keep=0.25) == {
        "architectures": ["PiofvlmQwen3VLForConditionalGeneration"],
        "piofvlm": {"method": "random", "keep": 0.25},
    }
    with pytest.raises(ValueError, match="M-RoPE positions are grid coordinates"):
        hf_overrides("Qwen3VLForConditionalGeneration", "pool", keep=0.25, positions="renumber")
    with pytest.raises(ValueError, match="does not run Qwen3VLMoeForConditionalGeneration .*not written"):
        hf_overrides("Qwen3VLMoeForConditionalGeneration", "divprune", keep=64)
    with pytest.raises(ValueError, match="does not run GemmaForCausalLM"):
        hf_overrides("GemmaForCausalLM", "divprune", keep=64)
    with pytest.raises(ValueError, match="cannot run in vLLM"):
        hf_overrides(str(CHECKPOINT_DIR), "fastv")
    with pytest.raises(ValueError, match="does not exist"):
        hf_overrides(str(tmp_path / "missing"), "divprune", keep=64)


# ---------------------------------------------------------------------------------------------------- LLaVA-NeXT
# anyres: each image's count depends on its size; the plugin's token layout is computed from the size alone and
# must be the one the model packs (base view, unpadded high-resolution grid, one image_newline per row).
NEXT_SIZES = [(28, 28), (56, 28), (28, 56), (40, 22), (23, 51), (60, 60)]


@functools.cache
def _tiny_next():
    from piofvlm.tiny.llava import build_llava_next, build_processor

    return build_llava_next(), build_processor("llava_next")


def _next_inputs(sizes=NEXT_SIZES):
    from piofvlm.tiny.llava import random_image

    model, processor = _tiny_next()
    images = [random_image(i, size) for i, size in enumerate(sizes)]
    text = ["USER : <image> what is the colour of the shape ? ASSISTANT :" for _ in images]
    return model, processor(images=images, text=text, return_tensors="pt", padding=True)


def _next_tower(model) -> VisionTower:
    adapter = get_adapter(model)
    return VisionTower(
        num_layers=len(adapter.vision_layers),
        feature_layer_index=adapter.vision_feature_layer_index,
        has_cls=adapter.vision_has_cls,
        side=7,
        attention=adapter.vision_attention,
    )


def _next_sources(model, inputs):
    from piofvlm.integrations.vllm.selection import anyres_sources

    config = model.config
    sources, first = [], 0
    for size in inputs["image_sizes"].tolist():
        sources.append(anyres_sources(size, 7, config.image_grid_pinpoints, config.vision_config.image_size, first))
        first += int(sources[-1]["crop"].max()) + 1 - first
    return sources


def test_anyres_layout_equals_the_models_packing():
    """The layout computed from image sizes == piofvlm's adapter (which runs the model's own packing on labels), and
    its length == the model's own per-image token count (the count vLLM's processor gives each image)."""
    model, inputs = _next_inputs()
    expected = get_adapter(model).visual_token_sources(dict(inputs))
    got = _next_sources(model, inputs)
    counts = (inputs["input_ids"] == 4).sum(1).tolist()
    assert len(set(counts)) > 2  # the sizes give different counts
    for b, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        assert len(mine["crop"]) == counts[b]
        for name in ("crop", "patch", "grid", "row", "col"):
            assert torch.equal(mine[name], theirs[name]), (b, name)


NEXT_CONFIGS = [
    {"method": "divprune", "keep": 0.25},
    {"method": "pool", "keep": 0.25},
    {"method": "random", "keep": 20, "seed": 3},
    {"method": "visionzip", "keep": 0.3},
    {"method": "vscan", "keep": 0.25, "local_layer": 0, "window": 4},
    {"method": "chain", "encoder": {"method": "visionzip", "keep": 24}},
]


@pytest.mark.parametrize("config", NEXT_CONFIGS, ids=lambda c: c["method"])
@torch.no_grad()
def test_plugin_selection_equals_piofvlm_on_llava_next(config):
    """Per image of different sizes (so different counts and budgets): the plugin's kept indices and embeddings ==
    piofvlm's on transformers with positions="renumber" (one image per sample, the batch left-padded)."""
    model, inputs = _next_inputs()
    method = method_from_config(config)
    reference = method_from_config(config)
    entering = {}

    def store(module, args, kwargs) -> None:
        entering.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

    with reference(model):
        hook = model.model.language_model.layers[0].register_forward_pre_hook(store, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
    kept_reference = reference.last_selection[0].kept
    adapter = get_adapter(model)
    tower = _next_tower(model)
    captured = {}
    hooks = [
        adapter.vision_layers[i].register_forward_pre_hook(
            functools.partial(lambda i, module, args: captured.__setitem__(i, args[0]), i)
        )
        for i in vision_layers_needed(method, tower)
    ]
    try:
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    finally:
        for hook in hooks:
            hook.remove()
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    features = list(features)
    valid = inputs["attention_mask"].bool()
    keys = _sample_keys(inputs["input_ids"], valid)
    sources = _next_sources(model, inputs)
    got = select_image_tokens(method, features, tower, captured, sample_keys=keys, sources=sources)
    # the pruned batch stays left-padded (right-aligned): each image ends as many tokens before the end as unpruned
    is_image = inputs["input_ids"] == 4
    after = inputs["input_ids"].shape[1] - 1 - (is_image.int() * torch.arange(is_image.shape[1])).argmax(1)
    for b in range(len(features)):
        k = tokens_per_image(method, features[b].shape[0])
        assert len(got.kept[b]) == k == len(kept_reference[b])
        assert torch.equal(got.kept[b].cpu(), kept_reference[b].cpu()), f"image {b}"
        start = entering["hidden"].shape[1] - int(after[b]) - k
        torch.testing.assert_close(got.embeddings[b], entering["hidden"][b, start : start + k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- Qwen2.5-VL
# M-RoPE: piofvlm's positions="keep" (the plugin gives the kept tokens their own grid coordinates in vLLM); the
# selection runs on each image's merged tokens in raster order of its (h / merge) x (w / merge) grid.
QWEN_SIZES = [(56, 56), (84, 56), (56, 112), (112, 56), (140, 84), (84, 140)]
QWEN_CONFIGS = [
    {"method": "divprune", "keep": 0.25},
    {"method": "pool", "keep": 0.3},
    {"method": "random", "keep": 3, "seed": 1},
    {"method": "chain", "encoder": {"method": "divprune", "keep": 0.5}},
]


QWEN_KINDS = ["qwen2_5_vl", "qwen3_vl"]


@functools.cache
def _tiny_qwen(kind: str = "qwen2_5_vl", dtype: torch.dtype = torch.float32):
    from piofvlm.tiny.qwen import build_qwen, build_qwen_processor

    return build_qwen(kind, dtype=dtype), build_qwen_processor(kind)


def _qwen_inputs(kind: str = "qwen2_5_vl", sizes=QWEN_SIZES, dtype: torch.dtype = torch.float32):
    from piofvlm.tiny.llava import random_image
    from piofvlm.tiny.qwen import IMAGE

    model, processor = _tiny_qwen(kind, dtype)
    images = [random_image(i, size) for i, size in enumerate(sizes)]
    text = [f"{IMAGE} what is the colour of the shape ?" for _ in images]
    return model, processor(images=images, text=text, return_tensors="pt", padding=True)


def _qwen_encoder_rows(model, inputs) -> list[torch.Tensor]:
    """Each image's encoder output as vLLM's Qwen-VL models return it from the vision tower: one row per merged
    token, ``[features | deepstack level 0 | level 1 | ...]`` (Qwen3-VL; Qwen2.5-VL: the features), read from the
    unpruned model's call of its language model (images only, in batch order)."""
    seen = {}

    def store(module, args, kwargs) -> None:
        seen.update(kwargs)

    hook = model.model.language_model.register_forward_pre_hook(store, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        hook.remove()
    is_image = inputs["input_ids"] == model.config.image_token_id
    rows = torch.cat([seen["inputs_embeds"][is_image], *(seen.get("deepstack_visual_embeds") or [])], dim=1)
    return list(rows.split([t * h * w // 4 for t, h, w in inputs["image_grid_thw"].tolist()]))


@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_qwen_layout_equals_the_adapters(kind):
    from piofvlm.integrations.vllm.selection import merged_grid_sources

    model, inputs = _qwen_inputs(kind)
    expected = get_adapter(model).visual_token_sources(dict(inputs))
    grids = inputs["image_grid_thw"].tolist()
    assert len({t * h * w for t, h, w in grids}) >= 4
    for b, grid in enumerate(grids):
        mine = merged_grid_sources(grid, 2, b)
        for name in ("crop", "patch", "grid", "row", "col"):
            assert torch.equal(mine[name], expected[b][name]), (b, name)


@pytest.mark.parametrize("kind", QWEN_KINDS)
@pytest.mark.parametrize("config", QWEN_CONFIGS, ids=lambda c: c["method"])
@torch.no_grad()
def test_plugin_selection_equals_piofvlm_on_qwen_vl(config, kind):
    """The plugin's kept indices == piofvlm's on transformers with positions="keep", per image of different grids
    (different counts and budgets)."""
    from piofvlm.integrations.vllm.selection import merged_grid_sources

    model, inputs = _qwen_inputs(kind)
    method = method_from_config(config, positions="keep")
    reference = method_from_config(config, positions="keep")
    with reference(model):
        model(**inputs)
    kept_reference = reference.last_selection[0].kept
    grids = inputs["image_grid_thw"].tolist()
    features = [rows[:, : model.config.text_config.hidden_size] for rows in _qwen_encoder_rows(model, inputs)]
    tower = VisionTower(num_layers=2, feature_layer_index=1, has_cls=False, side=0)
    keys = _sample_keys(inputs["input_ids"], inputs["attention_mask"].bool())
    sources = [merged_grid_sources(grid, 2, b) for b, grid in enumerate(grids)]
    got = select_image_tokens(method, features, tower, sample_keys=keys, sources=sources, model_type=kind)
    for b in range(len(grids)):
        k = tokens_per_image(method, features[b].shape[0])
        assert len(got.kept[b]) == k == len(kept_reference[b])
        assert torch.equal(got.kept[b].cpu(), kept_reference[b].cpu()), f"image {b}"


# ------------------------------------------------------------------------------------------------------ Qwen3-VL
# Deepstack: vLLM's Qwen3-VL encoder returns each visual token as one row [features | deepstack levels]; the plugin
# selects among the features and the kept rows' levels follow them (with_kept_rows), and it gives the kept tokens
# their own M-RoPE coordinates (shorter_prompt_mrope_positions + kept_mrope_channels). Here those pieces feed the
# transformers language model the way vLLM feeds its own (shorter prompt, kept embeddings at the image's slots,
# deepstack levels added there after layers 0 and 1), against piofvlm's pruned forward on transformers.
QWEN3_CONFIGS = [*QWEN_CONFIGS, {"method": "divprune", "keep": 1}]


def _plugin_language_model_logits(
    model, input_ids, rows, kept, grid, coordinates: bool = True, rows_of_kept: bool = True
) -> torch.Tensor:
    """The last position's logits of the shorter prompt as vLLM runs it with the plugin's kept rows (one image).
    ``coordinates=False`` leaves every kept token at its image's start; ``rows_of_kept=False`` takes the deepstack
    levels of the image's first tokens instead of the kept ones (both: what the checks must tell apart)."""
    from piofvlm.integrations.vllm.selection import kept_mrope_channels, shorter_prompt_mrope_positions

    width = model.config.text_config.hidden_size
    ids = input_ids[0]
    slots = (ids == model.config.image_token_id).nonzero()[:, 0]
    offset, k = int(slots[0]), len(kept)
    shorter = torch.cat([ids[:offset], ids.new_full((k,), model.config.image_token_id), ids[offset + len(slots) :]])
    positions, _ = shorter_prompt_mrope_positions(
        len(shorter), [(offset, k, grid[0], grid[1] // 2, grid[2] // 2, 1.0)]
    )
    if coordinates:
        positions[:, offset : offset + k] += kept_mrope_channels(grid, 2, kept)[:, :3].T
    deep = rows[kept if rows_of_kept else torch.arange(k), width:]
    embeds = model.model.get_input_embeddings()(shorter)[None].clone()
    embeds[0, offset : offset + k] = rows[kept, :width]
    levels = deep.shape[1] // width
    out = model.model.language_model(
        inputs_embeds=embeds,
        position_ids=positions[:, None],
        attention_mask=torch.ones_like(shorter)[None],
        visual_pos_masks=(shorter == model.config.image_token_id)[None],
        deepstack_visual_embeds=[deep[:, i * width : (i + 1) * width] for i in range(levels)],
    )
    return model.lm_head(out.last_hidden_state[:, -1])[0]


@pytest.mark.parametrize("config", QWEN3_CONFIGS, ids=lambda c: f"{c['method']}-{c.get('keep', 'chain')}")
@torch.no_grad()
def test_plugin_qwen3_vl_deepstack_and_positions_give_piofvlms_logits(config):
    """Per image of a different grid (one sample each, fp64): the logits of vLLM's inputs built by the plugin's
    pieces == piofvlm's on transformers (positions="keep"); without the kept tokens' coordinates, or with the
    deepstack levels of other tokens, they differ (what this test tells apart)."""
    from piofvlm.integrations.vllm.selection import merged_grid_sources, with_kept_rows

    for size in QWEN_SIZES[-2:]:  # 5 x 3 and 3 x 5 merged tokens
        model, inputs = _qwen_inputs("qwen3_vl", sizes=[size], dtype=torch.float64)
        assert len(model.config.vision_config.deepstack_visual_indexes) == 2
        reference = method_from_config(config, positions="keep")
        with reference(model):
            expected = model(**inputs).logits[0, -1]
        (grid,) = inputs["image_grid_thw"].tolist()
        (rows,) = _qwen_encoder_rows(model, inputs)
        width = model.config.text_config.hidden_size
        assert rows.shape[1] == 3 * width  # the features and two deepstack levels
        method = method_from_config(config, positions="keep")
        keys = _sample_keys(inputs["input_ids"], inputs["attention_mask"].bool())
        got = select_image_tokens(
            method,
            [rows[:, :width]],
            VisionTower(num_layers=2, feature_layer_index=1, has_cls=False, side=0),
            sample_keys=keys,
            sources=[merged_grid_sources(grid, 2, 0)],
            model_type="qwen3_vl",
        )
        (kept,) = got.kept
        assert torch.equal(kept.cpu(), reference.last_selection[0].kept[0].cpu())
        (joined,) = with_kept_rows(got.embeddings, [rows[:, width:]], got.kept)
        assert torch.equal(joined[:, width:], rows[kept, width:])
        # pool writes the cell's mean into the kept centre token; the other methods keep the token's own features
        full = rows.clone()
        full[kept, :width] = joined[:, :width]
        logits = _plugin_language_model_logits(model, inputs["input_ids"], full, kept, grid)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)
        if len(kept) > 1:  # a lone kept token at (0, 0, 0) or among the first rows would not tell them apart
            moved = _plugin_language_model_logits(model, inputs["input_ids"], full, kept, grid, coordinates=False)
            assert (moved - expected).abs().max() > 1e-6
        if not torch.equal(kept.cpu(), torch.arange(len(kept))):
            others = _plugin_language_model_logits(model, inputs["input_ids"], full, kept, grid, rows_of_kept=False)
            assert (others - expected).abs().max() > 1e-6


def test_kept_mrope_channels_and_the_shorter_prompt_are_the_unpruned_positions_of_the_kept_tokens():
    """Independent of any model: the shorter prompt's positions + each kept token's channels == the unpruned
    prompt's M-RoPE positions at the kept slots (text included), for images of several grids, two per prompt."""
    from piofvlm.integrations.vllm.selection import kept_mrope_channels, shorter_prompt_mrope_positions

    generator = torch.Generator().manual_seed(0)
    for grids in ([(1, 4, 6), (1, 8, 4)], [(1, 6, 6), (1, 2, 10)], [(1, 10, 2), (1, 4, 4)]):
        # unpruned: 3 text tokens, image 0, 2 text tokens, image 1, 4 text tokens (Qwen's get_rope_index rule)
        pieces, unpruned, start = [], [], 0
        for grid in grids:
            h, w = grid[1] // 2, grid[2] // 2
            text = torch.arange(3 if not pieces else 2) + start
            unpruned.append(text.expand(3, -1))
            base = int(text[-1]) + 1
            coords = torch.stack(
                [torch.zeros(h * w, dtype=torch.long), torch.arange(h * w) // w, torch.arange(h * w) % w]
            )
            unpruned.append(coords + base)
            start = base + max(h, w)
            pieces.append(h * w)
        unpruned.append((torch.arange(4) + start).expand(3, -1))
        unpruned = torch.cat(unpruned, dim=1)
        kept = [torch.randperm(n, generator=generator)[: max(1, n // 3)].sort().values for n in pieces]
        # the shorter prompt and the slots of the unpruned one it keeps
        items, keep_slots, offset, source = [], [], 0, 0
        for i, (grid, n, k) in enumerate(zip(grids, pieces, kept, strict=True)):
            text = 3 if i == 0 else 2
            keep_slots += list(range(source, source + text)) + (source + text + k).tolist()
            offset += text
            items.append((offset, len(k), *grid[:1], grid[1] // 2, grid[2] // 2, 1.0))
            offset += len(k)
            source += text + n
        keep_slots += list(range(source, source + 4))
        positions, delta = shorter_prompt_mrope_positions(offset + 4, items)
        for (slot, k, *_), grid, index in zip(items, grids, kept, strict=True):
            channels = kept_mrope_channels(grid, 2, index)
            assert torch.equal(channels[:, 3], torch.full((len(index),), max(grid[1], grid[2]) // 2))
            positions[:, slot : slot + k] += channels[:, :3].T
        assert torch.equal(positions, unpruned[:, keep_slots])
        assert delta == int(unpruned.max()) + 1 - (offset + 4)
