"""Speed where users feel it (issue 25): the per-token decode tax, the direct bound of the pruned prefill,
throughput of a batch, and PIO's selection cost against FastV's.

``python -m piofvlm.bench.speed --out DIR`` runs every table on the CPU stand-ins and writes ``speed.json`` and
``speed.md`` (``--device cuda`` with the 7B presets in ``benchmarks/gpu.sh``). Every comparison is A/B interleaved in
one process: the variants alternate within each repeat (the order rotates) and the figures are medians, so drift of
a shared machine hits all variants alike. The load average is recorded with every table.

* **Decode tax.** One decode step is one forward of one new token on a KV cache. ``hooked`` decodes the cache a
  method pruned, with the method applied; ``direct`` is the unhooked model decoding a plain cache holding the same
  keys and values (the same length per layer: the reference the per-token cost of the hooks is measured against);
  ``unpruned`` is the unhooked model on the full prompt's cache. Static caches: ``direct`` is the unhooked model on a
  static cache of the same ``max_cache_len`` (a static layer attends over its whole buffer whatever it holds).
* **Direct bound.** The prefill of the unhooked model on the same prompt's kept sequence: the multimodal model up to
  the language model, layers ``0..K-1`` on the full sequence, then the kept slots' hidden states through layers
  ``K..`` directly (positions of the kept tokens, the causal mask, a cache filled as the model fills it), the final
  norm and the LM head at the last position. A method's prefill divided into it is the fraction of the bound reached.
* **Throughput.** ``generate()`` of a batch of N prompts (N new tokens each, greedy), tokens/s, the KV-cache bytes
  read off the returned cache, the peak memory (CUDA ``max_memory_allocated``; CPU: the process's peak RSS above its
  start, which counts allocator caching too) and the largest batch whose KV cache fits a budget.
* **Selection.** The time of ``piofvlm.select`` (profiler range) of PIO and FastV, their ratio, and the ratio of
  their counted selection FLOPs (``harness.counted_selection_flops``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import piofvlm
from piofvlm import transformers_compat
from piofvlm.bench import flops as fl
from piofvlm.bench.measure import PeakMemory, Timer, load_average, profile_labels
from piofvlm.bench.shapes import build_inputs, build_model, get_shape
from piofvlm.loading import DTYPES

logger = logging.getLogger(__name__)


@dataclass
class SpeedConfig:
    """One speed run.

    Attributes:
        preset / num_layers / width: the model stand-in (``width`` narrows the hidden size, keeping the
            preset's MLP ratio and head dimension; None keeps it).
        methods: the methods measured (each at ``keep`` after ``layer``).
        keep: fraction of each image's visual tokens kept (the budget counts visual tokens only).
        layer: the prune point (decoder layer index before which tokens are dropped).
        decode_steps / repeats: single-token decode steps per timed block, timed blocks per variant.
        caches: ``dynamic`` and/or ``static`` for the decode tax.
        prefill_repeats: timed prefills per variant for the direct bound.
        batches / throughput_width / throughput_layers / new_tokens: throughput mode (its own, smaller stand-in).
        kv_budget_gib: the KV-cache budget of the "largest batch that fits" column.
    """

    preset: str = "quick-1024x24"
    num_layers: int | None = 8
    width: int | None = 512
    dtype: str = "float32"
    attn: str = "sdpa"
    device: str = "cpu"
    threads: int | None = 1
    methods: list[str] = field(default_factory=lambda: ["random", "fastv", "pio"])
    keep: float = 0.111
    layer: int = 2
    decode_steps: int = 8
    repeats: int = 5
    caches: list[str] = field(default_factory=lambda: ["dynamic", "static"])
    prefill_preset: str = "next-1024x24"
    prefill_layers: int | None = 4
    prefill_repeats: int = 3
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    throughput_preset: str = "quick-1024x24"
    throughput_width: int | None = 256
    throughput_layers: int | None = 4
    new_tokens: int = 8
    kv_budget_gib: float = 1.0
    parts: list[str] = field(default_factory=lambda: ["decode", "prefill", "throughput", "selection"])
    #: ``compiled`` (not in the default parts: inductor compiles for minutes on a CPU): torch.compile mode and
    #: backend (None: inductor), and the methods compiled besides the unhooked model.
    compile_mode: str | None = None
    compile_backend: str | None = None
    compile_methods: list[str] = field(default_factory=lambda: ["random", "pio"])
    #: ``compiled_prefill`` (issue 25 item 3, not in the default parts): the methods whose prefill is timed eager and
    #: with ``compile_prefill`` (torch.compile options: ``compile_mode`` and ``compile_backend`` above).
    compile_prefill_methods: list[str] = field(default_factory=lambda: ["random", "pio"])
    seed: int = 0


# ----------------------------------------------------------------------------------------------- helpers
def _shape(preset: str, num_layers: int | None, width: int | None) -> Any:
    shape = get_shape(preset, num_layers)
    if width is not None and width != shape.hidden_size:
        head_dim = shape.hidden_size // shape.num_heads
        heads = max(1, width // head_dim)
        ratio = shape.num_heads // shape.num_kv_heads
        shape = shape.replace(
            hidden_size=width,
            intermediate_size=shape.intermediate_size * width // shape.hidden_size,
            num_heads=heads,
            num_kv_heads=max(1, heads // ratio),
            full_layers=shape.full_layers or shape.num_layers,
        )
    return shape


def _method(name: str, config: SpeedConfig) -> Any:
    return piofvlm.get_method(name, keep=config.keep, layers=[config.layer])


def _median_ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


def _interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[Any]]:
    """What each variant returns (seconds, or a pair of seconds): ``warmup`` untimed rounds, then ``repeats`` rounds
    in which every variant runs once, the order rotating each round."""
    names = list(variants)
    times: dict[str, list[Any]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = variants[name]()
            if round_index >= warmup:
                times[name].append(seconds)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- decode tax
def _decode_block(model: nn.Module, cache: Any, prompt_length: int, steps: int, device: torch.device) -> float:
    """Seconds per token of ``steps`` single-token forwards on ``cache`` (the first step untimed)."""
    ids = torch.full((1, 1), 5, dtype=torch.long, device=device)
    mask = torch.ones(1, prompt_length + steps + 1, dtype=torch.long, device=device)
    kw = {transformers_compat.cache_kwarg_name(model): cache, "logits_to_keep": 1}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask[:, : prompt_length + 1], **kw)
        _sync(device)
        begin, begin_cpu = time.perf_counter(), time.thread_time()
        for step in range(1, steps + 1):
            model(input_ids=ids, attention_mask=mask[:, : prompt_length + step + 1], **kw)
        _sync(device)
    return (time.perf_counter() - begin) / steps, (time.thread_time() - begin_cpu) / steps


def _plain_copy(cache: Any, config: Any) -> Any:
    """A plain ``DynamicCache`` holding copies of ``cache``'s per-layer keys and values (no layout, no hooks)."""
    from transformers.cache_utils import DynamicCache

    plain = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        plain.update(layer.keys.clone(), layer.values.clone(), index)
    return plain


def _static_cache(model: nn.Module, max_len: int) -> Any:
    from transformers.cache_utils import StaticCache

    return StaticCache(config=model.config.text_config, max_cache_len=max_len)


def decode_tax(
    model: nn.Module, inputs: dict[str, torch.Tensor], config: SpeedConfig, cache_kind: str
) -> list[dict[str, Any]]:
    """Per method: ms/token hooked, direct (unhooked, same cache lengths) and unpruned, interleaved."""
    device = next(model.parameters()).device
    prompt_length = inputs["input_ids"].shape[1]
    steps = config.decode_steps
    text_config = model.config.text_config

    def prefill(cache: Any = None) -> Any:
        with torch.no_grad():
            extra = {} if cache is None else {transformers_compat.cache_kwarg_name(model): cache}
            out = model(**inputs, use_cache=True, logits_to_keep=1, **extra)
        return transformers_compat.output_cache(out)

    max_len = prompt_length + steps + 2  # static caches: the prompt and the decoded tokens
    rows = []
    for name in config.methods:
        method = _method(name, config)
        variants: dict[str, Callable[[], float]] = {}
        if cache_kind == "dynamic":
            with method(model):
                pruned = prefill()
            lengths = fl.cache_layer_lengths(pruned)
            full = prefill()
            direct = _plain_copy(pruned, text_config)

            def hooked(pruned: Any = pruned, method: Any = method) -> float:
                with method(model):
                    return _decode_block(model, copy.deepcopy(pruned), prompt_length, steps, device)

            variants = {
                "hooked": hooked,
                "direct": lambda direct=direct: _decode_block(
                    model, copy.deepcopy(direct), prompt_length, steps, device
                ),  # fmt: skip
                "unpruned": lambda full=full: _decode_block(model, copy.deepcopy(full), prompt_length, steps, device),
            }
        else:

            def hooked(method: Any = method) -> float:
                with method(model):
                    cache = prefill(_static_cache(model, max_len))
                    return _decode_block(model, cache, prompt_length, steps, device)

            def unpruned() -> float:
                cache = prefill(_static_cache(model, max_len))
                return _decode_block(model, cache, prompt_length, steps, device)

            with method(model):
                lengths = fl.cache_layer_lengths(prefill())
            variants = {"hooked": hooked, "direct": unpruned}
        times = _interleaved(variants, config.repeats)
        row = {
            "method": name,
            "cache": cache_kind,
            "layer_lengths": lengths,
            **{f"{key}_ms": _median_ms([wall for wall, _ in value]) for key, value in times.items()},
            **{f"{key}_cpu_ms": _median_ms([cpu for _, cpu in value]) for key, value in times.items()},
            "raw_s": times,
        }
        row["tax_pct"] = 100.0 * (row["hooked_ms"] / row["direct_ms"] - 1.0)
        row["tax_cpu_pct"] = 100.0 * (row["hooked_cpu_ms"] / row["direct_cpu_ms"] - 1.0)
        # Paired: hooked against direct of the same round (adjacent in time), median over rounds; on a shared
        # machine this follows the load drift better than the ratio of the two medians.
        pairs = list(zip(times["hooked"], times["direct"], strict=True))
        row["tax_paired_pct"] = 100.0 * statistics.median(h[0] / d[0] - 1.0 for h, d in pairs)
        row["tax_paired_cpu_pct"] = 100.0 * statistics.median(h[1] / d[1] - 1.0 for h, d in pairs)
        if "unpruned_ms" in row:
            row["vs_unpruned"] = row["unpruned_ms"] / row["hooked_ms"]
            row["vs_unpruned_cpu"] = row["unpruned_cpu_ms"] / row["hooked_cpu_ms"]
        rows.append(row)
        logger.info("decode %s %s: %s", cache_kind, name, {k: v for k, v in row.items() if k != "raw_s"})
    return rows


# ------------------------------------------------------------------------------------- compiled decoding
class _StepClock:
    """A logits processor that only reads the clock: ``generate()`` calls it once per generated token, after that
    step's forward, so the differences of successive readings are the decode steps (prefill excluded)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def compiled_decode(
    model: nn.Module, inputs: dict[str, torch.Tensor], config: SpeedConfig, mode: str | None
) -> list[dict[str, Any]]:
    """Decode ms/token of ``generate()`` with a static cache, eager and compiled (``torch.compile`` through
    ``generate``'s ``compile_config``; ``mode="reduce-overhead"`` uses CUDA graphs on a GPU), unhooked and under
    each method; whether the compiled tokens equal the eager ones of the same variant."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    new_tokens = config.decode_steps + 2
    rows = []
    for name in ["none", *config.compile_methods]:
        method = None if name == "none" else _method(name, config)
        results: dict[str, Any] = {}
        # Applied once around every round: applying or removing a method resets compiled code (it would recompile).
        with contextlib.nullcontext() if method is None else method(model):
            for compiled in (False, True):
                extra: dict[str, Any] = {"cache_implementation": "static"}
                if compiled:
                    options: dict[str, Any] = {"mode": mode, "fullgraph": False}
                    if config.compile_backend is not None:
                        options["backend"] = config.compile_backend
                    extra["compile_config"] = transformers_compat.compile_config(**options)
                step_times: list[float] = []
                tokens = None
                for round_index in range(1 + config.repeats):  # the first generate compiles (or warms up): untimed
                    clock = _StepClock(device)
                    with torch.no_grad():
                        out = model.generate(
                            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0, logits_processor=LogitsProcessorList([clock]), **extra,
                        )  # fmt: skip
                    tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
                    if round_index > 0:
                        step_times += clock.step_seconds()[1:]  # the first step after the prefill may still compile
                results["compiled" if compiled else "eager"] = (_median_ms(step_times), tokens)
        row = {
            "method": name,
            "mode": mode or "default",
            "backend": config.compile_backend or "inductor",
            "eager_static_ms": results["eager"][0],
            "compiled_static_ms": results["compiled"][0],
            "tokens_equal": results["eager"][1] == results["compiled"][1],
        }
        rows.append(row)
        logger.info("compiled decode %s", row)
    return rows


# ------------------------------------------------------------------------------------------- direct bound
class _Stop(Exception):
    """Raised by a temporary pre-hook to stop the multimodal forward at the language model."""


def _embeds_up_to_language_model(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments the language model receives (vision tower, projector and merge run as usual)."""
    from piofvlm.adapters.registry import get_adapter

    language_model = get_adapter(model).language_model
    captured: dict[str, Any] = {}

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.update(kwargs)
        raise _Stop

    handle = language_model.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(**inputs, use_cache=True, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured


#: Families :func:`direct_prefill` runs (one causal mask, 1-D positions, unpadded batch of one).
DIRECT_FAMILIES = ("llava", "llava_next")


def direct_prefill(model: nn.Module, inputs: dict[str, torch.Tensor], layer: int, kept: torch.Tensor) -> torch.Tensor:
    """The direct bound: the unhooked model's prefill with the sequence cut to the slots ``kept`` (1-D, increasing)
    before decoder layer ``layer``. Returns the last position's logits. The slots are not chosen (any kept set of the
    same size costs the same); positions are the kept tokens' own (``positions="keep"``)."""
    from transformers.cache_utils import DynamicCache

    from piofvlm.adapters.registry import get_adapter

    adapter = get_adapter(model)
    if adapter.model_type not in DIRECT_FAMILIES:
        raise ValueError(
            f"the direct bound is written for the 1-D RoPE presets ({', '.join(DIRECT_FAMILIES)}), not "
            f"{adapter.model_type!r}: use a LLaVA or LLaVA-NeXT preset"
        )
    kwargs = _embeds_up_to_language_model(model, inputs)
    hidden = kwargs["inputs_embeds"]
    length = hidden.shape[1]
    position_ids = torch.arange(length, device=hidden.device)[None]
    cache = DynamicCache(config=model.config.text_config)
    cache_kwarg = transformers_compat.cache_kwarg_name(adapter.layers[0])
    rotary = tuple(adapter.rotary_embeddings(hidden, position_ids, adapter.layer_type(0)))
    for index, decoder_layer in enumerate(adapter.layers):
        if index == layer:
            hidden = hidden[:, kept]
            position_ids = position_ids[:, kept]
            rotary = tuple(t[:, kept] for t in rotary)
        hidden = decoder_layer(
            hidden, attention_mask=None, position_ids=position_ids, use_cache=True, position_embeddings=rotary,
            **{cache_kwarg: cache},
        )  # fmt: skip
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return adapter.lm_head(adapter.final_norm(hidden[:, -1:]))


def direct_bound(model: nn.Module, inputs: dict[str, torch.Tensor], config: SpeedConfig) -> dict[str, Any]:
    """Prefill (TTFT) of the unpruned model, each method, and the direct bound, interleaved; fractions."""
    device = next(model.parameters()).device
    timer = Timer(device)
    methods = {name: _method(name, config) for name in config.methods}
    kept_counts = {}
    for name, method in methods.items():
        with method(model), torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        kept_counts[name] = fl.cache_layer_lengths(transformers_compat.output_cache(out))[config.layer]
    kept_len = kept_counts["random"] if "random" in kept_counts else next(iter(kept_counts.values()))
    length = inputs["input_ids"].shape[1]
    # Text tokens all kept, visual ones cut to the budget: the slots the direct run keeps (any set of this size).
    visual = model.config.image_token_id == inputs["input_ids"][0]
    text_slots = torch.nonzero(~visual).flatten()
    visual_slots = torch.nonzero(visual).flatten()
    kept = torch.sort(torch.cat([text_slots, visual_slots[: kept_len - text_slots.numel()]])).values

    def timed(fn: Callable[[], Any]) -> tuple[float, float]:
        begin_cpu = time.thread_time()
        with torch.no_grad():
            seconds = timer(fn)[0]
        return seconds, time.thread_time() - begin_cpu

    def forward() -> Any:
        return model(**inputs, use_cache=True, logits_to_keep=1)

    def run_method(method: Any) -> tuple[float, float]:
        with method(model):
            return timed(forward)

    variants: dict[str, Callable[[], Any]] = {
        "none": lambda: timed(forward),
        "direct": lambda: timed(lambda: direct_prefill(model, inputs, config.layer, kept)),
    }
    variants.update({name: (lambda m=method: run_method(m)) for name, method in methods.items()})
    times = _interleaved(variants, config.prefill_repeats)
    medians = {name: _median_ms([wall for wall, _ in value]) for name, value in times.items()}
    cpu = {name: _median_ms([c for _, c in value]) for name, value in times.items()}
    rows = []
    for name in ["none", "direct", *methods]:
        row = {"variant": name, "prefill_ms": medians[name], "speedup": medians["none"] / medians[name]}
        row["of_direct_bound"] = medians["direct"] / medians[name]
        row["prefill_cpu_ms"] = cpu[name]
        row["of_direct_bound_cpu"] = cpu["direct"] / cpu[name]
        rows.append(row)
    return {
        "prompt_length": length,
        "kept_length": kept_len,
        "kept_per_method": kept_counts,
        "rows": rows,
        "raw_s": times,
    }


def compiled_prefill_bound(model: nn.Module, inputs: dict[str, torch.Tensor], config: SpeedConfig) -> dict[str, Any]:
    """Prefill of each method eager and with the compiled post-prune prefill (``compile_prefill``: the layers after
    the prune point through ``torch.compile``), against the direct bound (eager), interleaved. The first round
    (untimed) compiles. Also whether the compiled prefill kept the same tokens and its logits' distance to eager."""
    device = next(model.parameters()).device
    timer = Timer(device)
    options: dict[str, Any] = {}
    if config.compile_mode is not None:
        options["mode"] = config.compile_mode
    if config.compile_backend is not None:
        options["backend"] = config.compile_backend
    methods = {name: _method(name, config) for name in config.compile_prefill_methods}
    length = inputs["input_ids"].shape[1]
    with methods[next(iter(methods))](model), torch.no_grad():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    kept_len = fl.cache_layer_lengths(transformers_compat.output_cache(out))[config.layer]
    visual = model.config.image_token_id == inputs["input_ids"][0]
    text_slots, visual_slots = torch.nonzero(~visual).flatten(), torch.nonzero(visual).flatten()
    kept = torch.sort(torch.cat([text_slots, visual_slots[: kept_len - text_slots.numel()]])).values

    def forward() -> Any:
        return model(**inputs, use_cache=True, logits_to_keep=1)

    def timed(fn: Callable[[], Any]) -> tuple[float, float]:
        begin_cpu = time.thread_time()
        with torch.no_grad():
            seconds = timer(fn)[0]
        return seconds, time.thread_time() - begin_cpu

    checks: dict[str, dict[str, Any]] = {}

    def run_method(name: str, compiled: bool) -> tuple[float, float]:
        method = methods[name]
        with method(model, compile_prefill=options if compiled else False):
            result = timed(forward)
            with torch.no_grad():
                logits = forward().logits
            checks.setdefault(name, {})["compiled" if compiled else "eager"] = (
                logits,
                [k.tolist() for k in method.last_selection[0].kept],
            )
        return result

    variants: dict[str, Callable[[], Any]] = {
        "direct": lambda: timed(lambda: direct_prefill(model, inputs, config.layer, kept))
    }
    for name in methods:
        variants[name] = lambda name=name: run_method(name, False)
        variants[f"{name} compiled"] = lambda name=name: run_method(name, True)
    times = _interleaved(variants, config.prefill_repeats)
    medians = {name: _median_ms([wall for wall, _ in value]) for name, value in times.items()}
    cpu = {name: _median_ms([c for _, c in value]) for name, value in times.items()}
    rows = []
    for name in variants:
        row = {"variant": name, "prefill_ms": medians[name], "prefill_cpu_ms": cpu[name]}
        row["of_direct_bound"] = medians["direct"] / medians[name]
        row["of_direct_bound_cpu"] = cpu["direct"] / cpu[name]
        method_name = name.removesuffix(" compiled")
        if name.endswith(" compiled"):
            eager_logits, eager_kept = checks[method_name]["eager"]
            logits, kept_now = checks[method_name]["compiled"]
            row["same_kept"] = kept_now == eager_kept
            row["max_abs_logit_diff"] = float((logits.float() - eager_logits.float()).abs().max())
        rows.append(row)
    return {
        "prompt_length": length,
        "kept_length": kept_len,
        "compile_options": {key: str(value) for key, value in options.items()},
        "rows": rows,
        "raw_s": times,
    }


# ---------------------------------------------------------------------------------------------- throughput
def _batch_inputs(model: nn.Module, shape: Any, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """``batch`` prompts of one length (different images and text ids): no padding needed."""
    items = [build_inputs(model, shape, seed=seed + i) for i in range(batch)]
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


def throughput(config: SpeedConfig) -> dict[str, Any]:
    """tokens/s, KV bytes and peak memory of ``generate()`` on N prompts, with and without each method."""
    from piofvlm.bench.harness import _generate

    dtype = DTYPES[config.dtype]
    shape = _shape(config.throughput_preset, config.throughput_layers, config.throughput_width)
    model = build_model(shape, dtype, config.attn, config.device, seed=config.seed)
    device = next(model.parameters()).device
    timer, memory = Timer(device), PeakMemory(device)
    rows = []
    budget = int(config.kv_budget_gib * 2**30)
    for batch in config.batches:
        inputs = _batch_inputs(model, shape, batch, config.seed)
        for name in ["none", *config.methods]:
            method = None if name == "none" else _method(name, config)

            def generate(method: Any = method, inputs: dict[str, torch.Tensor] = inputs) -> Any:
                with torch.no_grad():
                    if method is None:
                        return _generate(model, inputs, config.new_tokens, return_dict_in_generate=True)
                    with method(model):
                        return _generate(model, inputs, config.new_tokens, return_dict_in_generate=True)

            generate()  # warm-up
            memory.reset()
            seconds, out = timer(generate)
            peak = memory.peak()
            cache = transformers_compat.output_cache(out)
            kv = fl.kv_cache_bytes(cache)
            per_sequence = kv / batch
            rows.append(
                {
                    "batch": batch,
                    "method": name,
                    "seconds": seconds,
                    "tokens_per_s": batch * config.new_tokens / seconds,
                    "kv_bytes": kv,
                    "kv_bytes_per_sequence": per_sequence,
                    "largest_batch_in_budget": int(budget // per_sequence),
                    "peak_bytes": peak["peak_bytes"],
                    "peak_above_start_bytes": peak["peak_bytes"] - peak["start_bytes"],
                }
            )
            logger.info("throughput %s", rows[-1])
    return {"shape": asdict(shape), "memory_kind": memory.kind, "kv_budget_bytes": budget, "rows": rows}


# ----------------------------------------------------------------------------------------------- selection
def selection_cost(model: nn.Module, inputs: dict[str, torch.Tensor], config: SpeedConfig) -> dict[str, Any]:
    """PIO's and FastV's ``piofvlm.select`` time (profiled prefills, alternating) and counted selection FLOPs."""
    from piofvlm.bench.harness import counted_selection_flops

    device = next(model.parameters()).device
    names = [name for name in ("pio", "fastv") if name in config.methods] or ["pio", "fastv"]
    methods = {name: _method(name, config) for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(1 + config.prefill_repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            with methods[name](model), torch.no_grad():
                labels, _ = profile_labels(lambda: model(**inputs, use_cache=True, logits_to_keep=1), device)
            if round_index > 0:
                seconds[name].append(labels.get("select", float("nan")))
    twin_cache: dict[str, Any] = {}
    flop_counts = {name: counted_selection_flops(model, inputs, method, twin_cache) for name, method in
                   methods.items()}  # fmt: skip
    result: dict[str, Any] = {
        "select_ms": {name: _median_ms(value) for name, value in seconds.items()},
        "selection_flops": flop_counts,
        "raw_s": seconds,
    }
    if "pio" in names and "fastv" in names and flop_counts.get("fastv"):
        result["time_ratio"] = result["select_ms"]["pio"] / result["select_ms"]["fastv"]
        result["flop_ratio"] = (flop_counts["pio"] or 0) / flop_counts["fastv"]
    return result


# -------------------------------------------------------------------------------------------------- runner
def run(config: SpeedConfig) -> dict[str, Any]:
    from piofvlm.bench.harness import _environment

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    result: dict[str, Any] = {"config": asdict(config), "environment": _environment(device)}
    result["load_start"] = load_average()
    dtype = DTYPES[config.dtype]
    if "decode" in config.parts or "compiled" in config.parts:
        shape = _shape(config.preset, config.num_layers, config.width)
        model = build_model(shape, dtype, config.attn, config.device, seed=config.seed)
        inputs = build_inputs(model, shape, seed=config.seed)
        result["decode_shape"] = asdict(shape)
        if "decode" in config.parts:
            result["decode"] = []
            for kind in config.caches:
                load = load_average()
                rows = decode_tax(model, inputs, config, kind)
                for row in rows:
                    row["load"] = [load, load_average()]
                result["decode"] += rows
        if "compiled" in config.parts:
            load = load_average()
            result["compiled"] = compiled_decode(model, inputs, config, config.compile_mode)
            result["compiled_load"] = [load, load_average()]
        del model
    if "prefill" in config.parts or "selection" in config.parts or "compiled_prefill" in config.parts:
        shape = _shape(config.prefill_preset, config.prefill_layers, None)
        model = build_model(shape, dtype, config.attn, config.device, seed=config.seed)
        inputs = build_inputs(model, shape, seed=config.seed)
        result["prefill_shape"] = asdict(shape)
        if "prefill" in config.parts:
            load = load_average()
            result["prefill"] = direct_bound(model, inputs, config)
            result["prefill"]["load"] = [load, load_average()]
        if "selection" in config.parts:
            load = load_average()
            result["selection"] = selection_cost(model, inputs, config)
            result["selection"]["load"] = [load, load_average()]
        if "compiled_prefill" in config.parts:
            load = load_average()
            result["compiled_prefill"] = compiled_prefill_bound(model, inputs, config)
            result["compiled_prefill"]["load"] = [load, load_average()]
        del model
    if "throughput" in config.parts:
        load = load_average()
        result["throughput"] = throughput(config)
        result["throughput"]["load"] = [load, load_average()]
    result["load_end"] = load_average()
    return result


#: ``--quick``: every part on the tiny presets, one repeat (a smoke run; the GPU script's dry run uses it).
QUICK: dict[str, Any] = {
    "preset": "tiny",
    "num_layers": None,
    "width": None,
    "prefill_preset": "tiny-next",
    "prefill_layers": None,
    "throughput_preset": "tiny",
    "throughput_width": None,
    "throughput_layers": None,
    "repeats": 1,
    "prefill_repeats": 1,
    "decode_steps": 2,
    "batches": [1, 2],
    "new_tokens": 2,
}


# --------------------------------------------------------------------------------------------------- report
def render(result: dict[str, Any]) -> str:
    """The Markdown tables of a :func:`run` result."""
    env = result["environment"]
    config = result["config"]
    lines = [
        f"# Speed (issue 25): {env.get('device', config['device'])}",
        "",
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, piofvlm {env.get('piofvlm')}, "
        f"commit {env.get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}; dtype {config['dtype']}, "
        f"attn {config['attn']}, threads {config['threads']}; load average {result['load_start']} -> "
        f"{result['load_end']}.",
        "",
    ]
    if "decode" in result:
        shape = result["decode_shape"]
        lines += [
            f"## Decode ms/token ({shape['name']}: {shape['hidden_size']} wide, {shape['num_layers']} layers; "
            f"{config['keep']} kept after layer {config['layer']}; {config['decode_steps']} steps x "
            f"{config['repeats']} interleaved blocks)",
            "",
            "Wall ms/token, and in brackets the thread's CPU ms/token (on a shared CPU with one thread the CPU time",
            "is the figure to compare; the wall time includes what the scheduler gave other processes).",
            "",
            "*tax*: ratio of the medians; *paired*: median over rounds of hooked / direct within a round.",
            "",
            "| cache | method | hooked | direct (same lengths) | tax | paired | unpruned | unpruned / hooked | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["decode"]:
            unpruned = row.get("unpruned_ms")
            versus = "- | -"
            if unpruned is not None:
                versus = (
                    f"{unpruned:.3f} ({row['unpruned_cpu_ms']:.3f}) | {row['vs_unpruned']:.2f}x "
                    f"({row['vs_unpruned_cpu']:.2f}x)"
                )
            lines.append(
                f"| {row['cache']} | {row['method']} | {row['hooked_ms']:.3f} ({row['hooked_cpu_ms']:.3f}) | "
                f"{row['direct_ms']:.3f} ({row['direct_cpu_ms']:.3f}) | {row['tax_pct']:+.1f}% "
                f"({row['tax_cpu_pct']:+.1f}%) | {row['tax_paired_pct']:+.1f}% ({row['tax_paired_cpu_pct']:+.1f}%) | "
                f"{versus} | {row['load'][0][0]}-{row['load'][1][0]} |"
            )
        lines.append("")
    if "compiled" in result:
        load = result["compiled_load"]
        lines += [
            f"## Static-cache decode ms/token, eager and compiled (mode {config['compile_mode'] or 'default'}, "
            f"backend {config['compile_backend'] or 'inductor'}; load {load[0][0]}-{load[1][0]})",
            "",
            "| method | eager, static | compiled, static | compiled tokens == eager |",
            "|---|---|---|---|",
        ]
        for row in result["compiled"]:
            lines.append(
                f"| {row['method']} | {row['eager_static_ms']:.3f} | {row['compiled_static_ms']:.3f} | "
                f"{row['tokens_equal']} |"
            )
        lines.append("")
    if "prefill" in result:
        part, shape = result["prefill"], result["prefill_shape"]
        lines += [
            f"## Prefill against the direct bound ({shape['name']}: {shape['hidden_size']} wide, "
            f"{shape['num_layers']} layers; {part['prompt_length']} -> {part['kept_length']} tokens after layer "
            f"{config['layer']}; load {part['load'][0][0]}-{part['load'][1][0]})",
            "",
            "Wall ms, and in brackets the thread's CPU ms (see the decode table).",
            "",
            "| variant | prefill ms | speedup | fraction of the direct bound |",
            "|---|---|---|---|",
        ]
        for row in part["rows"]:
            lines.append(
                f"| {row['variant']} | {row['prefill_ms']:.1f} ({row['prefill_cpu_ms']:.1f}) | "
                f"{row['speedup']:.2f}x | {100 * row['of_direct_bound']:.1f}% "
                f"({100 * row['of_direct_bound_cpu']:.1f}%) |"
            )
        lines.append("")
    if "compiled_prefill" in result:
        part, shape = result["compiled_prefill"], result["prefill_shape"]
        options = ", ".join(f"{k}={v}" for k, v in part["compile_options"].items()) or "inductor defaults"
        lines += [
            f"## Compiled post-prune prefill ({shape['name']}: {shape['hidden_size']} wide, {shape['num_layers']} "
            f"layers; {part['prompt_length']} -> {part['kept_length']} tokens after layer {config['layer']}; "
            f"compile_prefill: dynamic=False, {options}; load {part['load'][0][0]}-{part['load'][1][0]})",
            "",
            "Wall ms, and in brackets the thread's CPU ms; the direct bound is the eager unhooked model on the kept "
            "sequence.",
            "",
            "| variant | prefill ms | fraction of the direct bound | same kept set as eager | max abs logit diff |",
            "|---|---|---|---|---|",
        ]
        for row in part["rows"]:
            same = {True: "yes", False: "NO"}.get(row.get("same_kept"), "-")
            diff = "-" if "max_abs_logit_diff" not in row else f"{row['max_abs_logit_diff']:.2e}"
            lines.append(
                f"| {row['variant']} | {row['prefill_ms']:.1f} ({row['prefill_cpu_ms']:.1f}) | "
                f"{100 * row['of_direct_bound']:.1f}% ({100 * row['of_direct_bound_cpu']:.1f}%) | {same} | {diff} |"
            )
        lines.append("")
    if "selection" in result:
        part = result["selection"]
        flops = part["selection_flops"]
        lines += [
            f"## Selection: PIO against FastV (load {part['load'][0][0]}-{part['load'][1][0]})",
            "",
            "| method | select ms | selection GFLOP (counted) |",
            "|---|---|---|",
        ]
        for name, ms in part["select_ms"].items():
            count = flops.get(name)
            lines.append(f"| {name} | {ms:.1f} | {'-' if count is None else f'{count / 1e9:.4g}'} |")
        if "time_ratio" in part:
            lines += ["", f"PIO / FastV: time {part['time_ratio']:.2f}x, counted FLOPs {part['flop_ratio']:.2f}x."]
        lines.append("")
    if "throughput" in result:
        part, shape = result["throughput"], result["throughput"]["shape"]
        lines += [
            f"## Throughput ({shape['name']}: {shape['hidden_size']} wide, {shape['num_layers']} layers; "
            f"{config['new_tokens']} new tokens; peak memory: {part['memory_kind']}; KV budget "
            f"{part['kv_budget_bytes'] / 2**30:.2f} GiB; load {part['load'][0][0]}-{part['load'][1][0]})",
            "",
            "| N | method | tokens/s | KV MiB | KV MiB / sequence | largest batch in budget "
            "| peak MiB (above start) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in part["rows"]:
            lines.append(
                f"| {row['batch']} | {row['method']} | {row['tokens_per_s']:.1f} | {row['kv_bytes'] / 2**20:.1f} | "
                f"{row['kv_bytes_per_sequence'] / 2**20:.2f} | {row['largest_batch_in_budget']} | "
                f"{row['peak_bytes'] / 2**20:.0f} ({row['peak_above_start_bytes'] / 2**20:.0f}) |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piofvlm.bench.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder of speed.json and speed.md")
    parser.add_argument("--name", default="speed", help="file name stem")
    parser.add_argument("--config", help="a JSON file of SpeedConfig fields (flags below override it)")
    parser.add_argument("--quick", action="store_true", help="tiny presets, 1 repeat: a smoke run of every part")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument(
        "--parts", help="comma-separated: decode,prefill,throughput,selection,compiled,compiled_prefill"
    )
    parser.add_argument("--methods", help="comma-separated methods (default: random,fastv,pio)")
    parser.add_argument("--caches", help="decode tax: comma-separated dynamic,static")
    parser.add_argument(
        "--repeats", type=int, help="timed blocks per variant of the decode tax and the compiled rounds (default 5)"
    )
    args = parser.parse_args(argv)
    data: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    if args.quick:
        data.update(QUICK)
    if args.device:
        data["device"] = args.device
    if args.parts:
        data["parts"] = args.parts.split(",")
    if args.methods:
        data["methods"] = args.methods.split(",")
    if args.caches:
        data["caches"] = args.caches.split(",")
    if args.repeats is not None:
        data["repeats"] = args.repeats
    config = SpeedConfig(**data)
    logging.basicConfig(level=logging.INFO, format="[speed %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    result = run(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{args.name}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
