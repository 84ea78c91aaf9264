"""``benchmarks/gpu.sh --dry-run``: every part of the prepared GPU run on tiny presets on the CPU, so the GPU run
cannot fail on a typo. No timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8, files  # what the device tool brings back
    assert files == sorted(
        ["gpu.md", "gpu.log", "parity.json", "llava-next-7b.json", "llava-next-7b.md", "llava15-7b.json",
         "llava15-7b.md", "speed.json"]
    )  # fmt: skip
    report = (out / "gpu.md").read_text()
    assert "FAILED" not in report and "SKIPPED" not in report
    assert "flash_attention_2: skipped" in (out / "gpu.log").read_text()
    parity = json.loads((out / "parity.json").read_text())
    parts = [key for key in parity if key != "environment"]
    assert parts == ["llava-next-7b bf16", "llava15-7b bf16", "llava-next-7b fp32 4 layers"]
    for key in parts:
        assert parity[key]["attn"] == ["sdpa", "eager"]
        for rows in parity[key]["keep_all"].values():
            assert rows["pio"]["identical"] and rows["random"]["identical"]  # keep-all prune == unhooked
    bench = json.loads((out / "llava-next-7b.json").read_text())
    assert [v["label"].split()[0] for v in bench["variants"]] == ["none", "pio", "fastv", "dart", "random"]
    assert bench["config"]["dtype"] == "bfloat16" and bench["config"]["keeps"] == [0.111]
    speed = json.loads((out / "speed.json").read_text())  # the speed part (issue 25): every table has its rows
    assert [row["method"] for row in speed["decode"]] == ["random", "fastv", "pio"] * 2
    assert [row["method"] for row in speed["compiled"]] == ["none", "pio"]
    assert all(row["tokens_equal"] for row in speed["compiled"])  # compiled (dynamo, eager backend) == eager
    assert [row["variant"] for row in speed["prefill"]["rows"]] == ["none", "direct", "random", "fastv", "pio"]
    assert {row["batch"] for row in speed["throughput"]["rows"]} == {1, 2}
    rows = speed["compiled_prefill"]["rows"]  # the compiled post-prune prefill (dynamo, eager backend) == eager
    assert [row["variant"] for row in rows] == ["direct", "random", "random compiled", "pio", "pio compiled"]
    assert all(row["same_kept"] and row["max_abs_logit_diff"] == 0 for row in rows if "compiled" in row["variant"])
    assert "Prefill against the direct bound" in report and "Throughput" in report
