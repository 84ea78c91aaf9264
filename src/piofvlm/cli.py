"""Command line: ``piofvlm run | serve | demo | eval | show | bench | doctor`` (also ``python -m piofvlm``)."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from piofvlm import serve_limits
from piofvlm.runtime import DTYPE_NAMES

if TYPE_CHECKING:  # torch, transformers and PIL load on use: `piofvlm --help` and argument errors stay fast
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

#: The registered methods, for ``--help`` without importing torch (a test checks it equals ``available_methods()``).
METHOD_NAMES = (
    "cdpruner", "chain", "dart", "divprune", "fastv", "none", "pdrop", "pio", "pool", "random", "sparsevlm",
    "visionzip", "vscan",
)  # fmt: skip


def parse_value(text: str) -> Any:
    """``"0.5"`` -> 0.5, ``"64"`` -> 64, ``"1,10,15"`` -> [1, 10, 15], ``"true"`` -> True, any JSON value (a dict
    such as ``'{"method": "visionzip", "keep": 0.333}'`` included) as parsed, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part]
    return text


def parse_keep(text: str) -> Any:
    """``--keep``: a ratio in (0, 1] (``0.111``), a percentage (``11.1%``) or a whole token count (``11``) per stage,
    comma-separated for several stages. A number above 1 with a fraction (``11.1``) is refused: it is neither."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.endswith("%"):
            try:
                percent = float(part[:-1])
            except ValueError:
                percent = float("nan")
            if not 0 < percent <= 100:
                raise ValueError(f"--keep {part}: a percentage must be in (0%, 100%]")
            values.append(round(percent / 100, 10))
            continue
        value = parse_value(part)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"--keep {part!r}: give a ratio (0.111), a percentage (11.1%) or a whole token count (11) per stage"
            )
        if isinstance(value, float) and value > 1:
            raise ValueError(
                f"--keep {part}: a ratio must be in (0, 1]; for {part} percent write {part}% (or "
                f"{value / 100:.4g}); for a token count give a whole number ({int(value)})"
            )
        values.append(value)
    if not values:
        raise ValueError("--keep is empty; give a ratio (0.111), a percentage (11.1%) or a token count (11)")
    return values[0] if len(values) == 1 else values


def describe_kept(kept: int, total: int) -> str:
    """``"11 tokens (4.3%)"``: a count and the share of the visual tokens it is, so neither reads as the other."""
    return f"{kept} token{'s' if kept != 1 else ''} ({100 * kept / max(total, 1):.1f}%)"


def method_from_args(args: argparse.Namespace) -> Any:
    from piofvlm.registry import get_method

    fields: dict[str, Any] = {}
    if args.method == "none":
        given = [flag for flag, value in (("--keep", args.keep), ("--layers", args.layers)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} do not apply to --method none (the unpruned model); drop them")
    else:
        if args.layers is not None:
            fields["layers"] = parse_value(args.layers)
        if args.keep is not None:
            fields["keep"] = parse_keep(args.keep)
    fields.update(_parse_sets(args.set))
    return get_method(args.method, **fields)


def generate_timed(
    model: torch.nn.Module, inputs: dict, method: Any, max_new_tokens: int, repeats: int = 1
) -> dict[str, Any]:
    """Answer, prefill time (one forward of the prompt) and total ``generate`` time, with ``method`` applied.

    One untimed warm-up pass runs first; the times are medians of ``repeats`` wall-clock measurements (a first look,
    not a benchmark: ``piofvlm bench`` measures properly).
    """
    import torch

    prefills, totals = [], []
    with torch.no_grad(), method(model):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)  # the first token's logits, as generate() computes
            prefills.append(time.perf_counter() - start)
        kept = [[len(k) for k in record.kept] for record in method.last_selection]
        for _ in range(repeats):
            start = time.perf_counter()
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            totals.append(time.perf_counter() - start)
    return {
        "output_ids": output[:, inputs["input_ids"].shape[1] :],
        "prefill_s": statistics.median(prefills),
        "total_s": statistics.median(totals),
        "repeats": repeats,
        "kept": kept,
    }


def add_method_arguments(parser: argparse.ArgumentParser, default: str | None = "pio") -> None:
    parser.add_argument("--method", default=default, help=f"one of: {', '.join(METHOD_NAMES)}")
    parser.add_argument(
        "--keep",
        help="visual tokens to keep per stage: a ratio (0.111), a percentage (11.1%%) or a whole token count (11); "
        "comma-separated for several stages (default: the method's, 0.111 for pio)",
    )
    parser.add_argument(
        "--layers", help="prune after this many decoder layers; comma-separated for several stages (default: 2)"
    )
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other field of the method")


def add_timing_arguments(parser: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    parser.add_argument(
        "--dtype",
        default=dtype_default,
        choices=DTYPE_NAMES,
        help="auto: bfloat16 where the device computes it natively (a GPU, a CPU with avx512_bf16 / amx_bf16), "
        "else float32",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: OMP_NUM_THREADS, else the cores not busy by the 1-minute load average)",
    )


def prepare_runtime(args: argparse.Namespace) -> tuple[str, str]:
    """Set the thread count and pick the dtype of ``args``; ``(dtype, the line that says what timings ran on)``."""
    from piofvlm.runtime import choose_dtype, describe, set_threads

    threads = set_threads(getattr(args, "threads", None))
    dtype, why = choose_dtype(getattr(args, "dtype", None), getattr(args, "device", "cpu"))
    notes = threads.how if why == "as asked" else f"{threads.how}; dtype {why}"
    return dtype, f"{describe(getattr(args, 'device', 'cpu'), dtype, threads.count)} ({notes})"


def cmd_run(args: argparse.Namespace) -> int:
    from piofvlm.loading import build_prompt, check_device, load_model, resolve_checkpoint

    method = method_from_args(args)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    check_device(args.device)
    image = read_image(args.image)
    source = resolve_checkpoint(args.model)
    dtype, runs_on = prepare_runtime(args)
    model, processor = load_model(source, dtype=dtype, attn=args.attn, device=args.device)
    inputs = processor(images=[image], text=[build_prompt(processor, args.prompt)], return_tensors="pt").to(
        args.device
    )
    result = generate_timed(model, dict(inputs), method, args.max_new_tokens, repeats=args.repeats)
    answer = processor.batch_decode(result["output_ids"], skip_special_tokens=True)[0].strip()
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    kept = [sum(k) for k in result["kept"]]
    if args.json:
        report = {
            "answer": answer,
            "method": method.to_dict(),
            "visual_tokens": visual,
            "kept_per_stage": kept,
            "prefill_ms": result["prefill_s"] * 1000,
            "generate_ms": result["total_s"] * 1000,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "timed_on": runs_on,
        }
        print(json.dumps(report))
        return 0
    print(f"answer: {answer}")
    print(f"method: {json.dumps(method.to_dict())}")
    stages = " -> ".join(describe_kept(k, visual) for k in kept) or "(no pruning)"
    print(f"visual tokens: {visual} -> {stages}")
    print(
        f"prefill: {result['prefill_s'] * 1000:.1f} ms   generate ({args.max_new_tokens} new tokens max): "
        f"{result['total_s'] * 1000:.1f} ms   (median of {args.repeats} after a warm-up; `piofvlm bench` measures)"
    )
    print(f"timed on: {runs_on}")
    return 0


def read_image(path: str) -> Image.Image:
    """The image file as RGB; ``ValueError`` naming the file if it is not an image PIL can read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
        message = f"--image {path!r} is not an image file PIL can read ({error}); give a PNG or JPEG"
        raise ValueError(message) from error


def cmd_serve(args: argparse.Namespace) -> int:
    from piofvlm.serve import serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        raise ValueError(f"--host {args.host} exposes the server beyond this machine; add --allow-remote to do so")
    from piofvlm.serve_limits import limits_from_args

    limits = limits_from_args(args)
    from piofvlm.loading import resolve_checkpoint

    method = method_from_args(args)
    resolve_checkpoint(args.model)  # the family check, and a hub id that cannot be reached fails here, not in retries
    print(f"piofvlm serve: {args.model} with {json.dumps(method.to_dict())} on http://{args.host}:{args.port}/v1")
    serve(
        args.model,
        method,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        attn=args.attn,
        compile=args.compile,
        compile_backend=args.compile_backend,
        limits=limits,
    )
    return 0


def testbed_available() -> bool:
    try:
        from piofvlm.testbed.model import CHECKPOINT_DIR
    except ImportError:
        return False
    return (Path(CHECKPOINT_DIR) / "model.safetensors").is_file()


def cmd_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.out or tempfile.mkdtemp(prefix="piofvlm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if testbed_available():
        return _demo_testbed(args, workdir)
    from piofvlm.tiny import llava as toy

    model_dir = workdir / "toy-llava"
    # Without the trained testbed checkpoint the demo runs a tiny LLaVA with RANDOM weights: its answers are noise;
    # it shows the mechanics (tokens kept, timings) through the same from_pretrained code path as a real model.
    toy.save_toy_llava(model_dir)
    image_path = workdir / "image.png"
    toy.random_image(0, (28, 28)).save(image_path)
    print("piofvlm demo: tiny LLaVA with RANDOM weights (no trained checkpoint installed); answers are meaningless.")
    print(f"model: {model_dir}\nimage: {image_path}")
    for name, keep in (("none", None), ("pio", "0.111")):
        print(f"\n== method {name}" + (f", keep {keep}" if keep else ""))
        run_args = argparse.Namespace(
            model=str(model_dir),
            image=str(image_path),
            prompt="what is the colour of the circle ?",
            method=name,
            keep=keep,
            layers=None,
            set=None,
            max_new_tokens=args.max_new_tokens,
            dtype="float32",
            attn="sdpa",
            device="cpu",
            threads=args.threads,
            repeats=3,
            json=False,
        )
        cmd_run(run_args)
    return 0


#: Timed runs per method in the demo (medians): one run on a shared CPU is noise.
DEMO_REPEATS = 3


def _demo_testbed(args: argparse.Namespace, workdir: Path) -> int:
    from piofvlm.overlay import overlay_panels
    from piofvlm.registry import get_method
    from piofvlm.testbed import data
    from piofvlm.testbed.model import CHECKPOINT_DIR, load_testbed, prompt

    _, runs_on = prepare_runtime(argparse.Namespace(threads=args.threads, dtype="float32", device="cpu"))
    model, processor = load_testbed()
    sample = data.make_sample("test", args.index)
    image_path = workdir / "image.png"
    sample["image"].save(image_path)
    inputs = dict(processor(images=[sample["image"]], text=[prompt(sample["question"])], return_tensors="pt"))
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"piofvlm demo: the project's testbed VLM ({CHECKPOINT_DIR})")
    status = Path(CHECKPOINT_DIR) / "STATUS"
    if status.is_file():
        print(f"checkpoint status: {status.read_text().strip()}")
    print(f"image: {image_path}\nquestion: {sample['question']}   (expected answer: {sample['answer']})")
    pio = get_method("pio", keep=0.111)
    prefill = {}
    for label, method in (("all tokens", get_method("none")), ("PIO, 11.1% kept after layer 2", pio)):
        result = generate_timed(model, inputs, method, max_new_tokens=args.max_new_tokens, repeats=DEMO_REPEATS)
        answer = processor.batch_decode(result["output_ids"], skip_special_tokens=True)[0].strip()
        kept = [sum(k) for k in result["kept"]]
        stages = " -> ".join(describe_kept(k, num_visual) for k in kept) or "all"
        prefill[label] = result["prefill_s"]
        print(
            f"{label:30s} answer: {answer:6s} visual tokens: {num_visual} -> {stages:18s} "
            f"prefill {result['prefill_s'] * 1000:7.1f} ms   generate {result['total_s'] * 1000:7.1f} ms"
        )
    ratio = prefill["all tokens"] / prefill["PIO, 11.1% kept after layer 2"]
    verdict = "faster than" if ratio > 1.1 else "slower than" if ratio < 0.9 else "about as fast as"
    print(f"timed on: {runs_on}; medians of {DEMO_REPEATS} runs after a warm-up (noisy when the CPU is shared)")
    print(
        f"here PIO's prefill is {verdict} all tokens ({ratio:.2f}x). This model is tiny "
        f"({model.config.text_config.num_hidden_layers} layers, {num_visual} visual tokens), so the time PIO saves is "
        "small next to its selection and the fixed costs; where pruning pays (large models, many visual tokens) and "
        "where it does not: docs/benchmarks.md"
    )
    overlay = overlay_panels(sample["image"], pio.last_selection, num_visual, boxes=data.relevant_boxes(sample))
    overlay_path = workdir / "overlay.png"
    overlay.save(overlay_path)
    print(f"tokens kept by PIO (overlay): {overlay_path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from piofvlm.evaluation import build_entries, evaluate, write_results
    from piofvlm.testbed import data
    from piofvlm.testbed.model import load_testbed

    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    fields = dict(_parse_sets(args.set))
    entries = build_entries(
        args.methods.split(","), _as_list(parse_keep(args.keep)), parse_list(args.layers), fields
    )  # validated before any compute
    model, processor = load_testbed(path=args.model)
    processor.tokenizer.padding_side = "left"  # batches are left-padded; a checkpoint may ship a right-padding one
    samples = data.make_split(args.split, args.num_samples)
    rows = evaluate(model, processor, samples, entries, batch_size=args.batch_size, progress=not args.quiet)
    chance = {task: data.chance_accuracy(task) for task in data.TASKS}
    counts = {task: sum(s["task"] == task for s in samples) for task in data.TASKS}
    chance["all"] = sum(chance[t] * counts[t] for t in data.TASKS) / max(1, len(samples))
    config = {key: value for key, value in vars(args).items() if key != "func"}
    paths = write_results(Path(args.out), config, rows, chance)
    print((Path(args.out) / "results.md").read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    method = method_from_args(args)
    if args.family is not None:
        return _show_tiny(args, method)
    if args.image is not None:
        return _show_checkpoint(args, method)
    if args.prompt is not None:
        raise ValueError("--prompt goes with --image (a testbed sample brings its own question)")
    import torch

    from piofvlm.adapters import get_adapter
    from piofvlm.overlay import draw_overlay, processor_view, save_overlay
    from piofvlm.testbed import data
    from piofvlm.testbed.model import load_testbed, prompt

    model, processor = load_testbed(path=args.model)
    sample = data.make_sample(args.split, args.index)
    inputs = processor(images=[sample["image"]], text=[prompt(sample["question"])], return_tensors="pt")
    picture = processor_view(sample["image"], processor.image_processor)
    get_adapter(model).token_boxes(inputs, [picture.size])  # a family without boxes fails before any compute
    with torch.no_grad(), method(model):
        output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    marks = [data.relevant_boxes(sample)] if picture is sample["image"] else None
    canvas = draw_overlay(
        model, inputs, method.last_selection, [picture], method=method, marks=marks, panel_height=336
    )
    save_overlay(canvas, args.out)
    print(f"question: {sample['question']}  expected: {sample['answer']}  answer: {answer}")
    print(canvas.info["legend"])
    print(f"overlay: {args.out}")
    return 0


def _show_checkpoint(args: argparse.Namespace, method: Any) -> int:
    """``piofvlm show --model DIR --image FILE``: any supported checkpoint on one image."""
    if args.model is None:
        raise ValueError("--image needs --model: a local checkpoint directory of any supported family")
    import torch

    from piofvlm.adapters import get_adapter
    from piofvlm.loading import build_prompt, load_model, resolve_checkpoint
    from piofvlm.overlay import draw_overlay, processor_view, save_overlay

    image = read_image(args.image)
    model, processor = load_model(resolve_checkpoint(args.model))
    question = args.prompt or "Describe the image."
    inputs = dict(processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt"))
    picture = processor_view(image, getattr(processor, "image_processor", None))
    get_adapter(model).token_boxes(inputs, [picture.size])  # a family without boxes fails before any compute
    with torch.no_grad(), method(model):
        model(**inputs)
    canvas = draw_overlay(model, inputs, method.last_selection, [picture], method=method)
    save_overlay(canvas, args.out)
    print(canvas.info["legend"])
    print(f"overlay: {args.out}")
    return 0


def _show_tiny(args: argparse.Namespace, method: Any) -> int:
    """``piofvlm show --family KIND``: the family's tiny random model on its two standard prompts (images, video)."""
    import torch

    from piofvlm.adapters import get_adapter
    from piofvlm.overlay import draw_overlay, save_overlay
    from piofvlm.tiny.cases import TINY_CASES, UNAVAILABLE
    from piofvlm.tiny.pictures import source_sizes, tiny_pictures

    if args.model is not None or args.image is not None:
        raise ValueError("--family draws a tiny random model on its own inputs: drop --model / --image")
    if args.family not in TINY_CASES:
        reason = f" ({UNAVAILABLE[args.family]})" if args.family in UNAVAILABLE else ""
        raise ValueError(
            f"no tiny model of family {args.family!r}{reason}; --family takes one of: {', '.join(sorted(TINY_CASES))}"
        )
    model, inputs = TINY_CASES[args.family]()
    pictures = tiny_pictures(args.family)
    get_adapter(model).token_boxes(inputs, source_sizes(pictures))  # a family without boxes fails before any compute
    with torch.no_grad(), method(model):
        model(**inputs)
    canvas = draw_overlay(model, inputs, method.last_selection, pictures, method=method, note=RANDOM_WEIGHTS_NOTE)
    save_overlay(canvas, args.out)
    print(f"piofvlm show: a tiny {args.family} model with RANDOM weights (its choices are noise; the layout is real)")
    print(canvas.info["legend"])
    print(f"overlay: {args.out}")
    return 0


#: The first line of a ``show --family`` picture: its model is untrained.
RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS: a tiny untrained model; which tokens it keeps is noise, the layout is real"


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def parse_list(text: str) -> list[Any]:
    value = parse_value(text)
    return value if isinstance(value, list) else [value]


def _parse_sets(items: list[str] | None) -> list[tuple[str, Any]]:
    pairs = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        pairs.append((key, parse_value(value)))
    return pairs


#: ``piofvlm bench --quick``: a first look in about a minute on a 2-core CPU in float32 (4 layers of the
#: ``quick-1024x24`` preset unless --preset / --model is given, a 336x336 image for a checkpoint, 1 timed repeat,
#: 2 new tokens, no profiling or FLOP counting).
QUICK_PRESET = "quick-1024x24"
QUICK: dict[str, Any] = {
    "warmup": 1, "repeats": 1, "new_tokens": 2, "profile_repeats": 0, "count_flops": False, "image_size": [336, 336],
}  # fmt: skip
QUICK_LAYERS = 4
#: Methods left out of ``--methods all``: ``chain`` composes two other methods (each is in the list).
NOT_IN_ALL = ("none", "chain")
#: Method fields that the presets' 2-block stand-in vision tower needs (``--set`` overrides them): VScan's default
#: ``local_layer=5`` names a block of a real 24-block CLIP.
PRESET_FIELDS: dict[str, dict[str, Any]] = {"vscan": {"local_layer": 1}}


def _acts_in_llm(name: str) -> bool:
    """Whether ``--layers`` applies to the method: not for input or vision-tower methods (default ``layers=[0]``)."""
    from piofvlm.registry import method_class

    default = method_class(name).__dataclass_fields__["layers"].default_factory()  # type: ignore[misc]
    return default != [0]


def _bench_method_names(repeated: list[str] | None, listed: str | None) -> list[str]:
    """``--method a --method b`` and ``--methods a,b`` (or ``all``: every registered method but ``chain``)."""
    names = list(repeated or [])
    for name in (listed or "").split(","):
        name = name.strip()
        if name == "all":
            names += [m for m in METHOD_NAMES if m not in NOT_IN_ALL]
        elif name:
            names.append(name)
    return list(dict.fromkeys(names))


def _presets_help() -> str:
    from piofvlm.bench.shapes import SHAPES

    lines = ["model presets (--preset; random weights, nothing downloaded):"]
    for name, shape in SHAPES.items():
        lines.append(
            f"  {name:<19} {shape.hidden_size}x{shape.num_layers} ({shape.num_heads}/{shape.num_kv_heads} heads, "
            f"MLP {shape.intermediate_size}): {shape.description}"
        )
    lines.append(f"methods (--methods all = all but {', '.join(NOT_IN_ALL)}): {', '.join(METHOD_NAMES)}")
    lines.append(
        "example (the issue-14 side-by-side): piofvlm bench --preset next-1024x24 --num-layers 8 --methods all "
        "--keep 0.111 --layers 2 --threads 1 --new-tokens 4 --repeats 3"
    )
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from piofvlm.bench import BenchConfig, run_benchmark, write_outputs
    from piofvlm.bench.report import markdown

    if args.render:
        from piofvlm.bench.harness import add_ratios
        from piofvlm.bench.report import plot

        for path in map(Path, args.render):
            result = json.loads(path.read_text())
            add_ratios(result)
            path.write_text(json.dumps(result, indent=1) + "\n")
            path.with_suffix(".md").write_text(markdown(result))
            plot(result, path.with_suffix(".png"))
            print(f"wrote {path.with_suffix('.md')}, {path.with_suffix('.png')}")
        return 0
    if args.device is not None:
        from piofvlm.loading import check_device

        check_device(args.device)
    data: dict[str, Any] = _read_bench_config(args.config) if args.config else {}
    if args.preset or args.model:
        data["preset"], data["model_path"] = args.preset, args.model
    if data.get("model_path"):
        from piofvlm.loading import resolve_checkpoint

        data["model_path"] = str(resolve_checkpoint(data["model_path"]))  # the family check, before any weights
    names = _bench_method_names(args.method, args.methods)
    if names:
        variants = []
        for name in names:
            entry: dict[str, Any] = {"method": name}
            if args.layers is not None and name != "none" and _acts_in_llm(name):
                entry["layers"] = parse_value(args.layers)
            if not args.model:
                entry.update(PRESET_FIELDS.get(name, {}))
            entry.update(_parse_sets(args.set))
            variants.append(entry)
        data["variants"] = variants
    if args.quick:
        data.update(QUICK)
        if not data.get("preset") and not data.get("model_path"):
            data["preset"] = QUICK_PRESET
        if "num_layers" not in data or data["num_layers"] is None or data["num_layers"] > QUICK_LAYERS:
            data["num_layers"] = QUICK_LAYERS
    if args.keep is not None:
        data["keeps"] = _as_list(parse_keep(args.keep))
    overrides = {
        "name": args.name,
        "num_layers": args.num_layers,
        "dtype": args.dtype,
        "attn": args.attn,
        "device": args.device,
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "profile_repeats": args.profile_repeats,
        "threads": args.threads,
    }
    data.update({key: value for key, value in overrides.items() if value is not None})
    if args.no_count_flops:
        data["count_flops"] = False
    config = BenchConfig.from_dict(data)
    result = run_benchmark(config, progress_bar=not args.no_progress)
    paths = write_outputs(result, args.out)
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from piofvlm import doctor
    from piofvlm.tiny.cases import TINY_CASES, UNAVAILABLE

    unavailable = [f"{name} ({UNAVAILABLE[name]})" for name in args.family or () if name in UNAVAILABLE]
    if unavailable:
        raise ValueError(f"no self-test on this installation for {'; '.join(unavailable)}")
    unknown = sorted(set(args.family or ()) - set(TINY_CASES))
    if unknown:
        raise ValueError(f"no self-test for {', '.join(unknown)}; families: {', '.join(TINY_CASES)}")
    from piofvlm.runtime import set_threads

    threads = set_threads(args.threads)  # tiny models: torch's thread per core only waits on busy cores
    print(f"threads: {threads.count} ({threads.how})")
    # The tiny Qwen3.5 self-test calls reference kernels whose "install causal_conv1d" advice is not about this check.
    logging.getLogger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)
    return doctor.run(args.family)


def cmd_families(args: argparse.Namespace) -> int:
    from piofvlm import coverage

    rows = coverage.coverage()
    if args.json:
        print(coverage.render_json(rows))
    else:
        print(coverage.render_markdown(rows) if args.markdown else coverage.render_table(rows))
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose epilog may be a function, called only when the help is printed (it may import)."""

    def __init__(self, *args: Any, epilog_fn: Callable[[], str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self.epilog_fn is not None:
            self.epilog = self.epilog_fn()
        return super().format_help()


class _Help(argparse.RawDescriptionHelpFormatter):
    """Defaults in ``--help`` (``(default: ...)`` where a default is set and the help does not say it), epilogs as
    written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="piofvlm", description=__doc__, formatter_class=_Help)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is pruned (DEBUG)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_Help, **kwargs)

    run = command("run", "answer one question about one image, with a method applied; prints kept tokens and times")
    run.add_argument(
        "--model",
        required=True,
        help="local checkpoint directory (from_pretrained layout) or hub id (HF_HUB_OFFLINE=1: from the local cache)",
    )
    run.add_argument("--image", required=True, help="an image file (PNG, JPEG, ...)")
    run.add_argument("--prompt", required=True, help="the question (the image placeholder is added if missing)")
    add_method_arguments(run)
    run.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens")
    add_timing_arguments(run, dtype_default="float32")
    run.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0")
    run.add_argument("--repeats", type=int, default=1, help="timed runs (medians are printed) after one warm-up")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run.set_defaults(func=cmd_run)

    srv = command("serve", "OpenAI-compatible chat server with a method applied")
    srv.add_argument(
        "--model", required=True, help="local checkpoint directory or hub id (HF_HUB_OFFLINE=1: from the local cache)"
    )
    add_method_arguments(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind")
    srv.add_argument("--port", type=int, default=8000, help="port to bind")
    srv.add_argument("--allow-remote", action="store_true", help="allow a --host other than this machine")
    srv.add_argument("--dtype", default="float32", choices=[d for d in DTYPE_NAMES if d != "auto"], help="weights")
    srv.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    srv.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, auto")
    srv.add_argument("--compile", action="store_true", help="static KV cache + torch.compile for decoding")
    srv.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --compile")
    serve_limits.add_arguments(srv)
    srv.set_defaults(func=cmd_serve)

    bench = command(
        "bench", "efficiency benchmark: latency, overhead, memory, KV, FLOPs per method", epilog_fn=_presets_help
    )
    bench.add_argument("--config", help="JSON experiment file (benchmarks/*.json); flags below override it")
    bench.add_argument("--render", nargs="+", metavar="JSON", help="only rewrite the .md/.png of result files")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--preset", help="model shape preset with random weights (default: proto-1024x24)")
    source.add_argument("--model", help="local checkpoint directory instead of a preset")
    bench.add_argument("--name", help="run label (output file stem; default: bench)")
    bench.add_argument("--method", action="append", help="method to run (repeatable); 'none' is always added")
    bench.add_argument("--methods", help="comma-separated methods, or 'all' (every registered method but chain)")
    bench.add_argument(
        "--quick",
        action="store_true",
        help=f"a first look in about a minute on 2 CPU cores: preset {QUICK_PRESET} (unless --preset / --model), "
        f"{QUICK_LAYERS} layers, {QUICK}",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.add_argument("--no-count-flops", action="store_true", help="skip counting the selection FLOPs")
    bench.add_argument(
        "--keep",
        help="budgets to sweep, comma-separated: ratios (0.111), percentages (11.1%%) or counts (default: 0.111)",
    )
    bench.add_argument("--layers", help="prune points of every in-LLM method, comma-separated (input and "
                       "vision-tower methods keep layers=[0]; default: pio's 2)")  # fmt: skip
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other field of every --method")
    bench.add_argument("--num-layers", type=int, help="cut the preset's depth (CPU runs; default: full depth)")
    bench.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        help="default auto: bfloat16 where the device computes it natively (a GPU, a CPU with avx512_bf16 / "
        "amx_bf16), else float32",
    )
    bench.add_argument("--attn", help="attention implementation (default sdpa; eager, flash_attention_2)")
    bench.add_argument("--device", help="cpu or cuda (default: cpu)")
    bench.add_argument("--new-tokens", type=int, help="tokens generated by the end-to-end run (default: 16)")
    bench.add_argument("--warmup", type=int, help="untimed runs per variant (default: 1)")
    bench.add_argument("--repeats", type=int, help="timed runs per variant (default: 5)")
    bench.add_argument(
        "--profile-repeats", type=int, help="profiled prefills per variant (selection split; default 2)"
    )
    bench.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: OMP_NUM_THREADS, else the cores not busy by the 1-minute load average)",
    )
    bench.add_argument("--out", default="benchmarks/results", help="output folder")
    bench.set_defaults(func=cmd_bench)

    demo = command("demo", "run the embedded default model with and without PIO (no download)")
    demo.add_argument("--out", help="folder for the demo's files (default: a new temporary folder)")
    demo.add_argument("--index", type=int, default=0, help="which test sample of the testbed to show")
    demo.add_argument("--max-new-tokens", type=int, default=4, help="longest answer in tokens")
    demo.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: OMP_NUM_THREADS, else the cores not busy by the 1-minute load average)",
    )
    demo.set_defaults(func=cmd_demo)

    evaluate = command("eval", "accuracy retention of methods x budgets on the testbed")
    evaluate.add_argument("--model", help="testbed checkpoint directory (default: the shipped one)")
    evaluate.add_argument("--methods", default="none,random,pio", help="comma-separated method names")
    evaluate.add_argument(
        "--keep", default="0.111,0.222,0.333", help="budgets, comma-separated (one stage): ratios, percentages, counts"
    )
    evaluate.add_argument("--layers", default="2", help="prune point(s) of every method")
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE", help="a field given to every method")
    evaluate.add_argument("--split", default="test", help="train, val, test or heldout")
    evaluate.add_argument("--num-samples", type=int, default=500, help="samples of the split")
    evaluate.add_argument("--batch-size", type=int, default=16, help="prompts per forward (left-padded)")
    evaluate.add_argument("--out", default="runs/eval", help="folder for results.json, results.md, accuracy.png")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_eval)

    doctor = command(
        "doctor",
        "versions, tested range, device, and a self-test of every supported family (about 20 s on 2 CPU cores)",
    )
    doctor.add_argument("--family", action="append", help="self-test only this config.model_type (repeatable)")
    doctor.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: OMP_NUM_THREADS, else the cores not busy by the 1-minute load average)",
    )
    doctor.set_defaults(func=cmd_doctor)

    families = command("families", "status of each image-text-to-text model type of the installed transformers")
    families_format = families.add_mutually_exclusive_group()
    families_format.add_argument("--json", action="store_true", help="machine-readable output")
    families_format.add_argument("--markdown", action="store_true", help="docs/families.md")
    families.set_defaults(func=cmd_families)

    show = command("show", "PNG of the tokens a method kept, per stage, over the images (any family)")
    show.add_argument("--model", help="testbed checkpoint directory (default: the shipped one); with --image: any")
    show.add_argument("--family", help="instead of the testbed: a tiny random model of this config.model_type")
    show.add_argument("--image", help="an image file for --model (any supported checkpoint) instead of the testbed")
    show.add_argument("--prompt", help="the question with --image (default: 'Describe the image.')")
    show.add_argument("--split", default="test", help="testbed split of the sample shown")
    show.add_argument("--index", type=int, default=0, help="which sample of the split")
    add_method_arguments(show)
    show.add_argument("--out", default="overlay.png", help="PNG to write")
    show.set_defaults(func=cmd_show)
    return parser


#: Loggers of third-party packages whose import-time warnings say nothing to a CLI user (torchao's optional CUDA
#: kernels on a CPU machine, torch pytree deprecations triggered by torchao): silenced on the command line only.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def silence_third_party() -> None:
    """Silence import-time warnings of third-party packages (:data:`QUIET_LOGGERS`, their ``warnings``)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("torchao", "torch.utils._pytree", "torch._dynamo", "bitsandbytes", "optimum"):
        warnings.filterwarnings("ignore", module=module)


def _read_bench_config(path: str) -> dict[str, Any]:
    """The JSON experiment file of ``bench --config``; a ``ValueError`` naming the file if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path} is not a JSON experiment file ({error}); see benchmarks/*.json") from error
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a JSON object (see benchmarks/*.json), not {type(data).__name__}")
    return data


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse values every command would only fail on later (with a traceback): a --model path that does not
    exist, a --port outside 0-65535, --threads below 1."""
    model = getattr(args, "model", None)
    if isinstance(model, str) and (model.startswith((".", "/", "~")) or Path(model).is_absolute()):
        if not Path(model).expanduser().exists():
            raise ValueError(f"--model {model}: no such directory (neither a local checkpoint directory nor a hub id)")
    port = getattr(args, "port", None)
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a port is 0-65535")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: give at least 1 (or leave it out for the default)")


def main(argv: list[str] | None = None) -> int:
    silence_third_party()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    torch = sys.modules.get("torch")  # called in-process (tests, notebooks): give back the caller's thread count
    threads_before = torch.get_num_threads() if torch is not None else None
    try:
        _check_arguments(args)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"piofvlm: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path the user gave that cannot be written or read (a directory, no permission)
        print(f"piofvlm: error: {error}", file=sys.stderr)
        return 2
    finally:
        if threads_before is not None:
            torch.set_num_threads(threads_before)


if __name__ == "__main__":
    sys.exit(main())
