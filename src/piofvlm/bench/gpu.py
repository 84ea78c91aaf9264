"""The prepared GPU run (``benchmarks/gpu.sh``): attention-implementation parity and the 7B presets, in one command.

Parts, each skipped with a line when the time budget is running out, each caught so one failure does not lose the
others' results:

1. per preset (``llava-next-7b``, ``llava15-7b``; full depth, bf16, random weights): one model, switched between
   ``sdpa``, ``flash_attention_2`` (only when importable) and ``eager``:

   * keep-all parity: logits of a keep-all PIO and a keep-all random prune against the unhooked model under the same
     implementation (the library's invariant: bit-identical), and the unhooked logits across implementations;
   * kept sets of pio, fastv, dart and random at 11.1% after layer 2, compared across implementations (bf16 kernels
     differ in rounding, so a gradient- or attention-based set may differ by a few tokens: reported, not asserted);

   then the benchmark (:func:`piofvlm.bench.harness.run_benchmark`) with none, pio, fastv, dart, random at 11.1%
   after layer 2, sdpa;
2. the same parity in fp32 on ``llava-next-7b`` cut to 4 layers, where the kept sets should be equal;
3. the speed part (issue 25, :data:`SPEED_GPU`): decode ms/token under each method against the unhooked model on a
   cache of the same length (dynamic and static), compiled static decoding with CUDA graphs (``reduce-overhead``), the
   prefill against its direct bound, throughput at N = 1, 8, 32, and PIO's selection time against FastV's.

Outputs in one flat folder (at most 8 files): ``gpu.md`` (every table), ``parity.json``, ``<preset>.json`` and
``<preset>.md`` per benchmark, ``speed.json``. ``--dry-run`` runs every part on tiny presets on the CPU (the fast
test suite does).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from piofvlm.bench.harness import BenchConfig, load, run_benchmark, write_outputs
from piofvlm.bench.report import markdown
from piofvlm.registry import get_method

KEEP = 0.111
LAYERS = [2]
METHODS = ["pio", "fastv", "dart", "random"]
PRESETS = {"llava-next-7b": "tiny-next", "llava15-7b": "tiny"}  # full run -> dry run
#: Seconds a part needs at least to start (estimates on an H200 for a 7B model, with margin).
PART_MIN_S = {"parity": 60.0, "bench": 90.0, "parity-fp32": 45.0, "speed": 150.0}
#: The speed part (issue 25, ``piofvlm.bench.speed``) on the 7B shapes: decode tax on llava15-7b (dynamic and static
#: caches, and compiled static decoding with CUDA graphs), the direct bound on llava-next-7b, throughput at N = 1, 8,
#: 32 on llava15-7b, PIO's selection against FastV's.
SPEED_GPU = {
    "preset": "llava15-7b",
    "num_layers": None,
    "width": None,
    "dtype": "bfloat16",
    "threads": None,
    "decode_steps": 16,
    "repeats": 5,
    "prefill_preset": "llava-next-7b",
    "prefill_layers": None,
    "prefill_repeats": 5,
    "throughput_preset": "llava15-7b",
    "throughput_width": None,
    "throughput_layers": None,
    "new_tokens": 16,
    "kv_budget_gib": 40.0,
    "parts": ["decode", "compiled", "prefill", "selection", "throughput", "compiled_prefill"],
    "compile_mode": "reduce-overhead",
    "compile_methods": ["pio"],  # each compiled variant compiles a 7B decode step (tens of seconds)
    # compiled_prefill: the layers after the prune point compiled per layer with CUDA graphs; random and pio keep the
    # same length, so they share the compiled code.
    "compile_prefill_methods": ["random", "pio"],
}


def say(message: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


def attention_implementations(device: str) -> tuple[list[str], list[str]]:
    """``(run, skipped lines)``: sdpa and eager always; flash_attention_2 when flash_attn imports on CUDA."""
    run, skipped = ["sdpa"], []
    if device != "cuda":
        skipped.append("flash_attention_2: skipped (not a CUDA device)")
    elif importlib.util.find_spec("flash_attn") is None:
        skipped.append("flash_attention_2: skipped (the flash_attn package is not installed)")
    else:
        try:
            import flash_attn  # noqa: F401

            run.append("flash_attention_2")
        except Exception as error:  # noqa: BLE001 - any import failure means: skip it
            skipped.append(f"flash_attention_2: skipped (flash_attn does not import: {error!r})")
    run.append("eager")
    return run, skipped


def _kept(method: Any) -> list[list[int]]:
    return [[int(i) for i in kept.tolist()] for kept in method.last_selection[0].kept]


def parity(model: Any, inputs: dict[str, torch.Tensor], attns: list[str]) -> dict[str, Any]:
    """Keep-all parity per implementation, and kept sets at :data:`KEEP` compared across implementations."""
    out: dict[str, Any] = {"attn": list(attns), "keep_all": {}, "kept": {}, "logits_vs_sdpa": {}}
    reference: torch.Tensor | None = None
    with torch.no_grad():
        for attn in list(attns):
            try:
                model.set_attn_implementation(attn)
                plain = model(**inputs).logits.float()
            except Exception as error:  # noqa: BLE001 - e.g. flash_attention_2 present but unusable
                say(f"parity: {attn} does not run: {error!r}; left out")
                out["attn"].remove(attn)
                out.setdefault("errors", {})[attn] = repr(error)
                model.set_attn_implementation("sdpa")
                continue
            rows = {}
            for name in ("pio", "random"):
                method = get_method(name, layers=LAYERS, keep=1.0)
                with method(model):
                    logits = model(**inputs).logits.float()
                rows[name] = {
                    "identical": bool(torch.equal(logits, plain)),
                    "max_abs_diff": float((logits - plain).abs().max()),
                }
            out["keep_all"][attn] = rows
            if reference is None:
                reference = plain
            else:
                out["logits_vs_sdpa"][attn] = {
                    "max_abs_diff": float((plain - reference).abs().max()),
                    "argmax_last_equal": bool(torch.equal(plain[:, -1].argmax(-1), reference[:, -1].argmax(-1))),
                }
            kept = {}
            for name in METHODS:
                method = get_method(name, layers=LAYERS, keep=KEEP)
                with method(model):
                    model(**inputs, logits_to_keep=1)
                kept[name] = _kept(method)
            out["kept"][attn] = kept
        model.set_attn_implementation("sdpa")
    out["kept_vs_sdpa"] = {}
    for attn in out["attn"][1:]:
        rows = {}
        for name in METHODS:
            a, b = out["kept"]["sdpa"][name], out["kept"][attn][name]
            overlap = [len(set(x) & set(y)) / max(len(x), 1) for x, y in zip(a, b, strict=True)]
            rows[name] = {"equal": a == b, "overlap": min(overlap), "count": len(a[0])}
        out["kept_vs_sdpa"][attn] = rows
    return out


def parity_markdown(title: str, result: dict[str, Any]) -> str:
    lines = [f"### {title}", "", "| attn | keep-all pio == unhooked | keep-all random == unhooked | "
             "unhooked logits vs sdpa (max abs diff, last argmax equal) |", "|---|---|---|---|"]  # fmt: skip
    for attn in result["attn"]:
        rows = result["keep_all"][attn]
        cells = [f"{rows[n]['identical']} (max diff {rows[n]['max_abs_diff']:.3g})" for n in ("pio", "random")]
        versus = result["logits_vs_sdpa"].get(attn)
        vs = "-" if versus is None else f"{versus['max_abs_diff']:.3g}, {versus['argmax_last_equal']}"
        lines.append(f"| {attn} | {cells[0]} | {cells[1]} | {vs} |")
    lines += ["", f"Kept sets at keep={KEEP} after layer {LAYERS[0]}, against sdpa (equal / min overlap):", ""]
    lines += ["| attn | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for attn, rows in result["kept_vs_sdpa"].items():
        cells = [f"{rows[n]['equal']} / {100 * rows[n]['overlap']:.1f}% of {rows[n]['count']}" for n in METHODS]
        lines.append(f"| {attn} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu", help="output folder (gpu.sh passes $OUT when set)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (parts skip after)")
    parser.add_argument("--dry-run", action="store_true", help="every part on tiny presets on the CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        say("no CUDA device visible: nothing to run (use --dry-run for the CPU check)")
        return 2
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes: threads only add contention on a shared CPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    attns, skipped = attention_implementations(device)
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
        "cuda": torch.version.cuda,
        "attn": attns,
        "skipped": skipped,
    }
    say(f"env: {env}")
    for line in skipped:
        say(line)
    report = [f"# GPU run{' (DRY RUN, tiny presets on CPU)' if args.dry_run else ''}", "", f"Environment: `{env}`", ""]
    parities: dict[str, Any] = {"environment": env}
    failures: list[str] = []

    def left() -> float:
        return deadline - time.monotonic()

    def part(name: str, kind: str, fn: Any) -> Any:
        need = 0.0 if args.dry_run else PART_MIN_S[kind]
        if left() < need:
            line = f"{name}: SKIPPED (time budget: {left():.0f} s left, needs about {need:.0f} s)"
            say(line)
            report.extend([line, ""])
            return None
        say(f"{name}: start ({left():.0f} s of budget left)")
        begin = time.monotonic()
        try:
            value = fn()
        except Exception:  # noqa: BLE001 - a failed part is reported and the run goes on
            text = traceback.format_exc()
            say(f"{name}: FAILED\n{text}")
            report.extend([f"{name}: FAILED", "", "```", text[-3000:], "```", ""])
            failures.append(name)
            return None
        say(f"{name}: done in {time.monotonic() - begin:.1f} s")
        return value

    for preset, tiny in PRESETS.items():
        name = tiny if args.dry_run else preset
        config = BenchConfig(
            name=preset,
            preset=name,
            dtype="bfloat16",
            attn="sdpa",
            device=device,
            new_tokens=2 if args.dry_run else args.new_tokens,
            warmup=0 if args.dry_run else 1,
            repeats=1 if args.dry_run else args.repeats,
            profile_repeats=1,
            variants=[{"method": m, "layers": LAYERS} for m in METHODS],
            keeps=[KEEP],
            description=f"benchmarks/gpu.sh: {preset} at full depth, bf16, sdpa, random weights",
        )
        loaded = part(f"{preset}: build", "parity", lambda config=config: load(config))
        if loaded is None:
            continue
        model, inputs, _ = loaded
        result = part(f"{preset}: parity bf16", "parity", lambda m=model, i=inputs: parity(m, i, attns))
        if result is not None:
            parities[f"{preset} bf16"] = result
            report.append(parity_markdown(f"{preset} (bf16, full depth): attention parity", result))
            say(parity_markdown(preset, result))

        def bench(config: BenchConfig = config, loaded: Any = loaded) -> dict[str, Any]:
            bench_deadline = deadline - PART_MIN_S["bench"] / 3  # leave time for profiling and writing
            return run_benchmark(config, deadline=bench_deadline, loaded=loaded)

        bench_result = part(f"{preset}: benchmark", "bench", bench)
        if bench_result is not None:
            write_outputs(bench_result, out, png=False)
            table = markdown(bench_result)
            report.extend([f"### {preset}: benchmark", "", table])
            say(table)
        del model, inputs, loaded
        _free()

    fp32_shape = "tiny-next" if args.dry_run else "llava-next-7b"
    fp32 = BenchConfig(name="fp32", preset=fp32_shape, num_layers=3 if args.dry_run else 4, dtype="float32",
                       device=device)  # fmt: skip

    def fp32_parity() -> dict[str, Any]:
        model, inputs, _ = load(fp32)
        try:
            return parity(model, inputs, attns)
        finally:
            del model
            _free()

    result = part("llava-next-7b: parity fp32, 4 layers", "parity-fp32", fp32_parity)
    if result is not None:
        parities["llava-next-7b fp32 4 layers"] = result
        report.append(parity_markdown("llava-next-7b (fp32, 4 layers): attention parity", result))
        say(parity_markdown("fp32", result))

    def speed_part() -> dict[str, Any]:
        from piofvlm.bench import speed

        settings = dict(SPEED_GPU, device=device)
        if args.dry_run:
            settings.update(speed.QUICK, dtype="float32", threads=1, compile_mode=None, compile_backend="eager")
        return speed.run(speed.SpeedConfig(**settings))

    result = part("speed (issue 25): decode tax, compiled decode, direct bound, throughput", "speed", speed_part)
    if result is not None:
        from piofvlm.bench import speed

        (out / "speed.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        table = speed.render(result)
        report.extend([table, ""])
        say(table)
    (out / "parity.json").write_text(json.dumps(parities, indent=1) + "\n")
    total = time.monotonic() - start
    report.append(f"Total {total:.0f} s; failed parts: {failures or 'none'}.")
    (out / "gpu.md").write_text("\n".join(report) + "\n")
    say(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out} ({total:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
