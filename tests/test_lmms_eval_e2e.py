"""End to end with the real lmms-eval: its CLI and evaluator, a local task of testbed samples, the shipped checkpoint.

The score equals what ``piofvlm eval`` reports for the same samples and method, per sample too; batch 8 equals
batch 1; and two processes (lmms-eval's data parallelism, ``ACCELERATE_USE_CPU=true torchrun --nproc-per-node 2``:
two gloo ranks) answer disjoint shards whose gathered answers and score equal one process. (``accelerate launch
--cpu --num_processes 2`` would start ONE process under accelerate 1.15: ``--cpu`` takes its single-process
launcher.) Nothing is downloaded: the task's YAML, utils.py and dataset are written here, and the hub is switched off.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_task import TASK, write_task
from piofvlm.testbed.model import CHECKPOINT_DIR

pytestmark = pytest.mark.slow
NUM_SAMPLES = 32
METHOD_ARGS = "method=pio,keep=0.111,layers=2"


def offline_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(home))
    env.pop("LMMS_EVAL_PLUGINS", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make install-eval)")
    if not (CHECKPOINT_DIR / "model.safetensors").is_file():
        pytest.skip(f"the shipped testbed checkpoint is missing ({CHECKPOINT_DIR})")
    root = tmp_path_factory.mktemp("lmms")
    task_dir = write_task(root / "task", "test", NUM_SAMPLES)
    # `piofvlm eval` on the same samples and method (its --split/--num-samples slice is the task's dataset).
    cmd = [sys.executable, "-m", "piofvlm.cli", "eval", "--methods", "pio", "--keep", "0.111", "--layers", "2"]
    cmd += ["--split", "test", "--num-samples", str(NUM_SAMPLES), "--batch-size", "8", "--out", str(root / "ours")]
    subprocess.run([*cmd, "--quiet"], check=True, capture_output=True, env=offline_env(root / "hf"))
    ours = json.loads((root / "ours" / "results.json").read_text())["rows"][0]["accuracy"]["all"]
    return root, task_dir, ours


def run_lmms_eval(
    root: Path,
    task_dir: Path,
    name: str,
    batch_size: int,
    processes: int = 1,
    shard_log: Path | None = None,
    model_args: str = "",
) -> tuple[float, list]:
    """lmms-eval's CLI on the local task; its score and per-sample first words, in doc order.

    ``processes > 1``: ``torchrun`` starts that many ranks (gloo on the CPU); with ``shard_log`` each process writes
    the documents it scored there (``lmms_task.UTILS``)."""
    out = root / name
    args = ["-m", "lmms_eval", "--model", "piofvlm"]
    args += ["--model_args", f"pretrained={CHECKPOINT_DIR},{METHOD_ARGS}{model_args}"]
    args += ["--tasks", TASK, "--include_path", str(task_dir), "--batch_size", str(batch_size)]
    args += ["--output_path", str(out), "--log_samples"]
    env = offline_env(root / "hf")
    if shard_log is not None:
        shard_log.mkdir(parents=True, exist_ok=True)
        env["PIOFVLM_SHARD_LOG"] = str(shard_log)
    if processes == 1:
        cmd = [sys.executable, *args]
    else:  # the README's recipe: torchrun starts the ranks, accelerate (inside lmms-eval) joins them over gloo
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        cmd += ["--master-port", str(free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    (root / f"{name}.stderr").write_text(proc.stderr)
    results, samples = list(out.rglob("*_results.json")), list(out.rglob(f"*_samples_{TASK}.jsonl"))
    # lmms-eval can exit 0 after an error (e.g. an import failure inside its evaluator) without writing results:
    # show its own output, which names the cause, instead of failing later on a missing file.
    if proc.returncode != 0 or len(results) != 1 or len(samples) != 1:
        pytest.fail(
            f"lmms-eval exited {proc.returncode} with {len(results)} results and {len(samples)} sample files in "
            f"{out}; its output:\n--- stdout (tail) ---\n{proc.stdout[-4000:]}\n--- stderr (tail) ---\n"
            f"{proc.stderr[-6000:]}",
            pytrace=False,
        )
    (results,), (samples,) = results, samples
    score = json.loads(results.read_text())["results"][TASK]["exact_match,none"]
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    from piofvlm.testbed.model import first_word

    return score, [
        first_word(r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0])
        for r in rows
    ]


@pytest.fixture(scope="module")
def batch8(setup):
    root, task_dir, _ = setup
    return run_lmms_eval(root, task_dir, "batch8", batch_size=8)


def test_lmms_eval_score_equals_piofvlm_eval(setup, batch8):
    from piofvlm import get_method
    from piofvlm.testbed import data
    from piofvlm.testbed.model import generate_answers, load_testbed

    _, _, ours = setup
    score, answers = batch8
    assert len(answers) == NUM_SAMPLES
    assert score == pytest.approx(ours, abs=1e-12)
    model, processor = load_testbed()
    with get_method("pio", keep=0.111, layers=[2])(model):
        expected = generate_answers(model, processor, data.make_split("test", NUM_SAMPLES), batch_size=8)
    assert answers == expected


def test_lmms_eval_batch_one_equals_batch_eight(setup, batch8):
    root, task_dir, _ = setup
    assert run_lmms_eval(root, task_dir, "batch1", batch_size=1) == batch8


def test_two_ranks_answer_disjoint_shards_and_equal_one_process(setup, batch8):
    root, task_dir, _ = setup
    log = root / "dp2_shards"
    score, answers = run_lmms_eval(root, task_dir, "dp2", batch_size=8, processes=2, shard_log=log)
    rows = [json.loads(line) for path in sorted(log.glob("*.jsonl")) for line in path.read_text().splitlines()]
    by_rank: dict[int, list[int]] = {}
    for row in rows:
        by_rank.setdefault(row["rank"], []).append(row["id"])
    pids = {row["rank"]: {r["pid"] for r in rows if r["rank"] == row["rank"]} for row in rows}
    # two distinct processes (one pid each), each answered a non-empty shard, the shards are disjoint and cover all
    assert sorted(by_rank) == [0, 1]
    assert all(len(p) == 1 for p in pids.values()) and pids[0] != pids[1]
    shards = [set(by_rank[0]), set(by_rank[1])]
    assert all(shards) and not shards[0] & shards[1]
    assert len(rows) == NUM_SAMPLES and shards[0] | shards[1] == set(range(NUM_SAMPLES))
    # each rank's own answers are the single process's answers for those documents
    from piofvlm.testbed.model import first_word

    assert all(first_word(row["answer"]) == batch8[1][row["id"]] for row in rows)
    # the gathered per-document answers and the metric equal one process
    assert (score, answers) == batch8


def test_tensor_parallel_two_ranks_equal_one_process(setup, batch8):
    """``tp_plan=auto`` under torchrun: both ranks hold half of the model and answer every request together; the
    answers each rank returns for its shard, gathered, and the score equal one process."""
    root, task_dir, _ = setup
    log = root / "tp2_shards"
    result = run_lmms_eval(root, task_dir, "tp2", 8, processes=2, shard_log=log, model_args=",tp_plan=auto")
    rows = [json.loads(line) for path in sorted(log.glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert sorted({row["rank"] for row in rows}) == [0, 1] and len(rows) == NUM_SAMPLES
    assert "piofvlm responding (tensor parallel)" in (root / "tp2.stderr").read_text()  # the plugin's TP path ran
    assert result == batch8
