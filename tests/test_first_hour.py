"""The first hour (issue 27): honest timings (device, dtype, threads), a CLI that guides (family check before
loading, hub ids offline, --keep that cannot be misread, JSON output), a light ``import piofvlm``, plots that
carry their context."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import piofvlm
from piofvlm import cli, loading, runtime
from piofvlm.bench import harness, report
from piofvlm.tiny import llava as toy

SRC = str(Path(piofvlm.__file__).resolve().parents[1])


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    environment = {**os.environ, "PYTHONPATH": SRC, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy-llava")
    toy.save_toy_llava(directory)
    return directory


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "image.png"
    toy.random_image(3).save(path)
    return path


# ------------------------------------------------------------------------------------------------- --keep
def test_keep_parses_ratios_percentages_and_counts():
    assert cli.parse_keep("0.111") == 0.111 and cli.parse_keep("11%") == 0.11 and cli.parse_keep("11.1%") == 0.111
    assert cli.parse_keep("11") == 11 and isinstance(cli.parse_keep("11"), int)
    assert cli.parse_keep("0.5,25%,11") == [0.5, 0.25, 11]
    assert cli.parse_keep("100%") == 1.0


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("11.1", "write 11.1% (or 0.111)"),
        ("0%", "a percentage must be in (0%, 100%]"),
        ("150%", "a percentage must be in (0%, 100%]"),
        ("lots", "give a ratio (0.111), a percentage (11.1%) or a whole token count (11)"),
        (",", "--keep is empty"),
    ],
)
def test_keep_refuses_what_could_be_misread(text, says):
    with pytest.raises(ValueError) as error:
        cli.parse_keep(text)
    assert says in str(error.value)


def test_kept_counts_are_printed_with_their_share():
    assert cli.describe_kept(11, 256) == "11 tokens (4.3%)"
    assert cli.describe_kept(1, 49) == "1 token (2.0%)"


def test_run_prints_a_count_as_tokens_and_percent_and_says_what_it_ran_on(saved_llava, image, capsys):
    argv = ["run", "--model", str(saved_llava), "--image", str(image), "--prompt", "how many ?", "--threads", "1"]
    assert cli.main([*argv, "--keep", "5", "--layers", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens: 49 -> 5 tokens (10.2%)" in out
    timed_on = next(line for line in out.splitlines() if line.startswith("timed on: "))
    assert timed_on.startswith("timed on: cpu (") and ", float32, 1 CPU thread (--threads)" in timed_on
    assert cli.main([*argv, "--keep", "20%", "--layers", "1", "--max-new-tokens", "2"]) == 0
    assert "visual tokens: 49 -> 10 tokens (20.4%)" in capsys.readouterr().out  # 20% of 49, rounded half up
    assert cli.main([*argv, "--keep", "11.1", "--max-new-tokens", "2"]) == 2
    assert "for 11.1 percent write 11.1%" in capsys.readouterr().err


def test_run_json(saved_llava, image, capsys):
    argv = ["run", "--model", str(saved_llava), "--image", str(image), "--prompt", "how many ?", "--threads", "1"]
    assert (
        cli.main([*argv, "--keep", "0.2", "--layers", "1", "--max-new-tokens", "2", "--repeats", "2", "--json"]) == 0
    )
    report_ = json.loads(capsys.readouterr().out)
    assert report_["visual_tokens"] == 49 and report_["kept_per_stage"] == [10] and report_["repeats"] == 2
    assert report_["method"]["method"] == "pio" and report_["method"]["keep"] == [0.2]
    assert report_["prefill_ms"] > 0 and report_["generate_ms"] > 0 and isinstance(report_["answer"], str)
    assert "float32, 1 CPU thread" in report_["timed_on"]
    assert cli.main([*argv, "--method", "none", "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept_per_stage"] == []


# ------------------------------------------------------------------------------------------ family check
def _config_dir(tmp_path: Path, config: dict) -> Path:
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory  # no weights: a check that ran after loading would fail in transformers, not with these words


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"model_type": "llama", "hidden_size": 8}, "model type 'llama' is a text-only model (no vision_config)"),
        ({"model_type": "chameleon", "vision_config": {}}, "model type 'chameleon' is not supported yet"),
        ({"model_type": "mllama", "vision_config": {}}, "model type 'mllama' is refused by design (the visual"),
        ({"model_type": "no_such_vlm", "vision_config": {}}, "model type 'no_such_vlm' is not a family piofvlm"),
    ],
)
def test_unsupported_checkpoints_get_piofvlms_message_before_loading(tmp_path, image, capsys, config, says):
    directory = _config_dir(tmp_path, config)
    assert cli.main(["run", "--model", str(directory), "--image", str(image), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("piofvlm: error: ") and says in err and "llava, llava_next" in err
    assert "Traceback" not in err


def test_supported_family_passes_the_check(saved_llava):
    assert loading.resolve_checkpoint(saved_llava) == saved_llava


# ---------------------------------------------------------------------------------------------- hub ids
def test_hub_id_offline_and_not_cached_fails_fast_with_what_to_do(image, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["run", "--model", "nobody-i27/no-such-model", "--image", str(image), "--prompt", "x"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err and "hf download nobody-i27/no-such-model" in err


def test_hub_id_with_no_network_fails_fast(image, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    assert cli.main(["serve", "--model", "nobody-i27/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "the hub is unreachable: 127.0.0.1:9 cannot be reached" in err and "HF_HUB_OFFLINE=1" in err


def test_a_path_that_is_neither_directory_nor_hub_id(tmp_path, image, capsys):
    argv = ["run", "--model", str(tmp_path / "a" / "b"), "--image", str(image), "--prompt", "x"]
    assert cli.main(argv) == 2
    assert "neither a local checkpoint directory nor a hub id" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- dtype, threads
@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx2", "avx512f"}, "float32"), ({"avx512f", "avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16"),
     ({"fp", "asimd", "bf16"}, "bfloat16"), (set(), "float32")],
)  # fmt: skip
def test_auto_dtype_follows_the_cpu_flags(flags, expected):
    dtype, why = runtime.choose_dtype("auto", "cpu", flags=flags)
    assert dtype == expected
    assert ("emulated" in why) == (expected == "float32")


def test_a_dtype_asked_for_is_kept_and_a_bad_one_refused():
    assert runtime.choose_dtype("bfloat16", "cpu", flags=set()) == ("bfloat16", "as asked")
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16"):
        runtime.choose_dtype("half", "cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512_bf16\n\nflags : other\n")
    assert runtime.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert runtime.cpu_name(str(cpuinfo)) == "Test CPU"
    assert runtime.cpu_flags(str(tmp_path / "missing")) is None and not runtime.cpu_has_native_bf16(None)


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    assert runtime.default_threads(cores=2, load=0.2, env={}) == 2
    assert runtime.default_threads(cores=2, load=0.6, env={}) == 1
    assert runtime.default_threads(cores=2, load=7.5, env={}) == 1
    assert runtime.default_threads(cores=16, load=3.4, env={}) == 13
    monkeypatch.setattr(runtime, "load_average_1min", lambda: None)  # no load average on this OS: every core
    assert runtime.default_threads(cores=2, env={}) == 2
    assert runtime.default_threads(cores=2, load=9.0, env={"OMP_NUM_THREADS": "3"}) == 3


def test_bench_auto_dtype_is_float32_without_native_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": {"avx2"})
    config = harness.BenchConfig(
        name="auto", preset="tiny", new_tokens=2, warmup=0, repeats=1, profile_repeats=0, count_flops=False, threads=1
    )
    assert config.dtype == "auto"
    result = harness.run_benchmark(config)
    assert result["config"]["dtype"] == "float32" and "emulated" in result["environment"]["dtype_choice"]
    assert result["environment"]["torch_threads"] == 1
    head = report.header(result)
    assert "float32, 1 thread (" in head and "no native bfloat16" in head


def test_decode_time_is_never_negative():
    assert harness.decode_ms_per_token([1.0], [1.2], 3) is None  # noise: end to end below the prefill
    assert harness.decode_ms_per_token([1.0], [1.0], 3) is None
    assert harness.decode_ms_per_token([1.2], [1.0], 3) == pytest.approx(100.0)
    assert report._decode(None) == "n/a (below noise)" and report._decode(12.34) == "12.3"


def test_bench_quick_uses_the_quick_preset_float32_and_no_profiling(monkeypatch, tmp_path):
    seen = {}

    def fake_run(config, progress_bar=False):
        seen["config"] = config
        raise ValueError("stop here")

    monkeypatch.setattr(harness, "run_benchmark", fake_run)
    monkeypatch.setattr("piofvlm.bench.run_benchmark", fake_run)
    assert cli.main(["bench", "--quick", "--keep", "11.1%", "--out", str(tmp_path)]) == 2
    config = seen["config"]
    assert config.preset == cli.QUICK_PRESET and config.num_layers == cli.QUICK_LAYERS and config.dtype == "auto"
    assert config.repeats == 1 and config.profile_repeats == 0 and not config.count_flops
    assert config.keeps == [0.111]


# ------------------------------------------------------------------------------------- import, help, warnings
def test_import_piofvlm_and_help_load_neither_torch_nor_transformers():
    code = (
        "import sys, piofvlm; from piofvlm import cli; cli.build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'transformers', 'PIL', 'numpy') if m in sys.modules))"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_lazy_names_resolve_and_register_every_method():
    done = _python("import piofvlm; print(piofvlm.get_method('pio', keep=0.5).keep, len(piofvlm.ADAPTERS) > 10)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[0.5]", "True"]
    done = _python(
        "import piofvlm; print(piofvlm.methods.VisionZip.name, piofvlm.presets.get_preset('pio-llava15-64').keep)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["visionzip", "[92,", "54,", "22]"]
    done = _python("from piofvlm.registry import available_methods; print(len(available_methods()))")
    assert done.stdout.strip() == str(len(cli.METHOD_NAMES))  # the registry loads the built-in methods itself
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        piofvlm.nope  # noqa: B018


def test_method_names_in_help_are_the_registered_ones():
    assert list(cli.METHOD_NAMES) == piofvlm.available_methods()


def test_help_shows_defaults():
    text = cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "(default: pio)" in text and "(default: float32)" in text and "(default: 32)" in text
    assert "(default: None)" not in text


def test_cli_silences_third_party_import_warnings():
    pytest.importorskip("torchao")
    done = subprocess.run(
        [sys.executable, "-m", "piofvlm", "doctor", "--family", "nope"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": SRC},
        timeout=300,
    )
    assert done.returncode == 2 and "no self-test for nope" in done.stderr
    assert "Failed to load" not in done.stderr and "_pytree" not in done.stderr, done.stderr


# --------------------------------------------------------------------------------------------------- plots
def test_show_family_says_random_weights_in_the_picture(tmp_path, capsys):
    out = tmp_path / "overlay.png"
    assert cli.main(["show", "--family", "llava", "--keep", "0.25", "--layers", "1", "--out", str(out)]) == 0
    legend = Image.open(out).text["legend"].splitlines()
    assert legend[0] == cli.RANDOM_WEIGHTS_NOTE and legend[1].startswith("method: pio")


def test_eval_plot_title_names_split_samples_and_layer():
    from piofvlm.evaluation import plot_title

    rows = [{"label": "none", "method": {"method": "none"}}, {"label": "pio", "method": {"layers": [2]}}]
    assert plot_title(rows, {"split": "test", "num_samples": 40}) == (
        "testbed, test split, 40 samples, pruned after layer(s) [2]"
    )


def test_hub_id_offline_runs_from_the_hub_cache(saved_llava, image, tmp_path):
    """A hub id already in the cache runs with HF_HUB_OFFLINE=1 (the cache layout huggingface_hub writes)."""
    import shutil

    snapshot = tmp_path / "hub" / "models--someone--tiny-llava" / "snapshots" / "0123abc"
    shutil.copytree(saved_llava, snapshot)
    (tmp_path / "hub" / "models--someone--tiny-llava" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llava" / "refs" / "main").write_text("0123abc")
    code = (
        "import sys; from piofvlm import cli; sys.exit(cli.main(['run', '--model', 'someone/tiny-llava', '--image', "
        f"{str(image)!r}, '--prompt', 'how many ?', '--keep', '5', '--layers', '1', '--max-new-tokens', '2', "
        "'--threads', '1', '--json']))"
    )
    done = _python(code, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["kept_per_stage"] == [5]
