"""Every method x model family x budget: exact kept counts, keep-all identity, hooks removed, determinism, batching."""

from __future__ import annotations

import pytest
import torch

import piofvlm
from conftest import make_inputs, model, single_inputs

KINDS = ["llava", "llava_next"]

# name -> (fields, number of stages); the tiny models have 4 decoder layers and 2 vision layers.
MATRIX: dict[str, tuple[dict, int]] = {
    "random": ({"layers": [1]}, 1),
    "pool": ({}, 1),
    "fastv": ({"layers": [2]}, 1),
    "pdrop": ({"layers": [1, 3]}, 2),
    "dart": ({"layers": [2], "image_pivots": 2, "text_pivots": 2}, 1),
    "divprune": ({}, 1),
    "sparsevlm": ({"layers": [1, 2]}, 2),
    "cdpruner": ({}, 1),
    "visionzip": ({}, 1),
    "vscan": ({"local_layer": 0, "window": 3}, 1),
    "chain": ({"encoder": {"method": "visionzip", "keep": 1.0}, "llm": {"method": "pio", "layers": [2]}}, 1),
}


def build(name: str, keep, **extra):
    """The method with ``keep`` at its last stage (earlier stages keep twice as much, capped at everything)."""
    fields, stages = MATRIX[name]
    if name == "chain":  # the llm part carries the budget, the encoder part keeps twice as much
        first = min(1.0, 2 * keep) if isinstance(keep, float) else 2 * keep
        encoder = {**fields["encoder"], "keep": first}
        return piofvlm.get_method(name, encoder=encoder, llm={**fields["llm"], "keep": keep}, **extra)
    if stages > 1:
        first = min(1.0, 2 * keep) if isinstance(keep, float) else 2 * keep
        keep = [first, keep]
    return piofvlm.get_method(name, **{**fields, "keep": keep, **extra})


def expected(keep, counts: list[int]) -> list[int]:
    if isinstance(keep, int):
        return [keep] * len(counts)
    return [max(1, int(keep * n + 0.5)) for n in counts]


def image_counts(kind: str, inputs) -> list[list[int]]:
    """Visual tokens per image, per sample (one image per sample in these inputs)."""
    return [[int(n)] for n in (inputs["input_ids"] == 4).sum(1)]


def hook_counts(m) -> list[tuple[int, int]]:
    return [(len(mod._forward_pre_hooks), len(mod._forward_hooks)) for mod in m.modules()]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MATRIX))
@pytest.mark.parametrize("keep", [0.3, 5])
def test_exact_counts_and_hooks_removed(kind, name, keep):
    m = model(kind)
    inputs = make_inputs(kind)
    with torch.no_grad():
        m(**inputs)  # transformers adds its own recorder hooks on the first forward
    before = hook_counts(m)
    method = build(name, keep)
    with torch.no_grad(), method(m):
        out = m(**inputs)
    assert hook_counts(m) == before
    assert torch.isfinite(out.logits).all()
    counts = [c[0] for c in image_counts(kind, inputs)]
    assert [len(k) for k in method.last_selection[-1].kept] == expected(keep, counts)
    for record in method.last_selection:
        for kept, candidates in zip(record.kept, record.candidates, strict=True):
            assert bool(torch.isin(kept, candidates).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MATRIX))
def test_keep_all_is_identical(kind, name):
    m = model(kind)
    inputs = make_inputs(kind)
    valid = inputs["attention_mask"].bool()
    method = build(name, 1.0)
    with torch.no_grad():
        reference = m(**inputs).logits
        with method(m):
            pruned = m(**inputs).logits
    torch.testing.assert_close(pruned[valid], reference[valid], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MATRIX))
def test_batch_equals_single_and_deterministic(kind, name):
    m = model(kind)
    inputs = make_inputs(kind)
    method = build(name, 0.3)
    with torch.no_grad(), method(m):
        m(**inputs)
        batch_kept = [[k.tolist() for k in r.kept] for r in method.last_selection]
        m(**inputs)
        assert [[k.tolist() for k in r.kept] for r in method.last_selection] == batch_kept
        for i in range(3):
            m(**single_inputs(kind, i))
            assert [r.kept[0].tolist() for r in method.last_selection] == [kept[i] for kept in batch_kept]


@pytest.mark.parametrize("name", ["fastv", "pdrop", "dart", "sparsevlm"])
def test_attention_based_methods_agree_under_sdpa_and_eager(name):
    inputs = make_inputs("llava")
    kept = []
    for attn in ("sdpa", "eager"):
        method = build(name, 0.3)
        with torch.no_grad(), method(model("llava", attn)):
            model("llava", attn)(**inputs)
        kept.append([[k.tolist() for k in r.kept] for r in method.last_selection])
    assert kept[0] == kept[1]


def test_random_seed_changes_the_draw():
    inputs = make_inputs("llava")
    draws = []
    for seed in (0, 0, 1):
        method = build("random", 0.3, seed=seed)
        with torch.no_grad(), method(model("llava")):
            model("llava")(**inputs)
        draws.append([k.tolist() for k in method.last_selection[0].kept])
    assert draws[0] == draws[1] != draws[2]


def test_a_family_without_vision_support_gets_a_clear_error():
    from piofvlm.adapters.base import ModelAdapter
    from piofvlm.methods._vision import check_encoder_side

    class NoVision(ModelAdapter):
        model_types = ("future_vlm",)

    with pytest.raises(
        ValueError, match=r"VisionZip needs the vision tower: vision_layers is not available for future"
    ):
        check_encoder_side(piofvlm.get_method("visionzip"), NoVision(model("llava")), "auto")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["pool", "visionzip", "vscan", "chain"])
def test_generate_prefill_matches_forward(kind, name):
    """generate() encodes images itself (mm_encoder_outputs, no image_sizes in the model call): same selection."""
    m = model(kind)
    inputs = make_inputs(kind)
    method = build(name, 0.3)
    with torch.no_grad(), method(m):
        forward = m(**inputs).logits[:, -1]
        kept = [[k.tolist() for k in r.kept] for r in method.last_selection]
        out = m.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert [[k.tolist() for k in r.kept] for r in method.last_selection] == kept
    torch.testing.assert_close(out.logits[0], forward, rtol=1e-4, atol=1e-5)
    assert "get_image_features" not in vars(m.model)  # the instance wrapper is gone


# ------------------------------------------------------------------------------------ Qwen and OneVision families
ENCODER_SIDE = ["pool", "visionzip", "vscan", "chain"]
NEW_KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]


def new_family(kind: str):
    """The tiny model and its batch of 3 (images of several sizes, a video, two images in one prompt)."""
    import test_qwen

    return test_qwen.model(kind), test_qwen


def build_new(name: str, keep, **extra):
    if name == "chain":
        return build(name, keep, **extra)
    fields = {"local_layer": 0, "window": 2} if name == "vscan" else {}
    return piofvlm.get_method(name, keep=keep, **fields, **extra)


def _cases(names: list[str]) -> list:
    """Every (name, kind) pair; besides pool and visionzip only Qwen2.5-VL runs in the quick suite."""
    return [
        pytest.param(
            name, kind, marks=[] if name in ("pool", "visionzip") or kind == "qwen2_5_vl" else pytest.mark.slow
        )
        for name in names
        for kind in NEW_KINDS
    ]


@pytest.mark.parametrize(("name", "kind"), _cases(ENCODER_SIDE))
def test_new_families_exact_counts_batch_equals_single(kind, name):
    """Exact counts per image and per video, hooks removed, deterministic, batch == single (each item its budget)."""
    m, tq = new_family(kind)
    inputs = tq.make_inputs(kind)
    with torch.no_grad():
        m(**inputs)
    before = hook_counts(m)
    method = build_new(name, 0.3)
    with torch.no_grad(), method(m):
        out = m(**inputs)
        kept = [[k.tolist() for k in r.kept] for r in method.last_selection]
        m(**inputs)
        assert [[k.tolist() for k in r.kept] for r in method.last_selection] == kept
        for i in range(3):
            m(**tq.make_inputs(kind, indices=(i,)))
            assert [r.kept[0].tolist() for r in method.last_selection] == [k[i] for k in kept]
    assert hook_counts(m) == before
    assert torch.isfinite(out.logits).all()
    counts = tq.visual_counts(kind, inputs)
    assert [len(k) for k in kept[-1]] == [sum(tq.expected_kept(0.3, n) for n in sample) for sample in counts]


@pytest.mark.parametrize(("name", "kind"), _cases(ENCODER_SIDE))
def test_new_families_keep_all_is_identical(kind, name):
    m, tq = new_family(kind)
    inputs = tq.make_inputs(kind)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = m(**inputs).logits
        with build_new(name, 1.0)(m):
            pruned = m(**inputs).logits
    torch.testing.assert_close(pruned[valid], reference[valid], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("name", ["pool", "vscan"])
def test_new_families_generate_prefill_matches_forward(kind, name):
    """generate() encodes images and videos before the model call: the same selection as a plain forward."""
    m, tq = new_family(kind)
    inputs = tq.make_inputs(kind)
    method = build_new(name, 0.3)
    with torch.no_grad(), method(m):
        forward = m(**inputs).logits[:, -1]
        kept = [[k.tolist() for k in r.kept] for r in method.last_selection]
        out = m.generate(**inputs, **tq.GREEDY, output_logits=True, return_dict_in_generate=True)
    assert [[k.tolist() for k in r.kept] for r in method.last_selection] == kept
    torch.testing.assert_close(out.logits[0], forward, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ families of piofvlm.tiny.families
#: (method, family) pairs that refuse, by design: the family's adapter has no vision-tower map for that method.
#: Anything else must run. InternVL (pixel shuffle), Mistral 3 (Pixtral + patch merger), SmolVLM / Idefics3 (pixel
#: shuffle), GLM-4.xV (its Qwen-like tower is not wired yet) and Gemma 3 (SigLIP + pooling, not wired yet) have no
#: explicit vision-attention scores yet;
#: LLaVA-NeXT-Video's encoder-side methods refuse prompts with a video.
#: Families of issue 24 (``tiny/common_families.py``) without a vision-attention map.
ISSUE24_NO_VISION_MAP = ("shieldgemma2", "lighton_ocr", "deepseek_vl", "janus", "deepseek_vl_hybrid")
REFUSED = {
    **{
        (name, kind): kind
        for name in ("visionzip", "vscan", "chain")
        for kind in ("internvl", "mistral3", "smolvlm", "idefics3", "glm4v", "glm46v", "gemma3")
    },
    **{(name, "llava_next_video"): "llava_next_video" for name in ENCODER_SIDE},
    ("sparsevlm", "qwen3_5"): "qwen3_5",  # reads layer 2, a linear-attention layer of the tiny Qwen3.5
    # Gemma 4: no vision-attention map; the methods recomputing a decoder layer's attention are refused
    **{(name, "gemma4"): "gemma4" for name in ("visionzip", "vscan", "chain", "fastv", "pdrop", "sparsevlm")},
    ("dart", "gemma4"): "gemma4",
    # the MoE flagships refuse what their dense siblings refuse
    **{(name, "glm4v_moe"): "glm4v_moe" for name in ("visionzip", "vscan", "chain")},
    ("sparsevlm", "qwen3_5_moe"): "qwen3_5_moe",  # layer 2 is a linear-attention layer, as the tiny Qwen3.5's
    # ViP-LLaVA: its visual tokens concatenate several vision layers (one feature layer is needed)
    **{(name, "vipllava"): "vipllava" for name in ("visionzip", "vscan", "chain")},
    # Idefics2: perceiver latents, no patch grid (pool) and no vision-attention map
    **{(name, "idefics2"): "idefics2" for name in ENCODER_SIDE},
    # GOT-OCR 2.0 / PP-Chart2Table: no vision-attention map (SAM-style tower, convolutional projector)
    **{(name, kind): kind for name in ("visionzip", "vscan", "chain") for kind in ("got_ocr2", "pp_chart2table")},
    # issue 24's other families: no vision-attention map wired (Gemma 3's and Mistral 3's towers, DeepSeek-VL's SigLIP)
    **{(name, kind): kind for name in ("visionzip", "vscan", "chain") for kind in ISSUE24_NO_VISION_MAP},
    # PaliGemma 2: no vision-attention map; attention softcapping is not in the explicit attention recomputation
    **{
        (name, "paligemma"): "paligemma"
        for name in ("visionzip", "vscan", "chain", "fastv", "pdrop", "sparsevlm", "dart")
    },
    # Llama 4: no vision-attention map or patch grid; its attention (complex RoPE, L2 QK-norm, NoPE) is not modelled
    **{(name, "llama4"): "llama4" for name in (*ENCODER_SIDE, "fastv", "pdrop", "sparsevlm", "dart")},
}


def _family_method_cases() -> list:
    from piofvlm.tiny.families import FAMILIES

    names = ["pio", *MATRIX]
    return [pytest.param(name, kind, id=f"{name}-{kind}") for kind in FAMILIES for name in names]


@pytest.mark.parametrize(("name", "kind"), _family_method_cases())
def test_every_method_runs_or_refuses_on_the_newer_families(name, kind):
    """Samples 0 and 1 (one image; an image and a video or a second image): exact kept counts per item, hooks
    removed; or, for the pairs in REFUSED only, a ValueError naming the method and the family."""
    import test_qwen

    m = test_qwen.model(kind)
    inputs = test_qwen.make_inputs(kind, indices=(0, 1))
    with torch.no_grad():
        m(**inputs)
    before = hook_counts(m)
    method = build(name, 0.3) if name in MATRIX else piofvlm.get_method(name, layers=[2], keep=0.3)
    if (name, kind) in REFUSED:
        label = "(chain|visionzip)" if name == "chain" else name  # a chain names its encoder-side part
        with pytest.raises(ValueError, match=rf"(?si)(?=.*{label})(?=.*{kind})"):
            with torch.no_grad(), method(m):
                m(**inputs)
        assert hook_counts(m) == before
        return
    with torch.no_grad(), method(m):
        out = m(**inputs)
    assert hook_counts(m) == before
    assert torch.isfinite(out.logits).all()
    counts = test_qwen.visual_counts(kind, inputs)
    assert [len(k) for k in method.last_selection[-1].kept] == [
        sum(test_qwen.expected_kept(0.3, n) for n in sample) for sample in counts
    ]
