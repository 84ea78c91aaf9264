"""Every bad input gets a clear error that says what was wrong and what is accepted."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import piofvlm
from conftest import make_inputs, model, processor
from piofvlm.tiny import llava as toy


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method .fastvv.*available methods:.*none.*pio.*random"):
        piofvlm.get_method("fastvv")


def test_unknown_field_lists_the_fields():
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) 'budget'.*fields are:.*keep"):
        piofvlm.get_method("pio", budget=64)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"keep": 0.0}, r"ratio must be in \(0, 1\], got 0.0"),
        ({"keep": 1.5}, r"ratio must be in \(0, 1\], got 1.5"),
        ({"keep": 0}, r"count must be >= 1, got 0"),
        ({"keep": -3}, r"count must be >= 1, got -3"),
        ({"keep": "half"}, r"keep must be a ratio.*got 'half'"),
        ({"layers": "2"}, r"layers must be an int or a list of ints, got '2'"),
        ({"layers": [1, 2], "keep": 0.5}, r"one keep value per stage"),
        ({"layers": [1, 2], "keep": [0.2, 0.5]}, r"must not grow.*\[0.2, 0.5\]"),
        ({"layers": [1, 2], "keep": [0.5, 10]}, r"all ratios or all counts"),
        ({"layers": [3, 1], "keep": [0.5, 0.2]}, r"strictly increasing, got \[3, 1\]"),
        ({"layers": [-1]}, r"got -1"),
        ({"layers": []}, r"at least one prune point"),
        ({"positions": "shift"}, r"positions must be one of.*got 'shift'"),
        ({"budget_scope": "batch"}, r"budget_scope must be one of.*got 'batch'"),
        ({"tau": 2.0}, r"tau .* got 2.0"),
        ({"proxy_layer": "same"}, r"proxy_layer must be one of.*got 'same'"),
        ({"layers": [0], "proxy_layer": "previous"}, r"previous' needs every prune point >= 1"),
        ({"num_loss_positions": 0}, r"num_loss_positions must be >= 1, got 0"),
    ],
)
def test_invalid_hyperparameters(fields, message):
    with pytest.raises(ValueError, match=message):
        piofvlm.get_method("pio", **fields)


def test_unknown_model_type_names_the_supported_ones():
    llm = LlamaForCausalLM(toy.text_config())
    supported = r"supported model types: .*internvl, (llama4, )?llava, llava_next"
    with pytest.raises(ValueError, match=rf"unsupported model type 'llama'.*{supported}"):
        piofvlm.get_method("pio").apply(llm)


def test_prune_point_beyond_the_last_layer():
    with pytest.raises(ValueError, match=r"layers=\[4\]: a prune point must be < the number of decoder layers \(4\)"):
        piofvlm.get_method("pio", layers=[4]).apply(model("llava"))


def test_budget_larger_than_the_visual_tokens():
    m = model("llava")
    with pytest.raises(ValueError, match=r"keep=50 visual tokens is more than group 0 of sample 0 has \(49\)"):
        with torch.no_grad(), piofvlm.get_method("pio", keep=50)(m):
            m(**make_inputs("llava", indices=(0,)))


def test_no_image_in_the_prompt():
    m = model("llava")
    inputs = processor("llava").tokenizer(["USER : what is the colour ? ASSISTANT :"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"no image tokens \(id 4\) in the prompt"):
        with torch.no_grad(), piofvlm.get_method("pio")(m):
            m(**inputs)


def test_inputs_embeds_instead_of_input_ids():
    m = model("llava")
    inputs = make_inputs("llava", indices=(0,))
    with torch.no_grad():
        embeds = m.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="needs the prompt's input_ids"):
        with torch.no_grad(), piofvlm.get_method("random")(m):
            m(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_right_padding_is_refused():
    m = model("llava")
    proc = processor("llava")
    proc.tokenizer.padding_side = "right"
    try:
        inputs = make_inputs("llava")
    finally:
        proc.tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="needs left padding.*padding_side = 'left'"):
        with torch.no_grad(), piofvlm.get_method("pio")(m):
            m(**inputs)


def test_unsupported_attention_implementation():
    m = toy.build_llava(attn="flex_attention")
    with pytest.raises(ValueError, match=r"attention implementation 'flex_attention' is not supported.*sdpa"):
        piofvlm.get_method("pio").apply(m)


def test_applying_twice_is_refused():
    m = model("llava")
    with piofvlm.get_method("pio")(m):
        with pytest.raises(RuntimeError, match="already applied to this model"):
            piofvlm.get_method("random").apply(m)
    piofvlm.get_method("random").apply(m).remove()  # fine once the first one is gone


def test_presets_and_schedule_helpers():
    preset = piofvlm.get_preset("pio-llava15-64")
    assert preset.layers == [1, 10, 15] and preset.keep == [92, 54, 22]
    mean_tokens = piofvlm.average_retention(preset.layers, [k / 576 for k in preset.keep], 32) * 576
    assert mean_tokens == pytest.approx(64.0)
    assert piofvlm.average_retention([1, 10, 15], [218 / 576, 128 / 576, 54 / 576], 32) * 576 == pytest.approx(128.0)
    ratios = piofvlm.schedule_for_average_retention(0.111, [2, 10], 32, decay=0.5)
    assert ratios[1] == pytest.approx(ratios[0] / 2)
    assert piofvlm.average_retention([2, 10], ratios, 32) == pytest.approx(0.111)
    with pytest.raises(ValueError, match="unreachable"):
        piofvlm.schedule_for_average_retention(0.05, [4], 32)
    with pytest.raises(ValueError, match="unknown preset 'x'.*pio-llava15-128"):
        piofvlm.get_preset("x")


def test_image_tokens_on_a_filled_cache_are_refused():
    """Chunked prefill would prune only part of the prompt: refused instead of silently wrong."""
    m = model("llava")
    inputs = make_inputs("llava", indices=(0,))
    with pytest.raises(ValueError, match="image tokens arrived on a non-empty KV cache"):
        with torch.no_grad(), piofvlm.get_method("random", keep=0.5)(m):
            m.generate(**inputs, max_new_tokens=3, prefill_chunk_size=20)


# --------------------------------------------------------------------------- issue 23: five CLI cases, bench --config
@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["show", "--out", "/"], "Is a directory: '/'"),
        (["eval", "--model", "/nonexistent"], "--model /nonexistent: no such directory"),
        (["serve", "--model", "/nonexistent"], "--model /nonexistent: no such directory"),
        (["serve", "--port", "99999", "--model", "."], "--port 99999: a port is 0-65535"),
        (["bench", "--threads", "0"], "--threads 0: give at least 1"),
    ],
)
def test_cli_bad_paths_ports_and_threads_are_usage_errors(argv, said, capsys):
    from piofvlm.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("piofvlm: error: ") and said in err and "Traceback" not in err


def test_cli_bench_config_that_is_not_json_names_the_file(tmp_path, capsys):
    from PIL import Image

    from piofvlm.cli import main

    picture = tmp_path / "notimage.png"
    Image.new("RGB", (4, 4)).save(picture)
    assert main(["bench", "--config", str(picture)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("piofvlm: error: ") and f"--config {picture} is not a JSON experiment file" in err


# ------------------------------------------------------------------ issue 23: fields read-only while applied
def test_method_fields_are_read_only_while_applied_and_free_after():
    """``method.layers = ...`` inside the ``with`` block was silently ignored while ``to_dict()`` reported it."""
    import piofvlm
    from conftest import make_inputs, model

    m, inputs = model("llava"), make_inputs("llava", indices=(0,))
    method = piofvlm.get_method("random", layers=[1], keep=0.5)
    with torch.no_grad(), method(m):
        for name, value in (("layers", [2]), ("keep", 0.25), ("seed", 3)):
            with pytest.raises(AttributeError, match=f"RandomPrune.{name} cannot change while the method is applied"):
                setattr(method, name, value)
        assert method.to_dict()["layers"] == [1] and method.to_dict()["keep"] == [0.5]
        m(**inputs)
        assert [record.layer for record in method.last_selection] == [1]
    method.layers = [2]  # removed: free to change, and honoured at the next apply
    with torch.no_grad(), method(m):
        m(**inputs)
    assert [record.layer for record in method.last_selection] == [2]
