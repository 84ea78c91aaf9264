"""`piofvlm eval`, `show` and `demo` end to end on the shipped testbed checkpoint (a few samples)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from piofvlm import cli
from piofvlm.testbed.model import CHECKPOINT_DIR

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").is_file(), reason="no testbed checkpoint shipped"
)


def test_eval_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--methods", "none,random,pio", "--keep", "0.111,0.5", "--num-samples", "10"]
    assert cli.main([*argv, "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    payload = json.loads((out / "results.json").read_text())
    labels = [row["label"] for row in payload["rows"]]
    assert labels == ["none", "random@0.111", "random@0.5", "pio@0.111", "pio@0.5"]
    none = payload["rows"][0]
    from piofvlm.testbed import data

    assert set(none["accuracy"]) == {*data.TASKS, "all"}
    assert none["retention"]["all"] == pytest.approx(1.0) or none["accuracy"]["all"] == 0
    assert payload["run"]["torch"] and payload["config"]["num_samples"] == 10
    assert 0 < payload["chance"]["all"] < 1
    table = (out / "results.md").read_text()
    assert "| pio@0.111 |" in table and "| chance |" in table
    assert Image.open(out / "accuracy.png").size[0] > 100
    assert "written:" in capsys.readouterr().out


def test_eval_matches_direct_generation(tmp_path):
    """The table's accuracy is the exact-match score of the library's own batched generation."""
    import piofvlm
    from piofvlm.testbed import data
    from piofvlm.testbed.model import generate_answers, load_testbed, score

    out = tmp_path / "eval"
    assert (
        cli.main(["eval", "--methods", "pio", "--keep", "0.111", "--num-samples", "5", "--out", str(out), "--quiet"])
        == 0
    )
    row = json.loads((out / "results.json").read_text())["rows"][0]
    model, processor = load_testbed()
    samples = data.make_split("test", 5)
    with piofvlm.get_method("pio", keep=0.111)(model):
        expected = score(samples, generate_answers(model, processor, samples, batch_size=1))
    assert row["accuracy"] == expected


def test_eval_rejects_bad_budgets_before_loading(tmp_path, capsys):
    assert cli.main(["eval", "--keep", "1.5", "--out", str(tmp_path)]) == 2
    assert "ratio must be in (0, 1]" in capsys.readouterr().err


def test_show_writes_one_panel_per_stage(tmp_path, capsys):
    out = tmp_path / "overlay.png"
    argv = ["show", "--index", "2", "--method", "pio", "--layers", "0,2", "--keep", "0.5,0.111", "--out", str(out)]
    assert cli.main(argv) == 0
    image = Image.open(out)
    assert image.width == 3 * 336 + 2 * 4  # original + two stages, one view each
    legend = image.text["legend"].splitlines()
    assert legend[0] == "method: pio  keep=[0.5, 0.111]  layers=[0, 2]  budget_scope=image"
    assert legend[1] == "stage 1 (after 0 decoder layers): sample 0: 128/256 kept (50.0%)"
    assert legend[2] == "stage 2 (after 2 decoder layers): sample 0: 28/256 kept (10.9%)"
    assert "overlay:" in capsys.readouterr().out


def test_demo_runs_on_the_shipped_checkpoint(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "testbed VLM" in out and "256 -> 28" in out
    assert (tmp_path / "overlay.png").is_file() and (tmp_path / "image.png").is_file()
