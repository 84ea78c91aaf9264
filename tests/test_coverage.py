"""The coverage report (``piofvlm families``, ``docs/families.md``) against the installed transformers and the
adapter registry, and the three errors of an unsupported checkpoint (refused by design / not yet / not a VLM)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from piofvlm import coverage, transformers_compat
from piofvlm.adapters import ADAPTERS, get_adapter
from piofvlm.adapters.registry import _CROSS_ATTENTION, _ENCODER_DECODER, NOT_SUPPORTED
from piofvlm.cli import main
from piofvlm.tiny.cases import TINY_CASES

DOC = Path(__file__).parent.parent / "docs" / "families.md"


def test_report_covers_every_mapped_model_type_once():
    mapping = transformers_compat.image_text_to_text_model_types()
    rows = coverage.coverage()
    assert [row.model_type for row in rows] == sorted(set(mapping) | set(ADAPTERS))
    assert all(row.model_class == mapping.get(row.model_type, "") for row in rows)
    assert sum(coverage.counts(rows).values()) == len(rows)


def test_statuses_agree_with_the_registry():
    """supported iff an adapter is registered (tested iff it has a tiny case), refused iff NOT_SUPPORTED names it
    (with its reason), else not yet; every refusal is a mapped model type without an adapter."""
    mapping = transformers_compat.image_text_to_text_model_types()
    for row in coverage.coverage():
        if row.model_type in ADAPTERS:
            assert row.status == coverage.SUPPORTED
            assert row.tested == (row.model_type in TINY_CASES)
            assert row.detail
        elif row.model_type in NOT_SUPPORTED:
            assert (row.status, row.tested, row.detail) == (coverage.REFUSED, False, NOT_SUPPORTED[row.model_type])
        else:
            assert (row.status, row.tested) == (coverage.NOT_YET, False)
    assert not set(NOT_SUPPORTED) & set(ADAPTERS)
    assert set(NOT_SUPPORTED) <= set(mapping)
    assert set(coverage.NOTES) == set(ADAPTERS)


def test_the_moe_flagships_are_supported_and_tested():
    rows = {row.model_type: row for row in coverage.coverage()}
    for model_type in ("qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe"):
        assert (rows[model_type].status, rows[model_type].tested) == (coverage.SUPPORTED, True)


def test_encoder_decoder_refusals_agree_with_transformers():
    """A model type refused as encoder-decoder has an encoder-decoder config in transformers, and every mapped model
    type whose config is encoder-decoder is refused as such."""
    mapping = transformers_compat.image_text_to_text_model_types()
    encoder_decoder, unbuildable = set(), set()
    for model_type in mapping:
        try:
            config = AutoConfig.for_model(model_type)
        except (ValueError, ImportError, TypeError):
            unbuildable.add(model_type)  # e.g. vision-encoder-decoder on 5.17: no default config without its parts
            continue
        if getattr(config, "is_encoder_decoder", False):
            encoder_decoder.add(model_type)
    assert encoder_decoder  # florence2, pix2struct, ... on 5.24
    refused = {model_type for model_type, reason in NOT_SUPPORTED.items() if reason.startswith(_ENCODER_DECODER)}
    assert encoder_decoder <= refused, encoder_decoder - refused
    assert refused - encoder_decoder <= unbuildable, refused - encoder_decoder - unbuildable


def _model_of_type(model_type: str) -> torch.nn.Module:
    class Stand(torch.nn.Module):
        pass

    stand = Stand()
    stand.config = AutoConfig.for_model(model_type) if model_type != "llama" else AutoConfig.for_model("llama")
    return stand


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        ("mllama", r"model type 'mllama' \(Stand\) is refused by design: " + re.escape(_CROSS_ATTENTION)),
        ("florence2", r"'florence2' \(Stand\) is refused by design: encoder-decoder"),
        ("aya_vision", r"'aya_vision' \(Stand\) is not supported yet: .*`piofvlm families`.*Supported model types: "),
        ("llama", r"unsupported model type 'llama'.*supported model types: .*qwen3_vl_moe"),
    ],
)
def test_an_unsupported_checkpoint_says_which_of_the_three_it_is(model_type, message):
    with pytest.raises(ValueError, match=message):
        get_adapter(_model_of_type(model_type))


def test_cli_families_table_and_json(capsys):
    rows = coverage.coverage()
    assert main(["families"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == len(rows) + 2  # a line per model type, a blank line, the summary
    for line, row in zip(table, rows, strict=False):
        assert line.split()[:2] == [row.model_type, row.model_class]
        assert row.status in line
    assert re.match(rf"transformers \S+: {len(rows)} model types, \d+ supported", table[-1])
    assert main(["families", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transformers"] == transformers_compat.TRANSFORMERS_VERSION
    assert [family["model_type"] for family in report["families"]] == [row.model_type for row in rows]
    assert {family["model_type"]: family["status"] for family in report["families"]}["glm4v_moe"] == "supported"
    assert report["counts"] == coverage.counts(rows)


def test_cli_families_refuses_two_formats(capsys):
    with pytest.raises(SystemExit) as error:
        main(["families", "--json", "--markdown"])
    assert error.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_docs_families_md_is_up_to_date():
    """docs/families.md is ``piofvlm families --markdown`` on the transformers release it names (other releases:
    regenerate it on the locked one)."""
    text = DOC.read_text()
    named = re.search(r"\*\*transformers (\S+):", text)
    assert named is not None
    if named.group(1) != transformers_compat.TRANSFORMERS_VERSION:
        pytest.skip(f"docs/families.md describes transformers {named.group(1)}")
    assert text == coverage.render_markdown(coverage.coverage()) + "\n", (
        "regenerate: piofvlm families --markdown > docs/families.md"
    )
