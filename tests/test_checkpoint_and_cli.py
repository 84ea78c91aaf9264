"""The same code path from a saved directory (``from_pretrained(dir)`` + ``AutoProcessor``) and through the CLI."""

from __future__ import annotations

import pytest
import torch

import piofvlm
from conftest import PROMPTS, make_inputs, model
from piofvlm import cli
from piofvlm.loading import build_prompt, load_model
from piofvlm.tiny import llava as toy


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy-llava")
    toy.save_toy_llava(directory)
    return directory


def test_reloaded_checkpoint_prunes_like_the_in_memory_model(saved_llava):
    reloaded, processor = load_model(saved_llava)
    assert type(reloaded).__name__ == "LlavaForConditionalGeneration"
    inputs = processor(
        images=[toy.random_image(0)], text=[PROMPTS[0]], return_tensors="pt", padding=True
    )  # the processor read back from disk
    expected_inputs = make_inputs("llava", indices=(0,))
    assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])
    torch.testing.assert_close(inputs["pixel_values"], expected_inputs["pixel_values"])
    method = piofvlm.get_method("pio", layers=[1], keep=0.2)
    with torch.no_grad():
        with method(reloaded):
            got = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
            got_kept = method.last_selection[0].kept[0].tolist()
        with method(model("llava")):
            expected = model("llava").generate(**expected_inputs, max_new_tokens=4, do_sample=False)
            expected_kept = method.last_selection[0].kept[0].tolist()
    assert got_kept == expected_kept and len(got_kept) == 10
    assert torch.equal(got, expected)


def test_build_prompt_adds_the_image_placeholder(saved_llava):
    _, processor = load_model(saved_llava)
    assert build_prompt(processor, "how many ?") == "USER: <image>\nhow many ? ASSISTANT:"
    assert build_prompt(processor, "USER : <image> x") == "USER : <image> x"


def test_cli_run_prints_answer_counts_and_times(saved_llava, tmp_path, capsys):
    image = tmp_path / "image.png"
    toy.random_image(3).save(image)
    argv = ["run", "--model", str(saved_llava), "--image", str(image), "--prompt", "how many ?"]
    assert cli.main([*argv, "--method", "pio", "--keep", "0.2", "--layers", "1", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "visual tokens: 49 -> 10" in out and "prefill:" in out
    assert cli.main([*argv, "--method", "none", "--max-new-tokens", "3"]) == 0
    assert "visual tokens: 49 -> (no pruning)" in capsys.readouterr().out
    assert cli.main([*argv, "--method", "pio", "--set", "tau=0.5", "--keep", "5,2", "--layers", "1,2"]) == 0
    assert "visual tokens: 49 -> 5 tokens (10.2%) -> 2 tokens (4.1%)" in capsys.readouterr().out


def test_cli_errors_are_reported_not_raised(saved_llava, tmp_path, capsys):
    image = tmp_path / "image.png"
    toy.random_image(3).save(image)
    argv = ["run", "--model", str(saved_llava), "--image", str(image), "--prompt", "how many ?"]
    assert cli.main([*argv, "--method", "fastvv"]) == 2
    assert "unknown method 'fastvv'" in capsys.readouterr().err
    assert cli.main([*argv, "--keep", "100"]) == 2
    assert "more than group 0 of sample 0 has (49)" in capsys.readouterr().err
    assert cli.main(["run", "--model", str(tmp_path), "--image", str(image), "--prompt", "x"]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_cli_values_parse_numbers_lists_and_json():
    from piofvlm.cli import parse_value

    assert parse_value("0.5") == 0.5 and parse_value("64") == 64 and parse_value("true") is True
    assert parse_value("1,10,15") == [1, 10, 15] and parse_value("0.111,0.222") == [0.111, 0.222]
    assert parse_value("last") == "last" and parse_value("[2, 8]") == [2, 8]
    encoder = parse_value('{"method":"visionzip","keep":0.333}')  # a comma inside JSON is not a list separator
    assert encoder == {"method": "visionzip", "keep": 0.333}
