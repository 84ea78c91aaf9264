"""Tensor parallelism: every registered method under ``DistributedConfig(tp_plan="auto")`` equals one process.

``torchrun --nproc-per-node 2`` (gloo, CPU) runs ``tests/tp_worker.py`` once per model (the testbed, tiny LLaVA-NeXT,
Qwen2.5-VL and Qwen3.5, whose ``q_proj`` packs queries and gates): each rank loads the saved
checkpoint sharded over the two ranks and unsharded, applies every registered method (PIO with its fast and its
reference proxy) to both, and reports kept sets, selection scores, logits and three greedy tokens. Asserted here:
the checkpoint really is sharded (each rank holds half of ``q_proj``); per method, the kept sets are identical on
both ranks and to the unsharded model, scores and logits agree within fp32 tolerance, the tokens are the same; a
method the family refuses is refused with the same error under tensor parallelism. Before the fix in
``methods/shared/attention.py`` fastv / pdrop / sparsevlm / dart scored with each rank's own heads (logits off by up
to 19.9 on the testbed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import piofvlm
from test_methods_matrix import MATRIX

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("tp_worker.py")
CASES = ["testbed", "llava_next", "qwen2_5_vl", "qwen3_5"]


def method_specs() -> list[list]:
    """``[label, name, fields]`` for every registered method (PIO twice: fast and reference proxy)."""
    specs: list[list] = [["none", "none", {}]]
    specs += [["pio", "pio", {"keep": 0.25, "layers": [2]}]]
    specs += [["pio_reference", "pio", {"keep": 0.25, "layers": [2], "fast_proxy": False}]]
    for name, (fields, stages) in MATRIX.items():
        if name == "chain":
            specs.append(
                [name, name, {"encoder": {**fields["encoder"], "keep": 0.5}, "llm": {**fields["llm"], "keep": 0.25}}]
            )
        else:
            specs.append([name, name, {**fields, "keep": [0.5, 0.25] if stages > 1 else 0.25}])
    return specs


def write_case(folder: Path, case: str) -> None:
    """The checkpoint (``save_pretrained``) and a left-padded batch of two prompts of ``case``."""
    if case == "testbed":
        from piofvlm.testbed import data
        from piofvlm.testbed.model import load_testbed, prompt

        model, processor = load_testbed()
        samples = data.make_split("test", 2)
        inputs = processor(
            images=[s["image"] for s in samples], text=[prompt(s["question"]) for s in samples],
            return_tensors="pt", padding=True,
        )  # fmt: skip
    elif case == "llava_next":
        from conftest import make_inputs
        from conftest import model as tiny

        model, inputs = tiny("llava_next"), make_inputs("llava_next", indices=(0, 2))
    else:
        import test_qwen

        model, inputs = test_qwen.model(case), test_qwen.make_inputs(case, indices=(0, 1))
    model.save_pretrained(folder / "model")
    torch.save(dict(inputs), folder / "inputs.pt")
    (folder / "methods.json").write_text(json.dumps(method_specs()))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a: list | None, b: list | None, tol: float) -> bool:
    """Nested lists of floats (or None) equal within ``tol`` times the largest magnitude of ``a``."""
    if a is None or b is None:
        return a is b
    if a and isinstance(a[0], list | None.__class__):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    x, y = torch.tensor(a), torch.tensor(b)
    if x.shape != y.shape or not torch.equal(x.isfinite(), y.isfinite()):
        return False
    finite = x.isfinite()  # visionzip marks its dominant tokens +inf
    if not finite.any():
        return torch.equal(x, y)
    x, y = x[finite], y[finite]
    return bool(((x - y).abs() <= tol * x.abs().max().clamp(min=1e-12)).all())


@pytest.mark.parametrize("case", CASES)
def test_every_method_under_tensor_parallelism_equals_one_process(case, tmp_path):
    pytest.importorskip("torch.distributed.tensor")
    write_case(tmp_path, case)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(piofvlm.__file__).parents[1])]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    proc = subprocess.run([*cmd, str(WORKER), str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"], r["tp_size"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    for r in ranks:  # the checkpoint is sharded: each rank holds half of q_proj's rows
        local, full = r["q_proj_rows"]
        assert 2 * local == full
    for r in ranks:  # a shard without whole heads is refused by name, not scored with the wrong heads
        assert r["refusal"] and "under tensor parallelism need each rank to hold whole query heads" in r["refusal"]
    labels = [label for label, _, _ in method_specs()]
    assert sorted({name for _, name, _ in method_specs()}) == piofvlm.available_methods()
    failures = []
    for label in labels:
        single, sharded = ranks[0]["methods"][label]["single"], [r["methods"][label]["tp"] for r in ranks]
        if "error" in single:  # refused by the family: refused the same way under tensor parallelism
            if any(s.get("error") != single["error"] for s in sharded):
                failures.append(f"{label}: single process refused ({single['error']}), tp gave {sharded}")
            continue
        for r, tp in enumerate(sharded):
            entry = ranks[r]["methods"][label]
            if "error" in tp:
                failures.append(f"{label} rank {r}: {tp['error']}")
                continue
            if tp["kept"] != single["kept"]:
                failures.append(f"{label} rank {r}: kept sets differ from one process")
            if not close(single["scores"], tp["scores"], 1e-3):
                failures.append(f"{label} rank {r}: selection scores differ from one process")
            if entry["max_logit_diff"] > 1e-4:
                failures.append(f"{label} rank {r}: logits off by {entry['max_logit_diff']:.3g}")
            if tp["tokens"] != single["tokens"]:
                failures.append(f"{label} rank {r}: greedy tokens {tp['tokens']} != {single['tokens']}")
        if label != "none" and "kept" in single:  # the comparison is about a real selection
            assert single["kept"] and all(len(k) > 0 for k in single["kept"][-1])
    assert not failures, "\n".join(failures)
