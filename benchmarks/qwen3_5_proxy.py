"""PIO's proxy on Qwen3.5's hybrid stack: cost of each proxy choice at a prune point whose next layer is a Gated
DeltaNet (linear-attention) layer, on the CPU, at a small stand-in shape (random weights, fp32).

Rows (prune point K = 1 of a 3 linear : 1 full stack, so layer 1 is linear and layer 3 the next full-attention one):

* ``next, reference``: the faithful proxy (the layer that will consume the pruned sequence), the layer's own forward
  over the whole sequence, LM head everywhere, then autograd;
* ``next, fast (default)``: the same function; the DeltaNet over the whole sequence, residual + MLP + head at the
  loss positions only (exact: same gradient);
* ``next_attention, fast``: the next full-attention layer instead (layer 3), the attention fast path (queries at the
  loss positions only);
* ``next_attention, reference``: that layer's full forward;

and, for scale, one plain forward (no grad) of a linear and of a full-attention layer over the sequence. FLOPs are
estimated by ``torch.profiler`` (``with_flops``: matrix products and convolutions; elementwise work and SDPA kernels
not counted, so the full-attention rows are lower bounds).

    PYTHONPATH=src python benchmarks/qwen3_5_proxy.py [--tokens 1024] [--repeats 7]

The options run round-robin and the minimum is reported with the median: on a shared machine the minimum is the
least disturbed figure.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

from piofvlm import transformers_compat
from piofvlm.adapters import get_adapter
from piofvlm.core.context import StageContext
from piofvlm.methods.pio.proxy_loss import proxy_gradient

#: Stand-in for a Qwen3.5 text model at 1/8 of the 9B widths (hidden 4096 -> 512, head_dim 256 -> 64 with a quarter
#: rotated, Gated DeltaNet 16 key / 32 value heads of 128 -> 4 / 8 heads of 64), vocabulary 248k -> 16k.
STAND_IN = {
    "vocab_size": 16384,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [3, 3, 2],
        "mrope_interleaved": True,
        "partial_rotary_factor": 0.25,
    },
}


def stand_in_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3_5Config(
        text_config=STAND_IN,
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 512},
    )
    model = Qwen3_5ForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def context(model: torch.nn.Module, tokens: int, layer: int) -> StageContext:
    adapter = get_adapter(model)
    hidden = torch.randn(1, tokens, STAND_IN["hidden_size"])
    positions = torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1)
    valid = torch.ones(1, tokens, dtype=torch.bool)
    groups = torch.full((1, tokens), -1, dtype=torch.long)
    groups[:, 8 : tokens - 32] = 0  # the visual tokens
    source = torch.arange(tokens)[None]
    masks = adapter.prefill_masks(valid, source, hidden.dtype, None, {})  # per layer type
    rotary = tuple(adapter.language_model.rotary_emb(hidden, positions))
    return StageContext(
        stage=0,
        layer=layer,
        hidden_states=hidden,
        valid=valid,
        groups=groups,
        visual_index=torch.where(groups >= 0, groups.cumsum(1) - 1, -1),
        budgets=torch.tensor([[tokens // 8]]),
        attention_mask=masks[adapter.layer_type(layer)],
        position_embeddings=rotary,
        position_ids=positions,
        sample_keys=torch.zeros(1, dtype=torch.long),
        adapter=adapter,
        model=model,
        masks=masks,
        rotary=dict.fromkeys(adapter.layer_types, rotary),
    )


def flops_of(fn) -> int:
    """``torch.profiler``'s FLOP estimate of one call (``FlopCounterMode``'s module tracker cannot follow
    ``autograd.grad`` on a leaf)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as profiler:
        fn()
    return sum(event.flops for event in profiler.key_averages() if event.flops)


def measure(fns: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Wall times (ms) of each function, run round-robin (so a load change on a shared machine hits all alike)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = stand_in_model()
    adapter = get_adapter(model)
    assert not adapter.is_attention_layer(1) and adapter.is_attention_layer(3)
    ctx = context(model, args.tokens, layer=1)
    fns: dict[str, Any] = {}
    for name, index, fast in (
        ("next (layer 1, linear), reference", 1, False),
        ("next (layer 1, linear), fast: default", 1, True),
        ("next_attention (layer 3), reference", 3, False),
        ("next_attention (layer 3), fast", 3, True),
    ):
        fns[name] = lambda index=index, fast=fast: proxy_gradient(ctx, index, fast=fast)
    lm = adapter.language_model
    for name, index in (("plain forward, linear layer", 1), ("plain forward, full-attention layer", 3)):

        def forward(index: int = index) -> None:
            with torch.no_grad():
                lm.layers[index](
                    ctx.hidden_states,
                    position_embeddings=ctx.position_embeddings,
                    attention_mask=ctx.layer_mask(index),
                    **transformers_compat.without_cache(lm.layers[index]),
                )

        fns[name] = forward
    times = measure(fns, args.repeats)
    rows = [
        {
            "proxy": name,
            "ms_min": round(min(times[name]), 1),
            "ms_median": round(sorted(times[name])[len(times[name]) // 2], 1),
            "gflops": round(flops_of(fn) / 1e9, 3),
        }
        for name, fn in fns.items()
    ]
    print(f"tokens={args.tokens} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print("| proxy | ms (min) | ms (median) | GFLOPs |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['proxy']} | {row['ms_min']} | {row['ms_median']} | {row['gflops']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"tokens": args.tokens, "stand_in": STAND_IN, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
