"""Quantized weights and offloaded models under PIO (the shipped testbed checkpoint: trained weights, so kept sets
are meaningful). The quantization libraries are optional extras (``pip install piofvlm[quant]``): each test skips
when its library is missing. Loading and quantizing take seconds each: marked slow."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForImageTextToText

import piofvlm
from conftest import model as tiny_model
from conftest import single_inputs
from piofvlm.testbed import data
from piofvlm.testbed.model import CHECKPOINT_DIR, load_testbed, prompt

KEEP = 0.25  # 64 of the testbed's 256 visual tokens


@functools.cache
def inputs():
    _, processor = load_testbed()
    sample = data.make_sample("test", 0)
    return dict(processor(images=[sample["image"]], text=[prompt(sample["question"])], return_tensors="pt"))


def run(m, method):
    with torch.no_grad(), method(m):
        m(**inputs())  # bitsandbytes repacks its weights on the first no-grad call: select after it
        logits = m(**inputs()).logits
    return logits, set(method.last_selection[0].kept[0].tolist())


@functools.cache
def reference():
    return run(load_testbed()[0], piofvlm.get_method("pio", keep=KEEP))


def load(config, **kwargs):
    kwargs.setdefault("device_map", "cpu")
    return AutoModelForImageTextToText.from_pretrained(
        CHECKPOINT_DIR, quantization_config=config, dtype=torch.float32, **kwargs
    ).eval()


def torchao_config(name):
    pytest.importorskip("torchao")
    from torchao import quantization
    from transformers import TorchAoConfig

    return TorchAoConfig(getattr(quantization, name)())


def quanto_config(weights):
    pytest.importorskip("optimum.quanto")
    from transformers import QuantoConfig

    return QuantoConfig(weights=weights)


def bnb_config(**kwargs):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


WORKING = {
    "torchao-int8-weight-only": (lambda: torchao_config("Int8WeightOnlyConfig"), 64),
    "quanto-int8": (lambda: quanto_config("int8"), 64),
    "quanto-int4": (lambda: quanto_config("int4"), 58),
    "bitsandbytes-8bit": (lambda: bnb_config(load_in_8bit=True), 60),
}
NO_GRADIENT = {
    "torchao-int8-dynamic-activation": (lambda: torchao_config("Int8DynamicActivationInt8WeightConfig"), "torchao"),
    "bitsandbytes-4bit": (lambda: bnb_config(load_in_4bit=True), "bitsandbytes"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WORKING))
def test_pio_on_quantized_weights_keeps_what_the_float_model_keeps(name):
    config, min_overlap = WORKING[name]
    m = load(config())
    keep_all = piofvlm.get_method("random", layers=[2], keep=1.0)
    with torch.no_grad():
        unhooked = m(**inputs()).logits
    assert torch.equal(run(m, keep_all)[0], unhooked)
    logits, kept = run(m, piofvlm.get_method("pio", keep=KEEP))
    assert len(kept) == 64 and torch.isfinite(logits).all()
    assert len(kept & reference()[1]) >= min_overlap  # measured: 64, 64, 60, 63 of 64
    with torch.no_grad(), piofvlm.get_method("pio", keep=KEEP)(m):
        out = m.generate(**inputs(), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs()["input_ids"].shape[1] + 3 or out[0, -1] == m.generation_config.eos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NO_GRADIENT))
def test_pio_refuses_weights_without_a_gradient(name):
    config, library = NO_GRADIENT[name]
    m = load(config())
    with pytest.raises(RuntimeError, match=rf"gradient is zero .*{library}.*Int8WeightOnlyConfig.*fastv"):
        run(m, piofvlm.get_method("pio", keep=KEEP))
    logits, kept = run(m, piofvlm.get_method("fastv", keep=KEEP))  # a gradient-free method works
    assert len(kept) == 64


def test_all_zero_gradient_scores_are_refused():
    """Without any quantization library: an LM head of zeros gives a zero proxy gradient everywhere."""
    m = tiny_model("llava")
    inputs = single_inputs("llava", 0)
    saved = m.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            m.lm_head.weight.zero_()
        with torch.no_grad(), piofvlm.get_method("pio", layers=[2], keep=0.3)(m):
            with pytest.raises(RuntimeError, match=r"gradient is zero for every visual token of sample\(s\) \[0\]"):
                m(**inputs)
    finally:
        with torch.no_grad():
            m.lm_head.weight.copy_(saved)


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["disk", "auto-max-memory"])
def test_offloaded_model_prunes_like_the_model_in_memory(placement, tmp_path):
    pytest.importorskip("accelerate")
    if placement == "disk":
        layers = [f"model.language_model.layers.{i}" for i in range(8)]
        device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "lm_head": "cpu"}
        device_map |= {"model.language_model.embed_tokens": "cpu", "model.language_model.norm": "cpu"}
        device_map |= {"model.language_model.rotary_emb": "cpu"} | dict.fromkeys(layers, "disk")
        kwargs = {"device_map": device_map, "offload_folder": str(tmp_path)}
    else:
        kwargs = {"device_map": "auto", "max_memory": {"cpu": "6MB"}, "offload_folder": str(tmp_path)}
    m = AutoModelForImageTextToText.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32, **kwargs).eval()
    assert "disk" in set(m.hf_device_map.values())
    logits, kept = run(m, piofvlm.get_method("pio", keep=KEEP))
    expected_logits, expected_kept = reference()
    assert kept == expected_kept
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
