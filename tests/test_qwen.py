"""Mechanism invariants on every family with per-item layouts: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (M-RoPE, deepstack),
LLaVA-OneVision, and the families of ``piofvlm.tiny.families`` (InternVL, LLaVA-NeXT-Video, Mistral 3, SmolVLM):
video, dynamic resolution, several images per prompt, padding."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import piofvlm
from conftest import FixedSelection, assert_decode_equals_uncached
from piofvlm import transformers_compat
from piofvlm.adapters import get_adapter
from piofvlm.methods.pio import proxy_loss
from piofvlm.tiny.families import FAMILIES
from piofvlm.tiny.qwen import (
    IMAGE,
    ONEVISION,
    OV_IMAGE,
    OV_VIDEO,
    QWEN_KINDS,
    VIDEO,
    add_videos,
    build_onevision,
    build_onevision_processor,
    build_qwen,
    build_qwen_processor,
    random_image,
)
from test_pio import capture_context, simple_nms

NEW_KINDS = list(FAMILIES)
KINDS = [*QWEN_KINDS, ONEVISION, *NEW_KINDS]
#: Families with 3-D M-RoPE positions (``get_rope_index``): positions kept, ``renumber`` refused.
MROPE_KINDS = (*QWEN_KINDS, "glm4v", "glm46v", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe")
#: Families of ``tiny.families`` laid out by Qwen3-VL's processor (a video written frame by frame: counted from grids).
QWEN3_LAYOUT_KINDS = ("qwen3_5", "qwen3_vl_moe", "qwen3_5_moe")

#: Per sample: prompt, image sizes and video grids. Qwen (dynamic resolution): images of 16, 18, 15 + 8 tokens, a
#: video of 12. LLaVA-OneVision: anyres images of 112, 203 tokens, a 2-frame video of 33, two multi-image views of 50.
QWEN_SAMPLES = [
    (f"USER : {IMAGE} what is the colour of the circle ? ASSISTANT :", [(112, 112)], []),
    (f"USER : {IMAGE} left {VIDEO} how many ? ASSISTANT :", [(168, 84)], [(2, 4, 6)]),
    (
        f"USER : {IMAGE} right {IMAGE} describe this picture please , count the small objects . ASSISTANT :",
        [(84, 140), (112, 56)],
        [],
    ),
]
ONEVISION_SAMPLES = [
    (prompt.replace(IMAGE, OV_IMAGE).replace(VIDEO, OV_VIDEO), sizes, videos)
    for (prompt, _, videos), sizes in zip(QWEN_SAMPLES, [[(28, 28)], [(40, 60)], [(56, 30), (28, 28)]], strict=True)
]
EXPECTED_COUNTS = {
    ONEVISION: [[112], [203, 33], [50, 50]],
    **{kind: [[16], [18, 12], [15, 8]] for kind in QWEN_KINDS},
    **{kind: family.counts for kind, family in FAMILIES.items()},
}
SUPPRESS = list(range(4, 11))  # a random model may emit placeholder ids (SmolVLM: 4-10)
#: Greedy, exactly 4 new tokens (no early end of sequence, so batch and single outputs line up).
GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "suppress_tokens": SUPPRESS}


def kinds_and_attn() -> list:
    """(kind, attn) for sdpa and eager; the newer families' eager cases run in the slow suite (the quick suite checks
    each invariant once per new family, with sdpa)."""
    return [
        pytest.param(kind, attn, marks=pytest.mark.slow) if kind in NEW_KINDS and attn == "eager" else (kind, attn)
        for kind in KINDS
        for attn in ("sdpa", "eager")
    ]


@functools.cache
def model(kind: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    if kind in FAMILIES:
        return FAMILIES[kind].build(attn=attn, dtype=dtype)
    if kind == ONEVISION:
        return build_onevision(attn=attn, dtype=dtype)
    return build_qwen(kind, attn=attn, dtype=dtype)


@functools.cache
def processor(kind: str):
    if kind in FAMILIES:
        return None  # some processors need torchvision: tiny.families lays their inputs out
    return build_onevision_processor() if kind == ONEVISION else build_qwen_processor(kind)


def make_inputs(kind: str, indices=(0, 1, 2)):
    if kind in FAMILIES:
        return FAMILIES[kind].inputs(tuple(indices))
    samples = ONEVISION_SAMPLES if kind == ONEVISION else QWEN_SAMPLES
    prompts = [samples[i][0] for i in indices]
    images = [[random_image(10 * i + j, size) for j, size in enumerate(samples[i][1])] for i in indices]
    if kind != ONEVISION:
        images = [image for sample in images for image in sample]
    videos = [grid for i in indices for grid in samples[i][2]]
    return add_videos(kind, processor(kind), prompts, images, videos)


def placeholder_ids(kind: str) -> tuple[int, int]:
    config = model(kind).config
    return config.image_token_id, getattr(config, "video_token_id", None) or -1


def tokenizer(kind: str):
    return FAMILIES[kind].tokenizer() if kind in FAMILIES else processor(kind).tokenizer


def visual_counts(kind: str, inputs) -> list[list[int]]:
    """Per sample, the tokens of each image / video in prompt order, from the processor's output alone."""
    image_id, video_id = placeholder_ids(kind)
    # Items separated by text: one run of placeholders per item (Qwen3.5 writes a video frame by frame, as Qwen3-VL:
    # counted from the grids below)
    if kind == ONEVISION or (kind in FAMILIES and kind not in QWEN3_LAYOUT_KINDS):
        joiners = FAMILIES[kind].joiners if kind in FAMILIES else ()  # text inside an item (Mistral 3's row breaks)
        return [
            [
                len(run.replace("j", ""))
                for run in "".join(
                    "iv"[t == video_id] if t in (image_id, video_id) else "j" if t in joiners else " " for t in row
                ).split()
            ]
            for row in inputs["input_ids"].tolist()
        ]
    sizes = {
        image_id: iter([int(g.prod()) // 4 for g in inputs["image_grid_thw"]]),
        video_id: iter([int(g.prod()) // 4 for g in inputs.get("video_grid_thw", [])]),
    }
    result = []
    for row in inputs["input_ids"].tolist():
        sample, remaining = [], 0
        for token in row:
            if token in sizes:
                if remaining == 0:
                    remaining = next(sizes[token])
                    sample.append(remaining)
                remaining -= 1
        result.append(sample)
    return result


def expected_kept(ratio: float, count: int) -> int:
    return max(1, int(ratio * count + 0.5))


@pytest.mark.parametrize("kind", KINDS)
def test_toy_inputs_and_item_counts(kind):
    """Dynamic resolution, video and several images per prompt; the adapter counts every item as the processor did."""
    inputs = make_inputs(kind)
    counts = visual_counts(kind, inputs)
    assert counts == EXPECTED_COUNTS[kind]
    got = get_adapter(model(kind)).image_token_counts(0, dict(inputs))
    # None: the family's items are its contiguous runs (InternVL, SmolVLM, Idefics3); test_exact_counts checks them
    runs_are_items = ("internvl", "smolvlm", "idefics3", "idefics2", "got_ocr2", "pp_chart2table")
    assert got == [n for sample in counts for n in sample] or (got is None and kind in runs_are_items)
    if kind in QWEN_KINDS:
        assert set(inputs["mm_token_type_ids"][1].tolist()) == {0, 1, 2}


@pytest.mark.parametrize(("kind", "attn"), kinds_and_attn())
@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 3])  # batch 3 has padding: stricter
def test_keep_all_is_identical(kind, attn, batch):
    """Keep-all at layers 0 and 2 (before and after Qwen3-VL's deepstack layers): bit-identical logits and tokens."""
    m = model(kind, attn)
    inputs = make_inputs(kind, indices=(1,) if batch == 1 else (0, 1, 2))
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = m(**inputs).logits
        reference_gen = m.generate(**inputs, max_new_tokens=5, do_sample=False)
        method = piofvlm.get_method("pio", layers=[0, 2], keep=[1.0, 1.0])
        with method(m):
            pruned = m(**inputs).logits
            pruned_gen = m.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(pruned[valid], reference[valid])
    assert torch.equal(pruned_gen, reference_gen)
    assert [len(k) for k in method.last_selection[0].kept] == [sum(c) for c in visual_counts(kind, inputs)]


#: Families whose prompt is a bidirectional prefix by design (PaliGemma's prefix-LM: every prompt token sees every
#: other): tests/test_paligemma.py checks their prefill against the unhooked model on the kept sequence instead.
BIDIRECTIONAL_PROMPT_KINDS = ("paligemma",)


@pytest.mark.parametrize(
    ("kind", "attn"),
    [c for c in kinds_and_attn() if getattr(c, "values", c)[0] not in BIDIRECTIONAL_PROMPT_KINDS],
)
def test_prefill_stays_causal_after_pruning(kind, attn):
    """Changing the last prompt token changes no earlier logit (the authors' Qwen path became bidirectional here)."""
    m = model(kind, attn)
    inputs = make_inputs(kind, indices=(0, 1))
    other = dict(inputs)
    other["input_ids"] = inputs["input_ids"].clone()
    other["input_ids"][:, -1] = tokenizer(kind).convert_tokens_to_ids("?")
    totals = [sum(c) for c in visual_counts(kind, inputs)]
    chosen = [[[0, 3, 5, 9, 12], [1, 2, 17, 20, 29]]]
    method = FixedSelection(layers=[1], keep=5, budget_scope="sample", chosen=chosen)
    with torch.no_grad(), method(m):
        first = m(**inputs).logits
        second = m(**other).logits
    # the pruned output is a shorter left-padded batch: each sample's real tokens are its last ones
    lengths = inputs["attention_mask"].sum(1) - torch.tensor(totals) + 5
    for b, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(first[b, -length:-1], second[b, -length:-1], rtol=0, atol=1e-6)
    assert not torch.allclose(first[:, -1], second[:, -1])


@pytest.mark.parametrize("kind", KINDS)
def test_exact_counts_and_cache_lengths(kind):
    m = model(kind)
    inputs = make_inputs(kind)
    method = piofvlm.get_method("pio", layers=[1, 3], keep=[0.5, 0.2])
    with torch.no_grad(), method(m):
        out = m(**inputs, use_cache=True)
    counts = visual_counts(kind, inputs)
    records = method.last_selection
    stage1 = [sum(expected_kept(0.5, n) for n in sample) for sample in counts]  # a ratio applies per image / video
    stage2 = [sum(expected_kept(0.2, n) for n in sample) for sample in counts]
    assert [len(k) for k in records[0].kept] == stage1
    assert [len(k) for k in records[1].kept] == stage2
    for record in records:
        for kept, candidates in zip(record.kept, record.candidates, strict=True):
            assert torch.equal(kept, kept.sort().values)
            assert bool(torch.isin(kept, candidates).all())
    # per item: each image (tile, frame) of sample 2 keeps half of its own tokens at stage 1
    bounds = torch.tensor([0, *counts[2]]).cumsum(0).tolist()
    kept = records[0].kept[2]
    assert [int(((kept >= lo) & (kept < hi)).sum()) for lo, hi in zip(bounds, bounds[1:], strict=False)] == [
        expected_kept(0.5, n) for n in counts[2]
    ]
    text = inputs["attention_mask"].sum(1) - torch.tensor([sum(c) for c in counts])
    length1, length2 = int((text + torch.tensor(stage1)).max()), int((text + torch.tensor(stage2)).max())
    cache = transformers_compat.output_cache(out)
    expected = [inputs["input_ids"].shape[1], length1, length1, length2]
    adapter = get_adapter(m)
    if all(adapter.is_attention_layer(i) for i in range(4)):
        assert [cache.get_seq_length(i) for i in range(4)] == expected
    else:  # a hybrid stack (Qwen3.5): KV lengths of its attention layers, state shapes of its linear ones
        assert_hybrid_cache(adapter, cache, expected, batch_size=3)


def assert_hybrid_cache(adapter, cache, expected: list[int], batch_size: int) -> None:
    """Per layer of a hybrid stack: an attention layer caches ``expected[i]`` keys, except the layer transformers reads
    the cache length from, which a prune before it left-pads to the prompt length ``expected[0]``; a linear-attention
    layer holds a conv state ``(B, conv_dim, kernel)`` and a recurrent state ``(B, H_v, d_k, d_v)``, whatever the
    sequence length."""
    config = adapter.text_config
    length_layer = transformers_compat.cache_length_layer(cache)
    for i, length in enumerate(expected):
        if adapter.is_attention_layer(i):
            assert cache.get_seq_length(i) == (expected[0] if i == length_layer else length), i
            continue
        conv, recurrent = transformers_compat.linear_attention_states(cache, i)
        key_dim = config.linear_num_key_heads * config.linear_key_head_dim
        conv_dim = 2 * key_dim + config.linear_num_value_heads * config.linear_value_head_dim
        assert tuple(conv.shape) == (batch_size, conv_dim, config.linear_conv_kernel_dim)
        heads = (batch_size, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim)
        assert tuple(recurrent.shape) == heads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scope", ["image", "sample", "modality"])
def test_budget_scopes_with_images_and_video(kind, scope):
    """Sample 1 has an image then a video (families without a video placeholder: more images, or frames written as
    images): together, separately, or per image / video."""
    m = model(kind)
    inputs = make_inputs(kind, indices=(1,))
    counts = visual_counts(kind, inputs)[0]
    method = piofvlm.get_method("random", layers=[1], keep=6, budget_scope=scope)
    with torch.no_grad(), method(m):
        m(**inputs)
    kept = method.last_selection[0].kept[0]
    bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
    per_item = [int(((kept >= lo) & (kept < hi)).sum()) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    separate_video = kind not in FAMILIES or FAMILIES[kind].has_video
    if scope == "sample" or (scope == "modality" and not separate_video):
        assert sum(per_item) == 6
    elif scope == "modality":  # the images vs the videos (one of each here)
        assert per_item == [6, 6]
    else:  # "image": each image and each video is a group of its own
        assert per_item == [6] * len(counts)
    smallest = min(range(len(counts)), key=lambda i: (counts[i], i))  # the first group a budget overflows
    too_many = counts[smallest] + 1
    message = rf"keep={too_many} visual tokens is more than group {smallest} of sample 0 has \({counts[smallest]}\)"
    with pytest.raises(ValueError, match=message):
        with torch.no_grad(), piofvlm.get_method("random", layers=[1], keep=too_many, budget_scope="image")(m):
            m(**inputs)


def decode_cases() -> list:
    """(kind, positions, attn); renumber for the 1-D RoPE families; the newer families' cases other than
    (renumber, sdpa) ((keep, sdpa) for M-RoPE) run in the slow suite."""
    cases = []
    for kind in KINDS:
        for positions in ("keep", "renumber") if kind not in MROPE_KINDS else ("keep",):
            for attn in ("sdpa", "eager"):
                quick = ("keep" if kind in MROPE_KINDS else "renumber", "sdpa")  # one quick case per new family
                slow = kind in NEW_KINDS and (positions, attn) != quick
                cases.append(pytest.param(kind, positions, attn, marks=[pytest.mark.slow] if slow else []))
    return cases


@pytest.mark.parametrize(("kind", "positions", "attn"), decode_cases())
def test_decode_continuity(kind, attn, positions):
    """Cached greedy decoding after pruning equals a no-cache forward of the same pruned sequence (rope_deltas)."""
    m = model(kind, attn)
    inputs = make_inputs(kind)
    layers, keep = [0, 2], [0.6, 0.3]
    method = piofvlm.get_method("pio", layers=layers, keep=keep, positions=positions)
    new_tokens = 5
    with torch.no_grad(), method(m):
        generated = m.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            suppress_tokens=SUPPRESS,
        )
    chosen = [[k.tolist() for k in record.kept] for record in method.last_selection]
    fixed = FixedSelection(layers=layers, keep=keep, chosen=chosen, positions=positions)
    assert_decode_equals_uncached(m, inputs, generated, fixed, new_tokens)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method_name", ["pio", "random"])
def test_batch_equals_single(kind, method_name):
    """Padding, mixed image sizes and a video in one batch: each sample equals its single run."""
    m = model(kind)
    inputs = make_inputs(kind)
    method = piofvlm.get_method(method_name, layers=[1, 2], keep=[0.4, 0.2])
    with torch.no_grad(), method(m):
        batch_logits = m(**inputs).logits[:, -1]
        batch_gen = m.generate(**inputs, **GREEDY)[:, -4:]
        batch_kept = [[k.tolist() for k in r.kept] for r in method.last_selection]
        for i in range(3):
            single = make_inputs(kind, indices=(i,))
            torch.testing.assert_close(m(**single).logits[:, -1], batch_logits[i : i + 1], rtol=1e-4, atol=1e-5)
            assert [r.kept[0].tolist() for r in method.last_selection] == [kept[i] for kept in batch_kept]
            assert torch.equal(m.generate(**single, **GREEDY)[:, -4:], batch_gen[i : i + 1])


def independent_scores(kind, m, inputs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-layer autograd on the unhooked model's hidden states at ``layer``; Qwen M-RoPE from ``get_rope_index``."""
    with torch.no_grad():
        hidden = m(**inputs, output_hidden_states=True).hidden_states[layer]
    if kind == "paligemma":  # 1-indexed positions
        positions = torch.arange(1, hidden.shape[1] + 1)[None]
    elif kind not in MROPE_KINDS:  # 1-D RoPE
        positions = torch.arange(hidden.shape[1])[None]
    else:
        positions, _ = m.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
        )
    lm = get_adapter(m).language_model
    x = hidden.clone().requires_grad_(True)
    seq = x.shape[1]
    mask, rotary, extra = None, None, {}
    if kind == "paligemma":  # one unpadded sample: its whole prompt is the bidirectional prefix, in every layer type
        rotary = lm.rotary_emb(x, positions)
        mask = torch.ones(1, 1, seq, seq, dtype=torch.bool)
        if m.config.text_config._attn_implementation == "eager":
            mask = torch.zeros(1, 1, seq, seq, dtype=x.dtype)  # additive
    elif kind == "llama4":  # complex rotary table; a chunked layer sees the keys of its chunk only (no padding)
        rotary = lm.rotary_emb(x, positions)
        query, key = torch.arange(seq)[:, None], torch.arange(seq)[None]
        allowed = key <= query
        if lm.config.layer_types[layer] == "chunked_attention":
            allowed &= key // lm.config.attention_chunk_size == query // lm.config.attention_chunk_size
        mask = allowed[None, None]
        if m.config.text_config._attn_implementation == "eager":
            mask = torch.zeros(1, 1, seq, seq, dtype=x.dtype).masked_fill(~mask, torch.finfo(x.dtype).min)
    elif kind not in ("gemma3", "gemma4", "shieldgemma2"):
        rotary = lm.rotary_emb(x, positions)
    else:  # the layer's own RoPE base; a local layer sees the last `sliding_window` slots only
        layer_type = lm.config.layer_types[layer]
        rotary = lm.rotary_emb(x, positions, layer_type)
        query, key = torch.arange(seq)[:, None], torch.arange(seq)[None]
        allowed = key <= query  # the loss rows are text: image blocks do not change them
        if layer_type == "sliding_attention":
            allowed &= key > query - lm.config.sliding_window
        mask = allowed[None, None]
    if kind == "gemma4":  # the layer's per-layer input: token identity (image tokens as padding) + embeddings
        visual_ids = get_adapter(m).visual_token_mask(inputs["input_ids"])
        ids = inputs["input_ids"].masked_fill(visual_ids, lm.config.pad_token_id)
        with torch.no_grad():
            embeds = m(**inputs, output_hidden_states=True).hidden_states[0]
            per_layer = lm.project_per_layer_inputs(embeds, lm.get_per_layer_inputs(ids))
        extra = {"per_layer_input": per_layer[:, :, layer], "shared_kv_states": {}}
    with torch.enable_grad():
        out = lm.layers[layer](x, attention_mask=mask, position_embeddings=rotary, **extra)
        logits = m.get_output_embeddings()(lm.norm(out))[0].float()  # Llama 4: language_model.lm_head
        cap = getattr(lm.config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma 2 (PaliGemma 2): the model's logits are softcapped
            logits = torch.tanh(logits / cap) * cap
        window = logits[seq - 5 : seq - 1]
        (grad,) = torch.autograd.grad(F.cross_entropy(window, window.argmax(-1)), x)
    visual = get_adapter(m).visual_token_mask(inputs["input_ids"])[0]
    return grad[0, visual].float().norm(dim=-1), hidden[0, visual]


#: Families without a fast proxy (their adapter's rotary_fn is None: PIO runs the layer's own forward, tested against
#: the independent computation above); tests/test_gemma4.py checks that fast=True takes that path.
#: PaliGemma 2: attention softcapping (tests/test_paligemma.py); Llama 4: complex RoPE, NoPE (tests/test_llama4.py).
REFERENCE_PROXY_KINDS = ("gemma4", "paligemma", "llama4")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", [0, 3])  # Qwen3-VL's recorded hidden states exclude deepstack: use layers 0, 3
def test_kept_indices_match_independent_computation(kind, layer):
    m = model(kind)
    inputs = make_inputs(kind, indices=(1,))
    scores, feats = independent_scores(kind, m, inputs, layer)
    assert bool((scores > 0).any())
    k = expected_kept(0.3, len(scores))
    method = piofvlm.get_method("pio", layers=[layer], keep=0.3, budget_scope="sample")
    with torch.no_grad(), method(m):
        m(**inputs)
    record = method.last_selection[0]
    torch.testing.assert_close(record.scores[0], scores, rtol=1e-4, atol=1e-7)
    assert record.kept[0].tolist() == simple_nms(scores, feats, k, 0.8)


@pytest.mark.parametrize(
    ("kind", "attn", "dtype"),
    [
        pytest.param(kind, attn, dtype, marks=[pytest.mark.slow] if kind in NEW_KINDS and attn == "eager" else [])
        for kind in KINDS
        if kind not in REFERENCE_PROXY_KINDS
        for attn in ("sdpa", "eager")
        for dtype in (torch.float64, torch.float32)
    ],
)
def test_fast_proxy_equals_reference(kind, attn, dtype):
    """The fast proxy applies the family's own rotary function to the combined M-RoPE tables: same gradient."""
    m = model(kind, attn, dtype=dtype)
    # eager fp64 with padding is NaN in stock transformers (see test_pio): that case runs one unpadded sample
    inputs = make_inputs(kind, indices=(1,) if (attn, dtype) == ("eager", torch.float64) else (0, 1, 2))
    for key in ("pixel_values", "pixel_values_videos", "high_res_pixel_values"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    ctx = capture_context(m, inputs, layer=2)
    assert ctx.adapter.rotary_fn() is not None
    fast = proxy_loss.proxy_gradient(ctx, 2, fast=True)
    reference = proxy_loss.proxy_gradient(ctx, 2, fast=False)
    valid = ctx.valid
    if dtype == torch.float64 and attn == "sdpa":
        assert (fast - reference)[valid].abs().max().item() < 1e-10
    else:
        scale = reference[valid].abs().max()
        assert ((fast - reference)[valid].abs().max() / scale).item() < 1e-5
    assert all(p.grad is None for p in m.parameters())


def test_deepstack_follows_pruning_before_deepstack_layers():
    """Qwen3-VL, prune at 0 (before both deepstack layers): equals the stock language model run on the kept tokens,
    with their own positions and only their deepstack features."""
    m = model("qwen3_vl")
    inputs = make_inputs("qwen3_vl", indices=(1,))
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)

    lm = m.model.language_model
    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            m(**inputs)
    finally:
        hook.remove()
    visual = captured["visual_pos_masks"][0]
    kept_visual = [1, 4, 6, 17, 18, 25, 29]  # from the image (18 tokens) and the video (12)
    keep_slot = ~visual
    keep_slot[visual.nonzero()[kept_visual, 0]] = True
    with torch.no_grad():
        hidden = lm(
            inputs_embeds=captured["inputs_embeds"][:, keep_slot],
            position_ids=captured["position_ids"][:, :, keep_slot],
            attention_mask=torch.ones(1, int(keep_slot.sum()), dtype=torch.long),
            visual_pos_masks=visual[keep_slot][None],
            deepstack_visual_embeds=[f[kept_visual] for f in captured["deepstack_visual_embeds"]],
        ).last_hidden_state
        expected = m.lm_head(hidden[:, -1])
        fixed = FixedSelection(layers=[0], keep=len(kept_visual), budget_scope="sample", chosen=[[kept_visual]])
        with fixed(m):
            got = m(**inputs).logits[:, -1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", MROPE_KINDS)
def test_renumber_is_refused(kind):
    with pytest.raises(ValueError, match=f"positions='renumber' is not defined for {kind} models; use 'keep'"):
        piofvlm.get_method("pio", positions="renumber").apply(model(kind))
