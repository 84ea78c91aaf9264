"""Contract tests: each transformers internal reached through ``piofvlm.transformers_compat`` still has the shape the
library relies on. A failure names the internal, the installed transformers version and the function to update."""

from __future__ import annotations

import functools
import inspect
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from piofvlm import transformers_compat
from piofvlm.adapters import get_adapter
from piofvlm.tiny import llava as toy
from piofvlm.tiny import qwen as toy_qwen

VERSION = transformers_compat.TRANSFORMERS_VERSION


def contract(holds: bool, internal: str, function: str) -> None:
    """Fail with the message a maintainer needs: which internal moved, in which release, what to change."""
    if not holds:
        pytest.fail(
            f"transformers {VERSION} changed {internal}; piofvlm.transformers_compat.{function} must learn it",
            pytrace=False,
        )


@functools.cache
def llava():
    model = toy.build_llava(num_layers=2)
    inputs = toy.build_processor("llava")(
        images=[toy.random_image(0, (28, 28))], text=["USER : <image> how many ? ASSISTANT :"], return_tensors="pt"
    )
    return model, inputs


def record_calls(module: torch.nn.Module, calls: list[dict]) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)


def test_cache_kwarg_the_hooks_receive():
    model, inputs = llava()
    adapter = get_adapter(model)
    lm_calls: list[dict] = []
    layer_calls: list[dict] = []
    hooks = [record_calls(adapter.language_model, lm_calls), record_calls(adapter.layers[1], layer_calls)]
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    decode = lm_calls[-1]
    contract(
        transformers_compat.cache_from_kwargs(decode) is not None
        and transformers_compat.cache_from_kwargs(decode).get_seq_length() > 0,
        "the KV-cache keyword the language model receives during decoding (hooks read it)",
        "cache_from_kwargs",
    )
    contract(
        transformers_compat.cache_from_kwargs(layer_calls[-1]) is not None,
        "the KV-cache keyword the decoder layers receive",
        "cache_from_kwargs",
    )
    name = transformers_compat.cache_kwarg_name(adapter.layers[0])
    contract(
        name in inspect.signature(type(adapter.layers[0]).forward).parameters,
        "the KV-cache parameter name of the decoder layers' forward",
        "cache_kwarg_name",
    )


def test_a_layer_runs_without_a_cache():
    model, _ = llava()
    layer = get_adapter(model).layers[0]
    hidden = torch.randn(1, 5, model.config.text_config.hidden_size)
    position_ids = torch.arange(5)[None]
    tables = get_adapter(model).language_model.rotary_emb(hidden, position_ids=position_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecated name would become an error in a later release
        out = layer(hidden, attention_mask=None, position_embeddings=tables, position_ids=position_ids,
                    **transformers_compat.without_cache(layer))  # fmt: skip
    out = out[0] if isinstance(out, tuple) else out
    contract(tuple(out.shape) == (1, 5, hidden.shape[-1]), "the decoder layer's call without cache", "without_cache")


def test_output_cache_field():
    model, inputs = llava()
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        generated = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True, do_sample=False)
    for output in (out, generated):
        cache = transformers_compat.output_cache(output)
        contract(
            hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0,
            f"the KV-cache field of {type(output).__name__}",
            "output_cache",
        )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mask_interface(attn):
    config = toy.build_llava(attn=attn, num_layers=1).config.text_config
    key_valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    try:
        mask = transformers_compat.causal_padding_mask(config, key_valid, 2, torch.float32)
    except TypeError as error:
        contract(False, f"the masking_utils mask functions' arguments ({error})", "causal_padding_mask")
    causal = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)  # queries are the last two keys
    expected = causal[None, None] & key_valid[:, None, None, :]  # (B, 1, 2, 4)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    contract(
        mask is not None and torch.equal(allowed, expected), "the masking_utils mask format", "causal_padding_mask"
    )


def _rotary_case(model):
    """Adapter, ``(2, 6, d)`` hidden states and position ids in the family's layout (``(B, S)`` or ``(3, B, S)``)."""
    adapter = get_adapter(model)
    hidden = torch.randn(2, 6, adapter.text_config.hidden_size)
    positions = torch.arange(6)
    position_ids = positions.expand(3, 2, 6) if adapter.position_batch_dim else positions.expand(2, 6)
    return adapter, hidden, position_ids


@pytest.mark.parametrize("kind", ["llava", *toy_qwen.QWEN_KINDS])
def test_rotary_function_and_table_layout(kind):
    model = toy.build_llava(num_layers=1) if kind == "llava" else toy_qwen.build_qwen(kind)
    adapter, hidden, position_ids = _rotary_case(model)
    cos, sin = adapter.language_model.rotary_emb(hidden, position_ids=position_ids)
    head_dim = adapter.layers[0].self_attn.head_dim
    contract(
        tuple(cos.shape) == (2, 6, head_dim),
        f"the layout of {type(adapter.language_model.rotary_emb).__name__}'s tables (expected (B, S, head_dim), got "
        f"{tuple(cos.shape)})",
        "rotary_function",
    )
    rotary = adapter.rotary_fn()
    q = torch.randn(2, 4, 6, head_dim)
    q_rot, _ = rotary(q, q, cos, sin)
    # Rotation keeps each pair's norm: the layout and the function agree.
    contract(
        torch.allclose(q_rot.norm(dim=-1), q.norm(dim=-1), atol=1e-5),
        f"the rotary application of the {kind} family",
        "rotary_function",
    )
    _rotary_transpose_and_flat_layout(rotary, cos, sin, head_dim, kind)


def _rotary_transpose_and_flat_layout(rotary, cos, sin, head_dim: int, name: str) -> None:
    """What PIO's closed-form proxy relies on: the function with ``-sin`` is the rotation's transpose, and it takes
    flat ``(B S, H, hd)`` operands with ``(B S, r)`` tables and an empty second operand."""
    a, b = torch.randn(2, 4, 6, head_dim, dtype=torch.float64), torch.randn(2, 4, 6, head_dim, dtype=torch.float64)
    cos, sin = cos.double(), sin.double()
    rotated_a, _ = rotary(a, a, cos, sin)
    _, back_b = rotary(b, b, cos, -sin)
    flat = a.transpose(1, 2).flatten(0, 1)  # (B S, H, hd)
    rotated_flat, empty = rotary(flat, flat[:, :0], cos.flatten(0, 1), sin.flatten(0, 1))
    contract(
        torch.allclose((rotated_a * b).sum(), (a * back_b).sum(), rtol=1e-12)
        and torch.allclose(rotated_flat, rotated_a.transpose(1, 2).flatten(0, 1), rtol=1e-12)
        and empty.numel() == 0,
        f"the rotary function of the {name} family (rotary(., cos, -sin) as the transpose; flat operands)",
        "rotary_function",
    )


def test_glm4v_partial_interleaved_rotary():
    """GLM-4.xV: ``(B, S, head_dim * partial_rotary_factor)`` tables; ``apply_rotary_pos_emb`` rotates interleaved
    pairs of the first ``rotary_dim`` dims and leaves the rest: the fast proxy applies it as the attention does."""
    from piofvlm.tiny.families import build_glm4v

    adapter, hidden, position_ids = _rotary_case(build_glm4v(num_layers=1))
    cos, sin = adapter.language_model.rotary_emb(hidden, position_ids=position_ids + 3)
    head_dim = adapter.layers[0].self_attn.head_dim
    rotary_dim = int(head_dim * adapter.text_config.rope_parameters["partial_rotary_factor"])
    contract(
        tuple(cos.shape) == (2, 6, rotary_dim),
        f"the layout of Glm4vTextRotaryEmbedding's tables (expected (B, S, {rotary_dim}), got {tuple(cos.shape)})",
        "rotary_function",
    )
    q = torch.randn(2, 2, 6, head_dim)
    q_rot, _ = adapter.rotary_fn()(q, q, cos, sin)
    pairs, rotated_pairs = q[..., :rotary_dim].unflatten(-1, (-1, 2)), q_rot[..., :rotary_dim].unflatten(-1, (-1, 2))
    contract(
        torch.equal(q_rot[..., rotary_dim:], q[..., rotary_dim:])
        and torch.allclose(rotated_pairs.norm(dim=-1), pairs.norm(dim=-1), atol=1e-5)
        and not torch.allclose(q_rot, q),
        "modeling_glm4v.apply_rotary_pos_emb (partial rotation of interleaved pairs)",
        "rotary_function",
    )
    _rotary_transpose_and_flat_layout(adapter.rotary_fn(), cos, sin, head_dim, "glm4v")


def test_qwen_vision_internals():
    rotary = transformers_compat.qwen_vision_rotary_function()
    contract(
        list(inspect.signature(rotary).parameters)[:4] == ["q", "k", "cos", "sin"],
        "Qwen2-VL's apply_rotary_pos_emb_vision",
        "qwen_vision_rotary_function",
    )
    config = toy_qwen.build_qwen("qwen2_5_vl").config.vision_config
    grid = torch.tensor([[1, 8, 12]])
    index = transformers_compat.vision_window_index(grid, config)
    units = int(grid.prod() // config.spatial_merge_size**2)
    contract(torch.equal(index.sort().values, torch.arange(units)), "Qwen2.5-VL's window index", "vision_window_index")


def test_generate_passes_pre_encoded_features_or_pixels():
    model, inputs = llava()
    adapter = get_adapter(model)
    calls: list[dict] = []
    hook = record_calls(adapter.multimodal_model, calls)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    prefill = calls[0]
    features = transformers_compat.encoded_features(prefill)
    if features is None:
        contract(
            prefill.get("pixel_values") is not None, "how generate() hands images to the model", "encoded_features"
        )
    else:
        tokens = int((inputs["input_ids"] == adapter.image_token_id).sum())
        contract(
            isinstance(features, (list, tuple)) and sum(f.shape[0] for f in features) == tokens,
            "generate()'s pre-encoded features (mm_encoder_outputs[...].pooler_output, one tensor per image)",
            "encoded_features",
        )


def test_video_feature_argument():
    from transformers import LlavaOnevisionModel

    parameters = inspect.signature(LlavaOnevisionModel.get_video_features).parameters
    bound = transformers_compat.encode_call_inputs("video", {name: object() for name in parameters if "pixel" in name})
    contract(
        "pixel_values_videos" in bound and "pixel_values" not in bound,
        "the video argument of LlavaOnevisionModel.get_video_features",
        "encode_call_inputs",
    )


def test_rotary_table_flops():
    model, _ = llava()
    adapter = get_adapter(model)
    hidden = torch.randn(1, 7, adapter.text_config.hidden_size)
    counter = FlopCounterMode(display=False)
    with counter:
        adapter.language_model.rotary_emb(hidden, position_ids=torch.arange(7)[None])
    head_dim = adapter.layers[0].self_attn.head_dim
    contract(
        counter.get_total_flops() == transformers_compat.rotary_table_flops(head_dim, 7),
        "how the Llama rotary module computes its frequencies (FLOPs counted)",
        "rotary_table_flops",
    )


def test_version_range_matches_pyproject():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (spec,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("transformers")]
    floor, ceiling = transformers_compat.TESTED_RANGE
    assert spec == f"transformers>={floor},<{ceiling}"


@pytest.mark.parametrize(
    ("version", "status"), [("5.16.2", "older"), ("5.17.0", "tested"), ("5.25.0", "tested"), ("5.26.0", "newer")]
)
def test_version_status_and_warning(version, status, monkeypatch):
    assert transformers_compat.version_status(version) == status
    message = transformers_compat.version_message(version)
    assert (message is None) == (status == "tested")
    if message is not None:
        assert version in message and "piofvlm doctor" in message
        monkeypatch.setattr(transformers_compat, "TRANSFORMERS_VERSION", version)
        with pytest.warns(UserWarning, match=version):
            transformers_compat.check_version()


def test_pil_image_processor_check():
    from transformers import CLIPImageProcessorPil

    assert transformers_compat.pil_image_processor_usable(CLIPImageProcessorPil)

    class NeedsTorchvision:
        def __init__(self):
            raise ImportError("needs torchvision")

    assert not transformers_compat.pil_image_processor_usable(NeedsTorchvision)


def test_tiled_canvas_is_the_internvl_processors_grid():
    """Pictures that brighten along their long side: the processor's tiles (raster order) brighten tile by tile
    exactly when the grid ``tiled_canvas`` gives for their tile count lies along that side, as the processor's."""
    import numpy as np
    from PIL import Image

    from piofvlm.tiny import families as toy_families

    processor = toy_families.build_internvl_processor().image_processor
    for width, height in ((64, 32), (32, 64), (96, 32)):
        ramp = np.linspace(0, 255, max(width, height)).astype(np.uint8)
        array = np.broadcast_to((ramp[None, :] if width > height else ramp[:, None])[..., None], (height, width, 3))
        out = processor(images=[Image.fromarray(np.ascontiguousarray(array))], return_tensors="pt")
        tiles = int(out["num_patches"][0]) - 1  # the last one is the thumbnail
        columns, rows = transformers_compat.tiled_canvas(height, width, 32, tiles)
        means = out["pixel_values"][:tiles].mean(dim=(1, 2, 3))  # (tiles,) raster order over the grid
        contract(
            (columns, rows) == ((tiles, 1) if width > height else (1, tiles)) and bool((means.diff() > 0.3).all()),
            "GOT-OCR2's get_optimal_tiled_canvas (InternVL's tile grid)",
            "tiled_canvas",
        )


# ----------------------------------------------------------------------------------- production paths (issue 15)
def test_static_cache_internals():
    from transformers import DynamicCache, StaticCache

    model, _ = llava()
    cache = StaticCache(config=model.config, max_cache_len=17)
    contract(
        transformers_compat.static_cache_length(cache) == 17,
        "StaticCache layers (cache_utils.StaticLayer with max_cache_len)",
        "static_cache_length",
    )
    contract(transformers_compat.static_cache_length(DynamicCache()) is None, "DynamicCache", "static_cache_length")
    contract(
        isinstance(transformers_compat.static_cache_position(cache, 1), torch.Tensor),
        "StaticLayer.cumulative_length (a tensor: each layer's own write position)",
        "static_cache_position",
    )
    mask = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    assert transformers_compat.full_attention_mask({"full_attention": mask, "sliding_attention": None}) is mask
    with pytest.raises(ValueError, match="sliding"):
        transformers_compat.full_attention_mask({"full_attention": mask, "sliding_attention": mask})


def test_compile_config_and_generate_compiled_call():
    config = transformers_compat.compile_config(backend="eager")
    contract(
        config.backend == "eager" and config._compile_all_devices is True,
        "CompileConfig._compile_all_devices (generate() compiles on CPUs only with it)",
        "compile_config",
    )
    model = toy.build_llava(num_layers=1)
    assert transformers_compat.compiled_forward(model) is None
    model.get_compiled_call(config)  # what generate() calls to compile static-cache decoding (compiles lazily)
    contract(
        transformers_compat.compiled_forward(model) is not None,
        "GenerationMixin.get_compiled_call (caches the compiled forward as model._compiled_call)",
        "compiled_forward",
    )
    transformers_compat.reset_compiled(model)
    assert transformers_compat.compiled_forward(model) is None


def test_dynamic_cache_layers_can_be_left_padded():
    """``generate()`` and the model read the cache length from layer 0; padding it must change that length, keep the
    cached entries at the end, and the next ``update`` must append after them."""
    from transformers.cache_utils import DynamicCache, StaticCache

    model = toy.build_llava(num_layers=2)
    with torch.no_grad():
        out = model.model.language_model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    cache = transformers_compat.output_cache(out)
    contract(transformers_compat.is_dynamic_cache(cache), "the cache the language model creates", "is_dynamic_cache")
    keys = cache.layers[0].keys.clone()
    transformers_compat.pad_cache_layer(cache, 0, 2)
    contract(
        cache.get_seq_length() == 5 and cache.get_seq_length(1) == 3,
        "DynamicLayer.keys/values or get_seq_length (the length must follow the keys tensor)",
        "pad_cache_layer",
    )
    same = torch.equal(cache.layers[0].keys[:, :, 2:], keys)
    contract(same, "DynamicLayer.keys layout (B, H, S, D)", "pad_cache_layer")
    cache.update(torch.ones(1, keys.shape[1], 1, keys.shape[3]), torch.ones(1, keys.shape[1], 1, keys.shape[3]), 0)
    contract(cache.get_seq_length() == 6, "DynamicLayer.update (appends on the sequence axis)", "pad_cache_layer")
    static = StaticCache(config=model.config.text_config, max_cache_len=8)
    assert not transformers_compat.is_dynamic_cache(static)
    assert transformers_compat.is_dynamic_cache(DynamicCache())


def test_own_cache_layer_copies_what_a_graphed_layer_wrote():
    """The compiled post-prune prefill under CUDA graphs copies a layer's keys and values out of the graphs' pool:
    the cache must keep reading (and appending to) the copies."""
    model = toy.build_llava(num_layers=2)
    with torch.no_grad():
        out = model.model.language_model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    cache = transformers_compat.output_cache(out)
    keys, values = cache.layers[1].keys, cache.layers[1].values
    transformers_compat.own_cache_layer(cache, 1)
    copied = cache.layers[1].keys
    contract(
        torch.equal(copied, keys) and copied.data_ptr() != keys.data_ptr()
        and torch.equal(cache.layers[1].values, values) and cache.layers[0].keys.data_ptr() != copied.data_ptr(),
        "DynamicLayer.keys/values (the tensors the cache reads)",
        "own_cache_layer",
    )  # fmt: skip
    keys[:] = 0  # what a replay of the graph would do to its pool
    contract(not torch.equal(cache.layers[1].keys, keys), "DynamicLayer.keys", "own_cache_layer")
    transformers_compat.own_cache_layer(cache, 5)  # no such layer: nothing


# ---------------------------------------------------------------------------------------------------------- Gemma 3
@functools.cache
def gemma3():
    from piofvlm.tiny.families import build_gemma3, gemma3_inputs

    return build_gemma3(num_layers=2), gemma3_inputs((0, 2))


def test_gemma3_rotary_tables_per_layer_type():
    """``Gemma3RotaryEmbedding(x, position_ids, layer_type)``: ``(B, S, head_dim)`` tables, local and global bases
    differ; ``apply_rotary_pos_emb`` keeps each pair's norm."""
    model, _ = gemma3()
    adapter, hidden, position_ids = _rotary_case(model)
    local = adapter.rotary_embeddings(hidden, position_ids + 3, "sliding_attention")
    full = adapter.rotary_embeddings(hidden, position_ids + 3, "full_attention")
    head_dim = adapter.layers[0].self_attn.head_dim
    contract(
        tuple(local[0].shape) == (2, 6, head_dim) and not torch.allclose(local[0], full[0]),
        "Gemma3RotaryEmbedding.forward(x, position_ids, layer_type) (one (B, S, head_dim) table per layer type)",
        "rotary_function",
    )
    q = torch.randn(2, 4, 6, head_dim)
    q_rot, _ = adapter.rotary_fn()(q, q, *local)
    contract(
        torch.allclose(q_rot.norm(dim=-1), q.norm(dim=-1), atol=1e-5) and not torch.allclose(q_rot, q),
        "modeling_gemma3.apply_rotary_pos_emb",
        "rotary_function",
    )


def test_gemma3_image_block_ids():
    token_type_ids = torch.tensor([[0, 1, 1, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0]])
    contract(
        torch.equal(
            transformers_compat.image_block_ids(token_type_ids),
            torch.tensor([[-1, 0, 0, -1, 1, 1, -1], [-1, -1, -1, 0, 0, 0, -1]]),
        ),
        "modeling_gemma3.get_block_sequence_ids_for_mask (a block index per run of token_type_ids == 1, else -1)",
        "image_block_ids",
    )


def test_gemma4_vision_block_ids():
    mm_token_type_ids = torch.tensor([[0, 1, 1, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0]])
    contract(
        torch.equal(
            transformers_compat.vision_block_ids(mm_token_type_ids),
            torch.tensor([[-1, 0, 0, -1, 1, 1, -1], [-1, -1, -1, 0, 0, 0, -1]]),
        ),
        "modeling_gemma4.get_block_sequence_ids_for_mask (a block index per run of vision mm_token_type_ids)",
        "vision_block_ids",
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma4_masks_equal_the_models(attn):
    """The Gemma 4 adapter's masks (vision blocks in sliding layers only) equal ``create_masks_for_vision_model``'s,
    with left padding; ``is_dynamic_cache`` accepts the cache with a DummyLayer for the KV-shared layer."""
    from transformers.models.gemma4 import modeling_gemma4

    from piofvlm.adapters import get_adapter
    from piofvlm.tiny.families import build_gemma4, gemma4_inputs

    model, inputs = build_gemma4(attn=attn), gemma4_inputs()
    config = model.config.get_text_config()
    embeds = torch.zeros(*inputs["input_ids"].shape, config.hidden_size)
    valid = inputs["attention_mask"].bool()
    blocks = transformers_compat.vision_block_ids(inputs["mm_token_type_ids"])
    stock = modeling_gemma4.create_masks_for_vision_model(
        config, embeds, inputs["attention_mask"], None, None, block_sequence_ids=blocks
    )
    source = torch.where(valid, torch.arange(valid.shape[1])[None], -1)
    ours = get_adapter(model).prefill_masks(valid, source, embeds.dtype, None, dict(inputs))
    for kind in ("full_attention", "sliding_attention"):
        contract(
            torch.equal(ours[kind], stock[kind]),
            f"the {kind} mask Gemma 4 builds (create_masks_for_vision_model: blocks in sliding layers only)",
            "layer_type_mask",
        )
    with torch.no_grad():
        cache = transformers_compat.output_cache(model(**inputs, use_cache=True))
    contract(transformers_compat.is_dynamic_cache(cache), "the cache Gemma 4 creates (DummyLayer)", "is_dynamic_cache")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma3_layer_type_masks_equal_the_models(attn):
    """``layer_type_mask`` composes the masks as ``Gemma3Model`` does: with image blocks (prefill with
    ``token_type_ids``) and without (``create_masks_for_generate``), full and sliding, with left padding."""
    from transformers.masking_utils import create_masks_for_generate
    from transformers.models.gemma3 import modeling_gemma3

    model, inputs = gemma3()
    config = model.config.get_text_config()
    previous = config._attn_implementation
    config._attn_implementation = attn
    try:
        embeds = torch.zeros(*inputs["input_ids"].shape, config.hidden_size)
        valid = inputs["attention_mask"].bool()
        seq_len = valid.shape[1]
        blocks = transformers_compat.image_block_ids(inputs["token_type_ids"])
        # (config, inputs_embeds, attention_mask, cache, position_ids): the cache argument was renamed in 5.24
        arguments = (config, embeds, inputs["attention_mask"], None, None)
        stock = {
            "blocks": modeling_gemma3.create_masks_for_vision_model(*arguments, block_sequence_ids=blocks),
            "plain": create_masks_for_generate(*arguments),
        }
        for case, ids in (("blocks", blocks), ("plain", None)):
            for kind, window in (("full_attention", None), ("sliding_attention", config.sliding_window)):
                ours = transformers_compat.layer_type_mask(
                    config, valid, seq_len, embeds.dtype, sliding_window=window, block_ids=ids
                )
                theirs = stock[case][kind]
                contract(
                    (ours is None and theirs is None) or (ours is not None and torch.equal(ours, theirs)),
                    f"the {kind} mask Gemma 3 builds ({case}: masking_utils or_masks/and_masks/blockwise_overlay/"
                    "sliding_window_overlay)",
                    "layer_type_mask",
                )
    finally:
        config._attn_implementation = previous


def test_sliding_cache_layers():
    """``DynamicSlidingWindowLayer`` (Gemma 3's local layers) keeps its last ``sliding_window - 1`` slots and counts
    every slot it saw; ``get_mask_sizes`` says how many it presents; left-padding it counts slots without keys."""
    model, _ = gemma3()
    lm = get_adapter(model).language_model
    window = lm.config.sliding_window
    for length in (window + 4, 5):
        with torch.no_grad():
            out = lm(input_ids=torch.arange(length)[None] % 40 + 7, use_cache=True)
        cache = transformers_compat.output_cache(out)
        contract(transformers_compat.is_dynamic_cache(cache), "the cache Gemma 3 creates", "is_dynamic_cache")
        past = min(length, window - 1)
        contract(
            transformers_compat.visible_past_keys(cache, 0, 1) == past
            and transformers_compat.visible_past_keys(cache, 1, 1) == length,
            "Cache.get_mask_sizes(query_length, layer_idx) of sliding and full layers",
            "visible_past_keys",
        )
        keys = cache.layers[0].keys.clone()
        transformers_compat.pad_cache_layer(cache, 0, 3)
        stored = cache.layers[0].keys
        contract(
            cache.get_seq_length(0) == length + 3
            and stored.shape[2] == min(length + 3, window - 1)
            and torch.equal(stored[:, :, stored.shape[2] - keys.shape[2] :], keys)
            and transformers_compat.visible_past_keys(cache, 0, 1) == stored.shape[2],
            "DynamicSlidingWindowLayer.cumulative_length/keys (the window keeps the last sliding_window - 1 slots)",
            "pad_cache_layer",
        )


@functools.cache
def qwen3_5():
    """The tiny Qwen3.5 (linear, full, linear, full attention) and a left-padded batch of two."""
    from piofvlm.tiny.families import build_qwen3_5, qwen3_5_inputs

    return build_qwen3_5(), qwen3_5_inputs((0, 1))


def test_qwen3_5_partial_rotary_and_gated_queries():
    """Qwen3.5 full-attention layers: ``(B, S, head_dim * partial_rotary_factor)`` tables rotating the first dims in
    halves (``modeling_qwen3_5.apply_rotary_pos_emb``); ``q_proj`` gives per head the query then the gate."""
    model, _ = qwen3_5()
    adapter, hidden, position_ids = _rotary_case(model)
    cos, sin = adapter.language_model.rotary_emb(hidden, position_ids=position_ids + 3)
    attn = adapter.layers[1].self_attn
    rotary_dim = int(attn.head_dim * adapter.text_config.rope_parameters["partial_rotary_factor"])
    contract(
        tuple(cos.shape) == (2, 6, rotary_dim), "the layout of Qwen3_5TextRotaryEmbedding's tables", "rotary_function"
    )
    q = torch.randn(2, 2, 6, attn.head_dim)
    q_rot, _ = adapter.rotary_fn()(q, q, cos, sin)
    contract(
        torch.equal(q_rot[..., rotary_dim:], q[..., rotary_dim:])
        and torch.allclose(q_rot[..., :rotary_dim].norm(dim=-1), q[..., :rotary_dim].norm(dim=-1), atol=1e-5),
        "modeling_qwen3_5.apply_rotary_pos_emb (partial rotation, halves)",
        "rotary_function",
    )
    contract(
        attn.q_proj.out_features == 2 * attn.config.num_attention_heads * attn.head_dim,
        "Qwen3_5Attention.q_proj (query and gate per head, 2 * H * head_dim outputs)",
        "rotary_function",
    )


def test_recurrent_padding_mask_and_hybrid_cache():
    """Linear-attention layers get the 2-D padding mask (None without padding); the hybrid cache holds their conv /
    recurrent states, reports its length from the first attention layer, and counts as a dynamic cache."""
    model, inputs = qwen3_5()
    adapter = get_adapter(model)
    calls: list[dict] = []
    hook = record_calls(adapter.layers[0], calls)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
    finally:
        hook.remove()
    valid = inputs["attention_mask"].bool()
    rebuilt = transformers_compat.recurrent_padding_mask(adapter.text_config, valid)
    given = calls[0]["attention_mask"]
    contract(
        isinstance(given, torch.Tensor) and given.shape == valid.shape and torch.equal(rebuilt, given),
        "the mask linear-attention layers receive (create_recurrent_attention_mask: the 2-D padding mask)",
        "recurrent_padding_mask",
    )
    contract(
        transformers_compat.recurrent_padding_mask(adapter.text_config, torch.ones_like(valid)) is None,
        "create_recurrent_attention_mask (None without padding)",
        "recurrent_padding_mask",
    )
    cache = transformers_compat.output_cache(out)
    contract(transformers_compat.is_dynamic_cache(cache), "the hybrid cache's layer classes", "is_dynamic_cache")
    index = transformers_compat.cache_length_layer(cache)
    contract(
        index in (0, 1) and cache.get_seq_length() == cache.get_seq_length(index) == valid.shape[1],
        "Cache.get_seq_length on a hybrid cache (5.17-5.24: the first attention layer's length; 5.25+: layer 0's, "
        "linear-attention layers count their tokens)",
        "cache_length_layer",
    )
    conv, recurrent = transformers_compat.linear_attention_states(cache, 0)
    mixer = adapter.layers[0].linear_attn
    contract(
        tuple(conv.shape) == (2, mixer.conv_dim, mixer.conv_kernel_size)
        and tuple(recurrent.shape) == (2, mixer.num_v_heads, mixer.head_k_dim, mixer.head_v_dim),
        "the conv / recurrent state layouts of LinearAttentionLayer",
        "linear_attention_states",
    )


def test_image_text_to_text_model_types():
    """The auto-mapping ``piofvlm families`` reads: model types to class names transformers exports."""
    import transformers

    mapping = transformers_compat.image_text_to_text_model_types()
    contract(
        mapping.get("llava") == "LlavaForConditionalGeneration"
        and all(hasattr(transformers, name) for name in mapping.values()),
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES (model_type -> class name)",
        "image_text_to_text_model_types",
    )


@pytest.mark.parametrize("kind", ["llava", "qwen3_5", "gemma3"])
def test_a_cache_pruned_before_layer_0_reports_the_prompt_length_and_continues(kind):
    """What the hooks rely on, exercised as they use it: after a prefill pruned before layer 0 every layer holds
    fewer slots than the prompt, and the layer the cache reads its length from (``cache_length_layer``: layer 0, or
    5.17-5.24's first attention layer of a hybrid cache) is padded back (``pad_cache_layer``: zero slots, a sliding
    window's count, 5.25's linear-attention token count). ``Cache.get_seq_length()`` must then report the unpruned
    length, and a follow-up turn must equal a no-cache forward of the kept conversation (the self-test of ``piofvlm
    doctor`` runs the same check on every family)."""
    import piofvlm
    from piofvlm import doctor
    from piofvlm.tiny.cases import TINY_CASES

    model, inputs = TINY_CASES[kind]()
    adapter = get_adapter(model)
    greedy = {"do_sample": False, "suppress_tokens": [adapter.image_token_id]}
    with torch.no_grad(), piofvlm.get_method("random", layers=[0], keep=0.5)(model):
        out = model(**inputs, use_cache=True)
    cache, prompt = transformers_compat.output_cache(out), inputs["input_ids"].shape[1]
    index = transformers_compat.cache_length_layer(cache)
    contract(
        int(cache.get_seq_length()) == prompt and int(cache.get_seq_length(index)) == prompt,
        f"Cache.get_seq_length of a cache pruned before layer 0 (reads layer {index}: {cache.get_seq_length()} "
        f"tokens, expected the prompt's {prompt})",
        "cache_length_layer",
    )
    with torch.no_grad():
        problem = doctor.pruned_continuation_error(model, inputs, greedy)
    contract(problem is None, f"the continuation of a pruned cache ({problem})", "pad_cache_layer")


@pytest.mark.parametrize("kind", ["llava", "gemma3", "gemma4", "qwen3_5"])
def test_norm_epsilon_of_every_rms_norm_the_proxy_reads(kind):
    """``norm_epsilon`` finds the epsilon under either name (Gemma 4's ``eps`` became ``variance_epsilon`` in 5.25)
    on the decoder norms and the final norm, equal to the config's ``rms_norm_eps``."""
    from piofvlm.tiny.cases import TINY_CASES, UNAVAILABLE

    if kind in UNAVAILABLE:
        pytest.skip(UNAVAILABLE[kind])
    model, _ = TINY_CASES[kind]()
    adapter = get_adapter(model)
    layer = adapter.layers[0]
    norms = [layer.input_layernorm, layer.post_attention_layernorm, adapter.language_model.norm]
    found = [transformers_compat.norm_epsilon(norm) for norm in norms]
    contract(
        found == [adapter.text_config.rms_norm_eps] * len(norms),
        f"the epsilon attribute of {sorted({type(n).__name__ for n in norms})} (found {found})",
        "norm_epsilon",
    )


@pytest.mark.parametrize("family", sorted(transformers_compat._ROTARY_MODULES))
def test_owned_rotary_formula_equals_the_familys_and_refuses_a_changed_one(family, monkeypatch):
    """piofvlm applies its own rotary formula, checked bit for bit against the family's ``apply_rotary_pos_emb``: a
    wrapper that behaves the same (5.25's kernels ``Func`` module, ``(*args, **kwargs)``) is accepted, a function
    computing something else is refused."""
    import importlib

    module = importlib.import_module(transformers_compat._ROTARY_MODULES[family])
    original = module.apply_rotary_pos_emb
    transformers_compat.rotary_function.cache_clear()
    ours = transformers_compat.rotary_function(family)
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    cos, sin = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    assert all(torch.equal(a, b) for a, b in zip(ours(q, k, cos, sin), original(q, k, cos, sin), strict=True))

    class Wrapped(torch.nn.Module):  # what kernels' use_kernel_forward_from_hub makes of a function
        def forward(self, *args, **kwargs):
            return original(*args, **kwargs)

    monkeypatch.setattr(module, "apply_rotary_pos_emb", Wrapped())
    transformers_compat.rotary_function.cache_clear()
    assert transformers_compat.rotary_function(family) is ours
    other = transformers_compat.apply_rotary_halves if ours is transformers_compat.apply_rotary_pairs else None
    changed = other or (lambda q, k, cos, sin, unsqueeze_dim=1: original(q, k, cos, -sin, unsqueeze_dim))
    monkeypatch.setattr(module, "apply_rotary_pos_emb", changed)
    transformers_compat.rotary_function.cache_clear()
    with pytest.raises(transformers_compat.TransformersInternalsError, match="rotary_function must learn it"):
        transformers_compat.rotary_function(family)
    monkeypatch.undo()
    transformers_compat.rotary_function.cache_clear()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attn_implementation_of_a_text_config(attn):
    """The implementation ``set_attn_implementation`` selects is what the adapter (and the mechanism) read."""
    model = toy.build_llava(num_layers=2, attn=attn)
    assert transformers_compat.attn_implementation(get_adapter(model).text_config) == attn
    assert get_adapter(model).attn_implementation == attn


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_helpers(family):
    """LLaVA-NeXT's anyres arithmetic: the tile grid of a 40x60 (h x w) picture is the best pinpoint (transformers'
    public ``select_best_resolution``) cut into 32-px tiles, its crops those tiles + the base view; unpadding a
    4x8 grid back to the picture's 2:3 aspect keeps 4x6."""
    from transformers.image_processing_utils import select_best_resolution

    helpers = transformers_compat.anyres_helpers(family)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    best = select_best_resolution((40, 60), pinpoints)
    rows, cols = best[0] // 32, best[1] // 32
    assert helpers.get_anyres_image_grid_shape((40, 60), pinpoints, 32) == (rows, cols)
    assert helpers.image_size_to_num_patches((40, 60), pinpoints, 32) == rows * cols + 1
    assert tuple(helpers.unpad_image(torch.empty(0, 4, 8), torch.tensor([40, 60])).shape) == (0, 4, 6)


@pytest.mark.parametrize("kind", ["llava", "qwen3_vl", "gemma3", "glm4v", "qwen3_5", "qwen3_vl_moe"])
def test_decoder_layer_parts_are_the_modules_the_layer_runs(kind):
    """``layer_attention_parts`` / ``layer_input_norm`` / ``layer_post_attention_norm`` / ``layer_mlp`` (what the fast
    proxy and the explicit-attention methods recompute with) name modules that the stock forward of that layer
    actually runs, with a head size that divides the projections; a layer without them is diagnosed."""
    from piofvlm.tiny.cases import TINY_CASES, UNAVAILABLE

    if kind in UNAVAILABLE:
        pytest.skip(UNAVAILABLE[kind])
    model, inputs = TINY_CASES[kind]()
    adapter = get_adapter(model)
    index = next(i for i in range(adapter.num_layers) if adapter.is_attention_layer(i))
    layer = adapter.layers[index]
    attn = transformers_compat.layer_attention_parts(layer)
    named = {
        "input_norm": transformers_compat.layer_input_norm(layer),
        "mlp": transformers_compat.layer_mlp(layer),
        **{name: getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")},
    }
    from piofvlm.adapters.contract.proxy import FastProxySupport

    if type(adapter).decoder_layer_output is FastProxySupport.decoder_layer_output:  # Llama's tail
        named["post_attention_norm"] = transformers_compat.layer_post_attention_norm(layer)
    named = {name: module for name, module in named.items() if module is not None}
    calls = dict.fromkeys(named, 0)
    hooks = [
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in named.items()
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    contract(
        all(count >= 1 for count in calls.values()) and attn.module is layer.self_attn,
        f"{type(layer).__name__}'s modules (calls in one forward: {calls})",
        "layer_attention_parts",
    )
    contract(
        attn.q_proj.out_features % attn.head_dim == 0 and attn.k_proj.out_features % attn.head_dim == 0,
        f"{type(layer.self_attn).__name__}.head_dim ({attn.head_dim})",
        "attention_parts",
    )
    with pytest.raises(transformers_compat.TransformersInternalsError, match="layer_attention_parts must learn it"):
        transformers_compat.layer_attention_parts(torch.nn.Linear(2, 2))
    with pytest.raises(transformers_compat.TransformersInternalsError, match="attention_parts must learn it"):
        transformers_compat.attention_parts(torch.nn.Linear(2, 2))
