"""Runs the testbed through vLLM with the piofvlm plugin and writes the answers (and what each image kept) as JSON.

Used by ``test_vllm_plugin.py`` in a subprocess per configuration (each vLLM engine is its own set of processes):
``python tests/vllm_plugin/runner.py --spec '{"method": "divprune", "keep": 64}' --n 200 --tp 1 --out result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def engine_kwargs(spec: dict, tp: int, model: str | None = None, max_model_len: int = 512) -> dict:
    from piofvlm.integrations.vllm import hf_overrides
    from piofvlm.testbed.model import CHECKPOINT_DIR

    model = model or str(CHECKPOINT_DIR)
    return {
        "model": model,
        "hf_overrides": hf_overrides(model, **spec),
        "max_model_len": max_model_len,
        "dtype": "float32",
        "enforce_eager": True,
        "gpu_memory_utilization": float(os.environ.get("PIOFVLM_VLLM_MEMORY", "0.04")),
        "tensor_parallel_size": tp,
        "limit_mm_per_prompt": {"image": 1},
        "seed": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the testbed)")
    parser.add_argument(
        "--family", default="llava", help="llava (the testbed's images), llava_next, qwen2_5_vl or qwen3_vl (resized)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    record = out.with_suffix(".kept.jsonl")
    record.unlink(missing_ok=True)
    os.environ["PIOFVLM_VLLM_RECORD"] = str(record)  # before the engine's processes start
    if args.tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vLLM's CPU backend binds each worker's threads to its own NUMA node and refuses more workers than nodes;
        # on a one-node machine the cores are split between the ranks by hand ("0|1" on 2 cores).
        cores = sorted(os.sched_getaffinity(0))
        share = max(1, len(cores) // args.tp)
        parts = [
            cores[min(r * share, len(cores) - 1) : max(r * share + share, 1 + min(r * share, len(cores) - 1))]
            for r in range(args.tp)
        ]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, part)) for part in parts)

    from vllm import LLM, SamplingParams

    from piofvlm.testbed import data
    from piofvlm.testbed import model as testbed_model

    spec = json.loads(args.spec)
    start = time.time()
    llm = LLM(**engine_kwargs(spec, args.tp, args.model, 1024 if args.family != "llava" else 512))
    loaded = time.time() - start
    samples = data.make_split("test", args.n)
    images = [s["image"] for s in samples]
    prompt = testbed_model.prompt
    if args.family == "llava_next":
        from vllm_models import next_image  # this folder's helper (the runner is run as a script from it)

        images = [next_image(image, i) for i, image in enumerate(images)]
    elif args.family in ("qwen2_5_vl", "qwen3_vl"):
        from vllm_models import qwen_image, qwen_prompt

        images, prompt = [qwen_image(image, i) for i, image in enumerate(images)], qwen_prompt
    requests = [
        {"prompt": prompt(s["question"]), "multi_modal_data": {"image": image}}
        for s, image in zip(samples, images, strict=True)
    ]
    start = time.time()
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=2, logprobs=5), use_tqdm=False)
    generated = time.time() - start
    video_error = None
    if args.family == "qwen3_vl":  # images only: a video request is refused, and the engine goes on
        import numpy as np

        metadata = {"fps": 2.0, "total_num_frames": 4, "duration": 2.0, "frames_indices": [0, 1, 2, 3]}
        video = (np.zeros((4, 56, 56, 3), np.uint8), {**metadata, "video_backend": "opencv"})
        text = "<|vision_start|> <|video_pad|> <|vision_end|> what"
        request = {"prompt": text, "multi_modal_data": {"video": video}}
        try:
            llm.generate(request, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        except Exception as error:  # noqa: BLE001 - the message is what the test checks
            video_error = f"{type(error).__name__}: {error}"
        again = llm.generate(requests[:1], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        assert list(again[0].outputs[0].token_ids) == list(outputs[0].outputs[0].token_ids)
    kept = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    result = {
        "spec": spec,
        "tp": args.tp,
        "answers": [testbed_model.first_word(o.outputs[0].text) for o in outputs],
        "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        # the first answer token's top-5 log-probabilities, {token id: log-prob}
        "first_logprobs": [
            {int(t): float(lp.logprob) for t, lp in (o.outputs[0].logprobs or [{}])[0].items()} for o in outputs
        ],
        "kept": kept,
        "seconds": {"load": round(loaded, 1), "generate": round(generated, 1)},
        "video_error": video_error,
    }
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
