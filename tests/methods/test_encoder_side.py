"""VisionZip, VScan and the encoder-then-LLM chain against direct computations from the vision tower's eager
attention maps (``output_attentions=True`` on the stock CLIP, no hooks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))

import piofvlm  # noqa: E402
from conftest import make_inputs, model  # noqa: E402
from piofvlm import transformers_compat  # noqa: E402


def clip_outputs(m, inputs):
    """Eager CLIP attentions and keys of every block, and the projected features, for a one-image LLaVA input."""
    tower = m.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
            embeds = m(**inputs, output_hidden_states=True).hidden_states[0][0]
    finally:
        tower.set_attn_implementation("sdpa")
    keys = []
    for index, block in enumerate(tower.encoder.layers):
        with torch.no_grad():
            k = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[index]))[0]  # (T, d_v)
        keys.append(k.view(k.shape[0], block.self_attn.num_heads, -1).mean(1))  # mean over heads
    visual = inputs["input_ids"][0] == 4
    return out.attentions, keys, embeds[visual]


def ranked(values: torch.Tensor) -> list[int]:
    return sorted(range(len(values)), key=lambda i: (-float(values[i]), i))


def test_visionzip_rule():
    m = model("llava")
    inputs = make_inputs("llava", indices=(0,))
    attentions, keys, embeds = clip_outputs(m, inputs)
    cls = attentions[0][0, :, 0, 1:].mean(0)  # feature layer -2 of a 2-block CLIP = block 0
    budget, contextual = 12, 4
    dominant = ranked(cls)[: budget - contextual]
    rest = [i for i in range(49) if i not in dominant]
    step = len(rest) // contextual
    targets = rest[::step][:contextual]
    others = [i for i in rest if i not in targets]
    metric = F.normalize(keys[0][1:], dim=-1)
    groups = {t: [t] for t in targets}
    for i in others:
        groups[max(targets, key=lambda t: (float(metric[i] @ metric[t]), -targets.index(t)))].append(i)
    captured = {}

    class Spy(piofvlm.methods.VisionZip):
        def select(self, ctx):
            captured["selection"] = selection = super().select(ctx)
            captured["visual"] = (ctx.groups[0] >= 0).nonzero()[:, 0]
            return selection

    with torch.no_grad(), Spy(keep=budget, contextual=contextual / budget)(m):
        m(**inputs)
    selection, visual = captured["selection"], captured["visual"]
    assert selection.keep[0, visual].nonzero()[:, 0].tolist() == sorted(dominant + targets)
    merged = selection.hidden_states[0, visual]
    for target, members in groups.items():
        torch.testing.assert_close(merged[target], embeds[members].mean(0), rtol=1e-5, atol=1e-6)


def test_vscan_rule():
    m = model("llava")
    inputs = make_inputs("llava", indices=(2,))
    attentions, _, embeds = clip_outputs(m, inputs)
    local = attentions[0][0, :, 0, 1:].mean(0)
    deep = attentions[1][0, :, 0, 1:].mean(0)
    budget, window = 13, 4  # 7x7 grid, 4x4 windows -> 4 windows; local 6 -> 1 per window; global 13 - 4
    chosen = []
    for wr in range(2):
        for wc in range(2):
            members = [r * 7 + c for r in range(wr * 4, min(7, wr * 4 + 4)) for c in range(wc * 4, min(7, wc * 4 + 4))]
            chosen += sorted(members, key=lambda i: (-float(local[i]), i))[:1]
    chosen += [i for i in ranked(deep) if i not in chosen][: budget - len(chosen)]
    feats = F.normalize(embeds.float(), dim=-1)
    groups = {t: [t] for t in chosen}
    kept = sorted(chosen)
    for i in range(49):
        if i not in chosen:
            groups[max(kept, key=lambda t: (float(feats[i] @ feats[t]), -kept.index(t)))].append(i)
    captured = {}

    class Spy(piofvlm.methods.VScan):
        def select(self, ctx):
            captured["selection"] = selection = super().select(ctx)
            captured["visual"] = (ctx.groups[0] >= 0).nonzero()[:, 0]
            return selection

    with torch.no_grad(), Spy(keep=budget, local_layer=0, global_layer=1, window=window)(m):
        m(**inputs)
    selection, visual = captured["selection"], captured["visual"]
    assert selection.keep[0, visual].nonzero()[:, 0].tolist() == kept
    merged = selection.hidden_states[0, visual]
    for target, members in groups.items():
        torch.testing.assert_close(merged[target], embeds[members].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_chain_is_the_encoder_stage_then_the_llm_stage(kind):
    m = model(kind)
    inputs = make_inputs(kind)
    encoder = piofvlm.get_method("vscan", keep=0.5, local_layer=0)
    chain = piofvlm.get_method(
        "chain",
        encoder={"method": "vscan", "keep": 0.5, "local_layer": 0},
        llm={"method": "pio", "layers": [2], "keep": 0.2},
    )
    with torch.no_grad():
        with encoder(m):
            m(**inputs)
        with chain(m):
            out = m(**inputs, use_cache=True)
    assert [k.tolist() for k in chain.last_selection[0].kept] == [k.tolist() for k in encoder.last_selection[0].kept]
    # every layer, from the first, caches only the encoder's survivors; layers after 2 only PIO's
    lengths = [transformers_compat.output_cache(out).get_seq_length(i) for i in range(4)]
    assert lengths[0] == lengths[1] < inputs["input_ids"].shape[1] and lengths[2] == lengths[3] < lengths[1]
    assert [r.layer for r in chain.last_selection] == [0, 2]


def test_chain_layers_and_keep_come_from_its_parts():
    parts = {"encoder": {"method": "visionzip", "keep": 0.5}, "llm": {"method": "pio", "layers": [2], "keep": 0.2}}
    chain = piofvlm.get_method("chain", **parts)
    assert chain.layers == [0, 2] and chain.keep == [0.5, 0.2]
    assert piofvlm.get_method("chain", layers=[0, 2], keep=[0.5, 0.2], **parts).keep == [0.5, 0.2]
    with pytest.raises(ValueError, match=r"chain keep=0.111 disagrees with its parts \(keep=\[0.5, 0.2\]\)"):
        piofvlm.get_method("chain", keep=0.111, **parts)
    with pytest.raises(ValueError, match="chain layers=\\[2\\] disagrees"):
        piofvlm.get_method("chain", layers=[2], **parts)


def test_eval_gives_a_chain_row_budget_and_layers_to_the_llm_part():
    from piofvlm.evaluation import build_entries

    encoder = {"method": "visionzip", "keep": 0.333}
    entries = build_entries(["chain"], [0.111, 0.222], [2], {"encoder": encoder})
    chains = [entry.build() for entry in entries]
    assert [c.keep for c in chains] == [[0.333, 0.111], [0.333, 0.222]]
    assert all(c.layers == [0, 2] and c.llm.name == "pio" for c in chains)
    fastv = build_entries(["chain"], [0.111], [3], {"encoder": encoder, "llm": {"method": "fastv"}})[0].build()
    assert fastv.llm.name == "fastv" and fastv.layers == [0, 3]


def test_presets_build_the_published_settings():
    chain = piofvlm.get_preset("pio-llava15-64-ve")
    assert chain.layers == [0, 16] and chain.keep == [96, 32] and chain.positions == "renumber"
    assert chain.to_dict()["encoder"]["method"] == "vscan" and chain.to_dict()["llm"]["method"] == "pio"
    qwen = piofvlm.get_preset("pio-qwen25vl-11-ve")
    assert qwen.layers == [0, 14] and qwen.llm.proxy_layer == "previous"
    assert abs(piofvlm.average_retention([0, 14], qwen.keep, 28) - 0.111) < 1e-3


def test_encoder_side_methods_explain_what_they_cannot_do():
    m = model("llava")
    with pytest.raises(ValueError, match=r"use layers=\[0\]"):
        piofvlm.get_method("visionzip", layers=[1]).apply(m)
    with pytest.raises(ValueError, match=r"local_layer=5 does not exist: the vision encoder has 2 blocks"):
        piofvlm.get_method("vscan").apply(m)
    m.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match=r"needs a \[CLS\] token"):
            piofvlm.get_method("visionzip", attention="cls").apply(m)
    finally:
        m.config.vision_feature_select_strategy = "default"
