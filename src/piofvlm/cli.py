"""Command line: ``piofvlm run | serve | demo | eval | show | bench | doctor`` (also ``python -m piofvlm``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from piofvlm.adapters import get_adapter
from piofvlm.loading import DTYPES, build_prompt, check_device, load_model
from piofvlm.overlay import draw_overlay, overlay_panels, processor_view, save_overlay
from piofvlm.registry import available_methods, get_method

logger = logging.getLogger(__name__)


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


def method_from_args(args: argparse.Namespace) -> Any:
    fields: dict[str, Any] = {}
    if args.method == "none":
        given = [flag for flag, value in (("--keep", args.keep), ("--layers", args.layers)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} do not apply to --method none (the unpruned model); drop them")
    else:
        if args.layers is not None:
            fields["layers"] = parse_value(args.layers)
        if args.keep is not None:
            fields["keep"] = parse_value(args.keep)
    fields.update(_parse_sets(args.set))
    return get_method(args.method, **fields)


def generate_timed(model: torch.nn.Module, inputs: dict, method: Any, max_new_tokens: int) -> dict[str, Any]:
    """Answer, prefill time (one forward of the prompt) and total ``generate`` time, with ``method`` applied.

    One untimed warm-up pass runs first; the times are single wall-clock measurements, not a benchmark.
    """
    with torch.no_grad(), method(model):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        model(**inputs, use_cache=True)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        total = time.perf_counter() - start
    kept = [[len(k) for k in record.kept] for record in method.last_selection]
    return {
        "output_ids": output[:, inputs["input_ids"].shape[1] :],
        "prefill_s": prefill,
        "total_s": total,
        "kept": kept,
    }


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="pio", help=f"one of: {', '.join(available_methods())}")
    parser.add_argument("--keep", help="ratio (0.111) or count (64) per stage; comma-separated for several stages")
    parser.add_argument("--layers", help="prune after this many decoder layers; comma-separated for several stages")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other field of the method")


def cmd_run(args: argparse.Namespace) -> int:
    method = method_from_args(args)
    check_device(args.device)
    image = read_image(args.image)
    model, processor = load_model(args.model, dtype=args.dtype, attn=args.attn, device=args.device)
    inputs = processor(images=[image], text=[build_prompt(processor, args.prompt)], return_tensors="pt").to(
        args.device
    )
    result = generate_timed(model, dict(inputs), method, args.max_new_tokens)
    answer = processor.batch_decode(result["output_ids"], skip_special_tokens=True)[0].strip()
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"answer: {answer}")
    print(f"method: {json.dumps(method.to_dict())}")
    stages = " -> ".join(str(sum(k)) for k in result["kept"]) or "(no pruning)"
    print(f"visual tokens: {visual} -> {stages}")
    print(
        f"prefill: {result['prefill_s'] * 1000:.1f} ms   generate ({args.max_new_tokens} new tokens max): "
        f"{result['total_s'] * 1000:.1f} ms"
    )
    return 0


def read_image(path: str) -> Image.Image:
    """The image file as RGB; ``ValueError`` naming the file if it is not an image PIL can read."""
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
    method = method_from_args(args)
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
    from piofvlm import toy

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
        )
        cmd_run(run_args)
    return 0


def _demo_testbed(args: argparse.Namespace, workdir: Path) -> int:
    from piofvlm.testbed import data
    from piofvlm.testbed.model import CHECKPOINT_DIR, load_testbed, prompt

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
    for label, method in (("all tokens", get_method("none")), ("PIO, 11.1% kept after layer 2", pio)):
        result = generate_timed(model, inputs, method, max_new_tokens=args.max_new_tokens)
        answer = processor.batch_decode(result["output_ids"], skip_special_tokens=True)[0].strip()
        stages = " -> ".join(str(sum(k)) for k in result["kept"]) or str(num_visual)
        print(
            f"{label:32s} answer: {answer:8s} visual tokens: {num_visual} -> {stages:6s} "
            f"prefill {result['prefill_s'] * 1000:7.1f} ms   generate {result['total_s'] * 1000:7.1f} ms"
        )
    overlay = overlay_panels(sample["image"], pio.last_selection, num_visual, boxes=data.relevant_boxes(sample))
    overlay_path = workdir / "overlay.png"
    overlay.save(overlay_path)
    print(f"tokens kept by PIO (overlay): {overlay_path}")
    print("times: one measurement after a warm-up, on this machine now; `piofvlm bench` measures properly")
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
        args.methods.split(","), parse_list(args.keep), parse_list(args.layers), fields
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
    image = read_image(args.image)
    model, processor = load_model(args.model)
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
    from piofvlm.toy_cases import TINY_CASES, UNAVAILABLE
    from piofvlm.toy_pictures import source_sizes, tiny_pictures

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
    canvas = draw_overlay(model, inputs, method.last_selection, pictures, method=method)
    save_overlay(canvas, args.out)
    print(f"piofvlm show: a tiny {args.family} model with RANDOM weights (its choices are noise; the layout is real)")
    print(canvas.info["legend"])
    print(f"overlay: {args.out}")
    return 0


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


#: ``piofvlm bench --quick``: a first look in about a minute on a 2-core CPU (4 layers, 1 timed repeat, 2 new tokens).
QUICK: dict[str, Any] = {"warmup": 1, "repeats": 1, "new_tokens": 2, "profile_repeats": 1}
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
            names += [m for m in available_methods() if m not in NOT_IN_ALL]
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
    lines.append(f"methods (--methods all = all but {', '.join(NOT_IN_ALL)}): {', '.join(available_methods())}")
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
        check_device(args.device)
    data: dict[str, Any] = _read_bench_config(args.config) if args.config else {}
    if args.preset or args.model:
        data["preset"], data["model_path"] = args.preset, args.model
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
        if "num_layers" not in data or data["num_layers"] is None or data["num_layers"] > QUICK_LAYERS:
            data["num_layers"] = QUICK_LAYERS
    if args.keep is not None:
        keep = parse_value(args.keep)
        data["keeps"] = keep if isinstance(keep, list) else [keep]
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
    from piofvlm.toy_cases import TINY_CASES, UNAVAILABLE

    unavailable = [f"{name} ({UNAVAILABLE[name]})" for name in args.family or () if name in UNAVAILABLE]
    if unavailable:
        raise ValueError(f"no self-test on this installation for {'; '.join(unavailable)}")
    unknown = sorted(set(args.family or ()) - set(TINY_CASES))
    if unknown:
        raise ValueError(f"no self-test for {', '.join(unknown)}; families: {', '.join(TINY_CASES)}")
    return doctor.run(args.family)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piofvlm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is pruned (DEBUG)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one question about one image, with a method applied")
    run.add_argument("--model", required=True, help="local checkpoint directory (from_pretrained layout)")
    run.add_argument("--image", required=True)
    run.add_argument("--prompt", required=True, help="the question (the image placeholder is added if missing)")
    add_method_arguments(run)
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    run.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    run.add_argument("--device", default="cpu")
    run.set_defaults(func=cmd_run)

    srv = sub.add_parser("serve", help="OpenAI-compatible server (transformers serve) with a method applied")
    srv.add_argument("--model", required=True, help="local checkpoint directory or hub id")
    add_method_arguments(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--allow-remote", action="store_true", help="allow a --host other than this machine")
    srv.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    srv.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    srv.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, auto")
    srv.add_argument("--compile", action="store_true", help="static KV cache + torch.compile for decoding")
    srv.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --compile")
    srv.set_defaults(func=cmd_serve)

    bench = sub.add_parser(
        "bench",
        help="efficiency benchmark: latency, overhead, memory, KV, FLOPs per method",
        epilog=_presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--config", help="JSON experiment file (benchmarks/*.json); flags below override it")
    bench.add_argument("--render", nargs="+", metavar="JSON", help="only rewrite the .md/.png of result files")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--preset", help="model shape preset with random weights (see piofvlm.bench.SHAPES)")
    source.add_argument("--model", help="local checkpoint directory instead of a preset")
    bench.add_argument("--name", help="run label (output file stem)")
    bench.add_argument("--method", action="append", help="method to run (repeatable); 'none' is always added")
    bench.add_argument("--methods", help="comma-separated methods, or 'all' (every registered method but chain)")
    bench.add_argument("--quick", action="store_true", help=f"a first look: {QUICK_LAYERS} layers, {QUICK}")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.add_argument("--no-count-flops", action="store_true", help="skip counting the selection FLOPs")
    bench.add_argument("--keep", help="budgets to sweep, comma-separated (ratios or counts)")
    bench.add_argument("--layers", help="prune points of every in-LLM method, comma-separated (input and "
                       "vision-tower methods keep layers=[0])")  # fmt: skip
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other field of every --method")
    bench.add_argument("--num-layers", type=int, help="cut the preset's depth (CPU runs)")
    bench.add_argument("--dtype", choices=sorted(DTYPES))
    bench.add_argument("--attn", help="attention implementation (sdpa, eager, flash_attention_2)")
    bench.add_argument("--device", help="cpu or cuda")
    bench.add_argument("--new-tokens", type=int, help="tokens generated by the end-to-end run")
    bench.add_argument("--warmup", type=int)
    bench.add_argument("--repeats", type=int)
    bench.add_argument("--profile-repeats", type=int, help="profiled prefills per variant (selection split)")
    bench.add_argument("--threads", type=int, help="torch.set_num_threads")
    bench.add_argument("--out", default="benchmarks/results", help="output folder")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="run the embedded default model with and without PIO (no download)")
    demo.add_argument("--out", help="folder for the demo's files (default: a new temporary folder)")
    demo.add_argument("--index", type=int, default=0, help="which test sample of the testbed to show")
    demo.add_argument("--max-new-tokens", type=int, default=4)
    demo.set_defaults(func=cmd_demo)

    evaluate = sub.add_parser("eval", help="accuracy retention of methods x budgets on the testbed")
    evaluate.add_argument("--model", help="testbed checkpoint directory (default: the shipped one)")
    evaluate.add_argument("--methods", default="none,random,pio", help="comma-separated method names")
    evaluate.add_argument("--keep", default="0.111,0.222,0.333", help="budgets, comma-separated (one stage)")
    evaluate.add_argument("--layers", default="2", help="prune point(s) of every method")
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE", help="a field given to every method")
    evaluate.add_argument("--split", default="test", help="train, val, test or heldout")
    evaluate.add_argument("--num-samples", type=int, default=500)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--out", default="runs/eval", help="folder for results.json, results.md, accuracy.png")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_eval)

    doctor = sub.add_parser(
        "doctor", help="versions, tested range, device, and a self-test of every supported family (a few seconds)"
    )
    doctor.add_argument("--family", action="append", help="self-test only this config.model_type (repeatable)")
    doctor.set_defaults(func=cmd_doctor)

    show = sub.add_parser("show", help="PNG of the tokens a method kept, per stage, over the images (any family)")
    show.add_argument("--model", help="testbed checkpoint directory (default: the shipped one); with --image: any")
    show.add_argument("--family", help="instead of the testbed: a tiny random model of this config.model_type")
    show.add_argument("--image", help="an image file for --model (any supported checkpoint) instead of the testbed")
    show.add_argument("--prompt", help="the question with --image (default: 'Describe the image.')")
    show.add_argument("--split", default="test")
    show.add_argument("--index", type=int, default=0)
    add_method_arguments(show)
    show.add_argument("--out", default="overlay.png")
    show.set_defaults(func=cmd_show)
    return parser


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
            raise ValueError(f"--model {model}: no such directory (give a local checkpoint directory)")
    port = getattr(args, "port", None)
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a port is 0-65535")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: give at least 1 (or leave it out for torch's default)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    transformers_logging.disable_progress_bar()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        _check_arguments(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"piofvlm: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path the user gave that cannot be written or read (a directory, no permission)
        print(f"piofvlm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
