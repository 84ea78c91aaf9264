"""One rank of the tensor-parallel check (``tests/test_tensor_parallel.py`` launches it with ``torchrun``).

Usage: ``torchrun --nproc-per-node 2 tests/tp_worker.py CASE_DIR``. ``CASE_DIR`` holds ``model/`` (a checkpoint
written by ``save_pretrained``), ``inputs.pt`` (a dict of tensors: one left-padded batch) and ``methods.json``
(``[[label, method name, fields], ...]``). Each rank loads the checkpoint twice, with ``tp_plan="auto"`` (sharded
over the ranks, gloo on the CPU) and without it (the single-process model), runs every method on both (a forward
and a short greedy ``generate``), and writes ``rank<r>.json``: per method the kept sets of both models, the largest
logit difference and both token sequences (or the error each raised). Nothing is compared here: the test does it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def kept_sets(method) -> list[list[list[int]]]:
    return [[k.tolist() for k in record.kept] for record in method.last_selection]


def scores(method) -> list[list[list[float] | None]]:
    return [[None if s is None else s.float().tolist() for s in record.scores] for record in method.last_selection]


def run(model, inputs: dict, name: str, fields: dict, new_tokens: int) -> dict:
    import piofvlm

    method = piofvlm.get_method(name, **fields)
    try:
        with torch.no_grad(), method(model):
            logits = model(**inputs).logits.float()
            kept, score = kept_sets(method), scores(method)
            tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    except (ValueError, RuntimeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {
        "kept": kept,
        "scores": score,
        "logits": logits,
        "tokens": tokens[:, inputs["input_ids"].shape[1] :].tolist(),
    }


def first_attention(model):
    """The attention module of the first (full-)attention decoder layer."""
    from piofvlm.adapters.registry import get_adapter

    adapter = get_adapter(model)
    index = next(i for i in range(len(adapter.layers)) if adapter.is_attention_layer(i))
    return adapter.layers[index].self_attn


def refusal(model) -> str | None:
    """The error of the head gather for a shard that does not hold whole heads evenly (one head too many)."""
    from piofvlm.adapters.registry import get_adapter
    from piofvlm.methods.shared.attention import _all_heads

    adapter = get_adapter(model)
    attn = first_attention(model)
    local = attn.q_proj.weight.to_local().shape[0] // attn.head_dim
    try:
        _all_heads(adapter, torch.zeros(1, 2, local + 1, attn.head_dim), attn.q_proj, "query")
    except ValueError as err:
        return str(err)
    return None


def main(case: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from piofvlm import transformers_compat

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    inputs = torch.load(case / "inputs.pt")
    methods = json.loads((case / "methods.json").read_text())
    new_tokens = 3
    single = AutoModelForImageTextToText.from_pretrained(case / "model", dtype=torch.float32).eval()
    sharded = AutoModelForImageTextToText.from_pretrained(
        case / "model", dtype=torch.float32, **transformers_compat.tensor_parallel_kwargs("auto")
    ).eval()
    for m in (single, sharded):  # the toy checkpoints have no generation defaults of their own
        m.generation_config.pad_token_id = m.generation_config.pad_token_id or 0
    attn = first_attention(sharded)
    local_rows = attn.q_proj.weight.to_local().shape[0] if hasattr(attn.q_proj.weight, "to_local") else -1
    report = {
        "rank": rank,
        "world": world,
        "tp_size": getattr(sharded, "tp_size", None),
        "q_proj_rows": [local_rows, attn.q_proj.out_features],
        "methods": {},
    }
    report["refusal"] = refusal(sharded)
    for label, name, fields in methods:
        alone = run(single, inputs, name, fields, new_tokens)
        tp = run(sharded, inputs, name, fields, new_tokens)
        entry: dict = {"single": {}, "tp": {}}
        for key, result in (("single", alone), ("tp", tp)):
            entry[key] = {k: v for k, v in result.items() if k != "logits"}
        if "logits" in alone and "logits" in tp:
            entry["max_logit_diff"] = float((alone["logits"] - tp["logits"]).abs().max())
        report["methods"][label] = entry
        dist.barrier()
    (case / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
