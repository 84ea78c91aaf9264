"""Pool, VisionZip and VScan on the Qwen families and LLaVA-OneVision against direct computations: eager attention
maps computed by hand from one vision block (the model's ``eager_attention_forward``), merge units, window order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_window_index

sys.path.insert(0, str(Path(__file__).parents[1]))

import piofvlm  # noqa: E402
import test_qwen as tq  # noqa: E402
from piofvlm.tiny.qwen import IMAGE, OV_IMAGE, random_image  # noqa: E402

PROMPT = "USER : {} what is the colour of the circle ? ASSISTANT :"


def one_image(kind: str, size=(168, 84)):
    """Qwen: one image of 168 x 84 px = 3 x 6 merged tokens, two attention windows on Qwen2.5-VL. OneVision: two
    28 px images in one prompt (multi-image: one 7 x 7 view + a newline each, no tiles); tests use the first."""
    if kind == tq.ONEVISION:
        images = [[random_image(7, (28, 28)), random_image(8, (28, 28))]]
        text = PROMPT.format(f"{OV_IMAGE} and {OV_IMAGE}")
        return tq.processor(kind)(images=images, text=[text], return_tensors="pt")
    return tq.processor(kind)(images=[random_image(7, size)], text=[PROMPT.format(IMAGE)], return_tensors="pt")


def spy(cls):
    captured = {}

    class Spy(cls):
        def select(self, ctx):
            captured["selection"] = selection = super().select(ctx)
            captured["visual"] = (ctx.groups[0] >= 0).nonzero()[:, 0]
            return selection

    return Spy, captured


def qwen_block_inputs(m, inputs, layer: int):
    """Hidden states and keyword arguments entering vision block ``layer``, and the projected image features."""
    store = {}

    def hook(module, args, kwargs):
        store["hidden"], store["kwargs"] = args[0], kwargs

    handle = m.model.visual.blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            embeds = torch.cat(
                m.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            )
    finally:
        handle.remove()
    return store["hidden"], store["kwargs"], embeds


def qwen_scores_by_hand(m, kind: str, inputs, layer: int):
    """Per merged token, in LLM order: attention received (eager map, heads and queries averaged) and pre-RoPE
    head-mean keys, both averaged over the 2x2 merge unit."""
    module = sys.modules[type(m.model.visual.blocks[0]).__module__]
    hidden, kwargs, embeds = qwen_block_inputs(m, inputs, layer)
    block = m.model.visual.blocks[layer]
    attn = block.attn
    with torch.no_grad():
        q, k, v = attn.qkv(block.norm1(hidden)).reshape(hidden.shape[0], 3, attn.num_heads, -1).unbind(1)
        raw_keys = k.mean(1)
        q, k = module.apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        _, weights = module.eager_attention_forward(attn, q.float(), k.float(), v.float(), None, attn.scaling)
    received = weights[0].mean(0).mean(0)  # one image, one frame: one attention segment
    scores, keys = received.view(-1, 4).mean(1), raw_keys.view(-1, 4, raw_keys.shape[-1]).mean(1)
    if kind == "qwen2_5_vl":  # the blocks see merge units in window order
        vision = m.config.vision_config
        order, _ = get_vision_window_index(inputs["image_grid_thw"], 2, vision.window_size, vision.patch_size)
        assert order.tolist() != sorted(order.tolist())  # the test image really spans several windows
        scores, keys = scores[order.argsort()], keys[order.argsort()]
    return scores, keys, embeds


def ranked(values) -> list[int]:
    return sorted(range(len(values)), key=lambda i: (-float(values[i]), i))


def merged_groups(targets, others, metric):
    metric = F.normalize(metric.float(), dim=-1)
    groups = {t: [t] for t in targets}
    for i in others:
        groups[max(targets, key=lambda t: (float(metric[i] @ metric[t]), -targets.index(t)))].append(i)
    return groups


@pytest.mark.parametrize("kind", tq.QWEN_KINDS)
def test_qwen_visionzip_rule(kind):
    m = tq.model(kind)
    inputs = one_image(kind)
    scores, keys, embeds = qwen_scores_by_hand(m, kind, inputs, layer=1)  # the last block feeds the merger
    budget, contextual = 6, 2
    dominant = ranked(scores)[: budget - contextual]
    rest = [i for i in range(len(scores)) if i not in dominant]
    targets = rest[:: len(rest) // contextual][:contextual]
    groups = merged_groups(targets, [i for i in rest if i not in targets], keys)
    Spy, captured = spy(piofvlm.methods.VisionZip)
    with torch.no_grad(), Spy(keep=budget, contextual=contextual / budget)(m):
        m(**inputs)
    selection, visual = captured["selection"], captured["visual"]
    assert selection.keep[0, visual].nonzero()[:, 0].tolist() == sorted(dominant + targets)
    for target, members in groups.items():
        torch.testing.assert_close(selection.hidden_states[0, visual][target], embeds[members].mean(0))


def test_qwen25_vscan_rule():
    """Local scan on the first full-attention block (2x2 windows of the merged grid), global on the last block."""
    kind = "qwen2_5_vl"
    m = tq.model(kind)
    inputs = one_image(kind)
    local, _, embeds = qwen_scores_by_hand(m, kind, inputs, layer=m.config.vision_config.fullatt_block_indexes[0])
    deep, _, _ = qwen_scores_by_hand(m, kind, inputs, layer=1)
    budget, window = 12, 2  # 3 x 6 merged grid -> 2 x 3 windows; 6 local tokens -> 1 per window; 6 global
    chosen = []
    for wr in range(2):
        for wc in range(3):
            members = [r * 6 + c for r in range(wr * 2, min(3, wr * 2 + 2)) for c in range(wc * 2, wc * 2 + 2)]
            chosen += sorted(members, key=lambda i: (-float(local[i]), i))[:1]
    chosen += [i for i in ranked(deep) if i not in chosen][: budget - len(chosen)]
    kept = sorted(chosen)
    groups = merged_groups(kept, [i for i in range(18) if i not in chosen], embeds)
    Spy, captured = spy(piofvlm.methods.VScan)
    with torch.no_grad(), Spy(keep=budget, local_layer=None, window=window)(m):
        m(**inputs)
    selection, visual = captured["selection"], captured["visual"]
    assert selection.keep[0, visual].nonzero()[:, 0].tolist() == kept
    for target, members in groups.items():
        torch.testing.assert_close(selection.hidden_states[0, visual][target], embeds[members].mean(0))


@pytest.mark.parametrize("kind", ["qwen2_5_vl", tq.ONEVISION])
def test_pool_rule(kind):
    """Qwen: the 3 x 6 merged grid in 2 x 3 cells; OneVision: the 7 x 7 view in 2 x 3 cells; means into the centres."""
    m = tq.model(kind)
    inputs = one_image(kind)
    Spy, captured = spy(piofvlm.methods.Pool)
    with torch.no_grad():
        embeds = m(**inputs, output_hidden_states=True).hidden_states[0][0]
        with Spy(keep=6)(m):
            m(**inputs)
    selection, visual = captured["selection"], captured["visual"]
    if kind == tq.ONEVISION:  # the first image: 49 view tokens + a newline; the 7 x 7 grid gets all 6 cells
        visual = visual[:50]
    feats = embeds[visual]
    if kind == tq.ONEVISION:
        height, width, rows, cols = 7, 7, 2, 3
    else:
        height, width, rows, cols = 3, 6, 2, 3
    expected = {}
    for i in range(rows):
        top, bottom = -(-i * height // rows), -(-(i + 1) * height // rows)
        for j in range(cols):
            left, right = -(-j * width // cols), -(-(j + 1) * width // cols)
            members = [r * width + c for r in range(top, bottom) for c in range(left, right)]
            centre = (top + (bottom - top - 1) // 2) * width + left + (right - left - 1) // 2
            expected[centre] = feats[members].mean(0)
    assert selection.keep[0, visual].nonzero()[:, 0].tolist() == sorted(expected)
    for centre, value in expected.items():
        torch.testing.assert_close(selection.hidden_states[0, visual][centre], value)


def test_onevision_visionzip_uses_mean_attention_received():
    """SigLIP has no [CLS]: every patch is a visual token and scores are the mean attention received."""
    m = tq.model(tq.ONEVISION)
    inputs = one_image(tq.ONEVISION)
    tower = m.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"][0, :1], output_attentions=True, output_hidden_states=True)
            embeds = m(**inputs, output_hidden_states=True).hidden_states[0][0]
    finally:
        tower.set_attn_implementation("sdpa")
    block = tower.encoder.layers[1]  # vision_feature_layer -1 of 2 blocks
    with torch.no_grad():
        k = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[1]))[0]
    keys = k.view(49, block.self_attn.num_heads, -1).mean(1)
    scores = out.attentions[1][0].mean(0).mean(0)
    budget, contextual = 8, 2
    dominant = ranked(scores)[: budget - contextual]
    rest = [i for i in range(49) if i not in dominant]
    targets = rest[:: len(rest) // contextual][:contextual]
    groups = merged_groups(targets, [i for i in rest if i not in targets], keys)
    Spy, captured = spy(piofvlm.methods.VisionZip)
    with torch.no_grad(), Spy(keep=budget, contextual=contextual / budget)(m):
        m(**inputs)
    selection, visual = captured["selection"], captured["visual"][:50]
    assert selection.keep[0, visual].nonzero()[:, 0].tolist() == sorted(dominant + targets)  # newline dropped
    visual_embeds = embeds[inputs["input_ids"][0] == m.config.image_token_id][:50]
    for target, members in groups.items():
        torch.testing.assert_close(selection.hidden_states[0, visual][target], visual_embeds[members].mean(0))


def test_preset_qwen25vl_ve_runs_with_generate():
    """``pio-qwen25vl-11-ve``: VScan (first full-attention block, last block, 4 x 4 windows) then PIO after layer 14,
    end to end with generate() on a tiny Qwen2.5-VL with 16 decoder layers."""
    m = tq.build_qwen("qwen2_5_vl", num_layers=16)
    inputs = tq.make_inputs("qwen2_5_vl")
    method = piofvlm.get_preset("pio-qwen25vl-11-ve")
    with torch.no_grad(), method(m):
        out = m.generate(**inputs, **tq.GREEDY)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert [r.layer for r in method.last_selection] == [0, 14]
    counts = tq.visual_counts("qwen2_5_vl", inputs)
    assert [len(k) for k in method.last_selection[0].kept] == [
        sum(tq.expected_kept(0.167, n) for n in sample) for sample in counts
    ]


def test_vscan_names_the_encoder_depth():
    m = tq.model(tq.ONEVISION)
    with pytest.raises(ValueError, match=r"local_layer=5 does not exist: the vision encoder has 2 blocks"):
        piofvlm.get_method("vscan").apply(m)
    with pytest.raises(ValueError, match=r"needs a \[CLS\] token"):
        piofvlm.get_method("visionzip", attention="cls").apply(tq.model("qwen2_vl"))
    with pytest.raises(ValueError, match=r"vision_local_layer_index"):
        piofvlm.get_method("vscan", local_layer=None).apply(m)
