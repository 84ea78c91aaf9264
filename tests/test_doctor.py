"""``piofvlm doctor``: the report, its verdict on a working and on a broken installation, and its CLI."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from piofvlm import doctor, transformers_compat
from piofvlm.cli import main
from piofvlm.tiny.cases import TINY_CASES, UNAVAILABLE


def test_every_family_of_the_registry_has_a_self_test():
    from piofvlm.adapters import ADAPTERS

    registered = {model_type for adapter in ADAPTERS.values() for model_type in adapter.model_types}
    assert set(TINY_CASES) | set(UNAVAILABLE) == registered
    assert not set(TINY_CASES) & set(UNAVAILABLE)


@pytest.mark.parametrize("model_type", list(TINY_CASES))
def test_self_test_passes_on_this_installation(model_type):
    result = doctor.check_family(model_type)
    assert result.ok, result.detail


def test_report_says_all_good(monkeypatch):
    monkeypatch.setattr(transformers_compat, "TRANSFORMERS_VERSION", transformers_compat.KNOWN_GOOD_TRANSFORMERS[-1])
    monkeypatch.setattr(doctor, "environment", lambda: {**ENV, "transformers_status": "tested"})
    out = io.StringIO()
    assert doctor.run(["llava"], out) == 0
    text = out.getvalue()
    assert "llava" in text and "ok" in text and text.rstrip().endswith("all good")


ENV = {"python": "3", "torch": "2", "transformers": "5", "transformers_tested_range": ">=a,<b", "device": "cpu"}
ENV["attention"] = ["sdpa"]


def test_a_broken_internal_is_reported_with_what_to_do(monkeypatch):
    # A release that renamed the cache keyword again: the hooks would see no cache while decoding.
    monkeypatch.setattr(transformers_compat, "cache_from_kwargs", lambda kwargs: None)
    out = io.StringIO()
    assert doctor.run(["llava"], out) == 1
    text = out.getvalue()
    assert "FAILED" in text
    last = text.rstrip().splitlines()[-1]
    assert last.startswith("broken: llava.") and "pip install 'transformers==" in last and "report an issue" in last


def test_outside_the_tested_range_is_said(monkeypatch):
    monkeypatch.setattr(doctor, "environment", lambda: {**ENV, "transformers_status": "newer"})
    out = io.StringIO()
    assert doctor.run(["llava"], out) == 0
    assert "outside the tested range" in out.getvalue().splitlines()[-1]


def test_cli_unknown_family_is_a_usage_error(capsys):
    assert main(["doctor", "--family", "nope"]) == 2
    assert capsys.readouterr().err.startswith("piofvlm: error: no self-test for nope")


def test_python_dash_m_is_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "piofvlm", "doctor", "--family", "llava"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "piofvlm doctor" in proc.stdout and "transformers" in proc.stdout


def test_the_report_self_tests_every_family_and_names_the_unavailable_ones(monkeypatch):
    """``piofvlm doctor`` without ``--family`` runs the self-test of every family of ``TINY_CASES`` (each one's own
    self-test is ``test_self_test_passes_on_this_installation``) and says why the others are not tested."""
    checked = []

    def check(model_type):
        checked.append(model_type)
        return doctor.FamilyResult(model_type, True, "ok", 0.0)

    monkeypatch.setattr(doctor, "check_family", check)
    monkeypatch.setattr(doctor, "environment", lambda: {**ENV, "transformers_status": "tested"})
    out = io.StringIO()
    assert doctor.run(None, out) == 0
    assert checked == list(TINY_CASES)
    lines = out.getvalue().splitlines()
    for model_type in TINY_CASES:
        assert any(line.split()[:2] == [model_type, "ok"] for line in lines), model_type
    for model_type, reason in UNAVAILABLE.items():
        assert f"{model_type:<18} not tested here: {reason}" in out.getvalue()


def test_a_pruned_cache_that_misreports_its_length_is_reported(monkeypatch):
    """transformers 5.25 started counting linear-attention layers in ``Cache.get_seq_length``: a cache pruned before
    layer 0 whose length layer is left unpadded reports the pruned length. The self-test must fail then (it once said
    ok and only a property test caught it): here the first turn's second step already trips over it."""
    monkeypatch.setattr(transformers_compat, "pad_cache_layer", lambda cache, layer, count: None)
    result = doctor.check_family("llava")
    assert not result.ok and result.detail != "ok"
