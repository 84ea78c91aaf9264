"""A local lmms-eval task over testbed samples: YAML, utils.py and a ``save_to_disk`` dataset (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

TASK = "piofvlm_testbed"

UTILS = '''"""Prompt and scoring of the local testbed task: those of `piofvlm eval` (question, first-word match).

With PIOFVLM_SHARD_LOG set, each process also appends the documents it scored (lmms-eval scores each document on
the rank that answered it) to ``$PIOFVLM_SHARD_LOG/<pid>.jsonl``, with its rank and process id.
"""

import json
import os

from piofvlm.testbed.model import first_word


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    if os.environ.get("PIOFVLM_SHARD_LOG"):
        row = {"id": doc["id"], "rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(), "answer": results[0]}
        with open(os.path.join(os.environ["PIOFVLM_SHARD_LOG"], f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\\n")
    return {"exact_match": float(first_word(results[0]) == doc["answer"])}
'''

YAML = """task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 2
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def write_task(folder: Path, split: str, num_samples: int) -> Path:
    """Write the task for the first ``num_samples`` of testbed ``split`` into ``folder`` (the --include_path)."""
    import datasets

    from piofvlm.testbed import data

    folder.mkdir(parents=True, exist_ok=True)
    samples = data.make_split(split, num_samples)
    columns = {key: [s[key] for s in samples] for key in ("image", "question", "answer", "task")}
    columns["id"] = list(range(len(samples)))
    features = datasets.Features(
        image=datasets.Image(), question=datasets.Value("string"), answer=datasets.Value("string"),
        task=datasets.Value("string"), id=datasets.Value("int64"),
    )  # fmt: skip
    dataset = datasets.DatasetDict(test=datasets.Dataset.from_dict(columns, features=features))
    dataset.save_to_disk(str(folder / "data"))
    (folder / "utils.py").write_text(UTILS)
    (folder / f"{TASK}.yaml").write_text(YAML.format(task=TASK, data=folder / "data"))
    return folder
