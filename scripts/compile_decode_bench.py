"""Compiled vs eager decode ms/token with a static KV cache, unpruned and PIO-pruned (docs/benchmarks.md).

    python scripts/compile_decode_bench.py --preset llava15-7b --num-layers 8 --device cuda --dtype bfloat16

Per variant (``none``, ``pio``): eager decode with a dynamic and with a static cache, then static-cache decode compiled
by ``generate()`` (``CompileConfig`` with ``--backend`` / ``--mode``), its first compiled ``generate`` time, and
whether the compiled greedy tokens equal the eager ones. Decode ms/token: the time between the first and the last
generated token (timestamps taken by a logits processor, so the prefill is excluded) / (N - 1), the median over
``--repeats``. Random weights: timings only, the tokens are meaningless. For a cold first compile, run one
``--method`` per process with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import transformers

import piofvlm
from piofvlm.bench.shapes import build_inputs, build_model, get_shape
from piofvlm.loading import DTYPES
from piofvlm.transformers_compat import compile_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="llava15-7b")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=float, default=0.111)
    parser.add_argument("--layers", default="2")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile mode (None; 'reduce-overhead' = CUDA graphs)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--method", action="append", help="none and/or pio (default: both)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = get_shape(args.preset, num_layers=args.num_layers)
    model = build_model(shape, DTYPES[args.dtype], "sdpa", args.device)
    inputs = build_inputs(model, shape)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    stamps: list[float] = []

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            sync()
            stamps.append(time.perf_counter())
            return scores

    def generate(new_tokens: int, cache: str, config=None) -> tuple[float, torch.Tensor]:
        stamps.clear()
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        kwargs["logits_processor"] = transformers.LogitsProcessorList([Stamp()])
        kwargs["cache_implementation"] = cache
        if config is not None:
            kwargs["compile_config"] = config
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, **kwargs)
        sync()
        return time.perf_counter() - start, out

    def decode_ms(cache: str, config=None) -> float:
        per_token = []
        for _ in range(args.repeats):
            generate(args.new_tokens, cache, config)
            per_token.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000)
        return statistics.median(per_token)

    rows = []
    for name in args.method or ["none", "pio"]:
        fields = {} if name == "none" else {"keep": args.keep, "layers": [int(x) for x in args.layers.split(",")]}
        method = piofvlm.get_method(name, **fields)
        with method(model):
            generate(3, "dynamic")
            generate(3, "static")
            row = {"method": method.to_dict(), "eager_dynamic_ms": decode_ms("dynamic")}
            row["eager_static_ms"] = decode_ms("static")
            _, eager_tokens = generate(args.new_tokens, "static")
            config = compile_config(backend=args.backend, mode=args.mode)
            row["first_compiled_generate_s"], compiled_tokens = generate(args.new_tokens, "static", config)
            row["compiled_equals_eager"] = bool(torch.equal(compiled_tokens, eager_tokens))
            row["compiled_static_ms"] = decode_ms("static", config)
            if name != "none":
                row["kept"] = [len(k) for k in method.last_selection[0].kept]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "preset": args.preset,
        "num_layers": args.num_layers,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "dtype": args.dtype,
        "backend": args.backend,
        "mode": args.mode,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
