"""The efficiency benchmark runs end to end on tiny shapes and writes valid outputs (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import piofvlm
from piofvlm import transformers_compat
from piofvlm.bench import BenchConfig, get_shape, run_benchmark, write_outputs
from piofvlm.bench import flops as fl
from piofvlm.bench.shapes import build_inputs, build_model
from piofvlm.cli import main


def tiny_config(**changes) -> BenchConfig:
    fields = dict(
        name="tiny-test",
        preset="tiny",
        dtype="float32",
        new_tokens=3,
        warmup=0,
        repeats=1,
        profile_repeats=1,
        variants=[{"method": "pio", "layers": [1]}, {"method": "random", "layers": [1]}],
        keeps=[0.25],
    )
    fields.update(changes)
    return BenchConfig(**fields)


def test_bench_runs_end_to_end_and_writes_valid_json(tmp_path):
    result = run_benchmark(tiny_config())
    paths = write_outputs(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["config"]["preset"] == "tiny"
    assert {"torch", "transformers", "piofvlm", "git_commit", "device"} <= set(data["environment"])
    assert len(data["load_average"]["start"]) == 3
    labels = [v["label"] for v in data["variants"]]
    assert labels == ["none", "pio keep=0.25 (layers=[1])", "random keep=0.25 (layers=[1])"]
    base, pio, rand = data["variants"]
    assert base["visual_tokens"] == 49 and pio["kept_visual"] == rand["kept_visual"] == 12
    assert pio["layer_lengths"][0] == base["layer_lengths"][0] and pio["layer_lengths"][1] == 61 - 49 + 12
    assert {"select", "proxy_forward", "proxy_backward", "nms"} <= set(pio["selection_ms"])
    assert pio["kv_cache_bytes"]["after_prefill"] < base["kv_cache_bytes"]["after_prefill"]
    assert pio["flops"]["selection"]["counted"] > 0 and rand["flops"]["selection"]["counted"] == 0
    assert pio["flops"]["selection_derived"]["backward"] > 0
    for v in data["variants"]:
        assert len(v["prefill_s"]["values"]) == len(v["e2e_s"]["values"]) == 1
        assert v["ratios"]["prefill_ideal"] > 0 and v["memory"]["peak_bytes"] > 0
    assert "| pio keep=0.25" in paths["md"].read_text()
    if "png" in paths:
        assert paths["png"].stat().st_size > 0


def test_cli_bench_llava_next_preset(tmp_path, capsys):
    code = main(
        ["bench", "--preset", "tiny-next", "--method", "pio", "--keep", "20", "--layers", "2", "--name", "cli",
         "--dtype", "float32", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--profile-repeats", "0",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "cli.json").read_text())
    assert data["model"]["visual_tokens"] == 70
    assert [v["kept_visual"] for v in data["variants"]] == [70, 20]
    assert "wrote" in capsys.readouterr().out


def test_exact_flops_match_torch_flop_counter():
    """With eager attention every matmul is an mm/bmm that torch's FlopCounterMode sees."""
    shape = get_shape("tiny")
    model = build_model(shape, torch.float32, "eager", "cpu")
    inputs = build_inputs(model, shape)
    text = fl.TextShape.from_config(model.config.text_config)
    prompt_len = inputs["input_ids"].shape[1]
    methods = [piofvlm.get_method(name, layers=[layer], keep=10) for name, layer in (("random", 2), ("random", 0))]
    for method in (piofvlm.get_method("none"), *methods, piofvlm.get_method("pool", keep=10)):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), method(model), counter:
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        counts = counter.get_flop_counts()
        counted = sum(counts["LlavaForConditionalGeneration.model.language_model"].values())
        counted += sum(counts["LlavaForConditionalGeneration.lm_head"].values())
        cache = transformers_compat.output_cache(out)
        lengths = fl.cache_layer_lengths(cache, computed=True)
        rotary = transformers_compat.rotary_table_flops(text.head_dim, inputs["input_ids"].shape[1])
        assert fl.prefill_flops(text, lengths) + rotary == counted
        # Pruned before layer 0: its cache is padded to the prompt length (masked slots nobody computed).
        held = fl.cache_layer_lengths(cache)
        if method.name != "none" and method.layers == [0]:
            assert held[0] == prompt_len and lengths[0] == lengths[1] < prompt_len
        else:
            assert held == lengths


def test_paper_formula_reproduces_the_papers_baselines():
    llama = fl.TextShape(4096, 11008, 32, 32, 128, 32000, 32)
    assert fl.paper_flops(llama, 576, [], 32) == pytest.approx(2.986e12, rel=1e-3)
    assert fl.paper_flops(llama, 2880, [], 32) == pytest.approx(16.670e12, rel=1e-3)
    # The LLaVA-1.5 64-token schedule plus one proxy layer per stage: the paper's 0.45 T (spec B.2).
    ours = fl.paper_flops(llama, 576, [(1, 92), (10, 54), (15, 22)], 32, proxy_layers=True)
    assert ours == pytest.approx(0.442e12, rel=1e-2)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown benchmark config key"):
        BenchConfig.from_dict({"preset": "tiny", "repeat": 3})
    with pytest.raises(ValueError, match="exactly one of preset and model_path"):
        BenchConfig(preset=None)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_shape("llava-99b")


def test_qwen_preset_runs_end_to_end(tmp_path):
    """The Qwen2.5-VL family (M-RoPE, vision start/end tokens) through the same harness, at a tiny shape."""
    result = run_benchmark(tiny_config(preset="tiny-qwen", keeps=[0.25]))
    base, pio, rand = result["variants"]
    assert base["visual_tokens"] == 16 and pio["kept_visual"] == rand["kept_visual"] == 4
    assert pio["kv_cache_bytes"]["after_prefill"] < base["kv_cache_bytes"]["after_prefill"]
    assert json.loads(write_outputs(result, tmp_path)["json"].read_text())["config"]["preset"] == "tiny-qwen"


def test_counted_selection_flops_against_direct_counts():
    """The counted selection FLOPs (prefill under the method minus under random with its schedule) equal a direct
    count of the method's rule: FastV's last-query attention at layer K-1; zero for random; PIO's proxy without NMS
    equals its formula (fast path: k/v over the sequence, the rest at the loss positions, input gradients only)."""
    from piofvlm.bench.harness import counted_selection_flops, derived_pio_flops

    shape = get_shape("tiny")
    model = build_model(shape, torch.float32, "sdpa", "cpu")
    inputs = build_inputs(model, shape)
    text = fl.TextShape.from_config(model.config.text_config)
    n = int(inputs["input_ids"].shape[1])
    twins: dict = {}
    with torch.no_grad():
        fastv = piofvlm.get_method("fastv", layers=[2], keep=10)
        counted = counted_selection_flops(model, inputs, fastv, twins)
        d = text.hidden_size
        assert counted == 2 * n * d * text.kv_dim + 2 * d * text.q_dim + 2 * n * text.q_dim
        assert counted_selection_flops(model, inputs, piofvlm.get_method("random", layers=[2], keep=10), twins) == 0
        pio = piofvlm.get_method("pio", layers=[2], keep=10, nms=False)
        counted = counted_selection_flops(model, inputs, pio, twins)
        derived = derived_pio_flops(pio, text, [n], [{"before": 49, "kept": 10}])
    assert derived["nms"] == 0 and counted == derived["forward"] + derived["backward"]


def test_cli_bench_methods_all_counts_every_method(tmp_path):
    code = main(
        ["bench", "--preset", "tiny", "--methods", "all", "--keep", "10", "--layers", "2", "--name", "all",
         "--dtype", "float32", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--profile-repeats", "0",
         "--threads", "1", "--no-progress", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "all.json").read_text())
    methods = [v["method"]["method"] for v in data["variants"]]
    assert set(methods) == set(piofvlm.available_methods()) - {"chain"}
    for v in data["variants"]:
        assert v["ratios"]["prefill_ideal"] > 0, v["label"]  # every row has its FLOP-ideal
        expect_zero = v["method"]["method"] in ("none", "random", "pool")  # pool averages: no matmul
        assert (v["flops"]["selection"]["counted"] == 0) == expect_zero, v["label"]
