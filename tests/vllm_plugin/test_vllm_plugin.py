"""The vLLM plugin end to end on the shipped testbed, in the vLLM CPU venv (``make test-vllm``; skipped without vLLM).

For each method: vLLM (``LLM.generate``, greedy) answers the test split as piofvlm on transformers does with
``positions="renumber"`` on >= 99% of the samples, with the budget's prompt length; disagreements are reported with
the overlap of the two kept sets (near-ties of float rounding between vLLM's and transformers' kernels). Also: vLLM's
OpenAI server queried with the ``openai`` client, and tensor parallelism 2 (every rank keeps the same tokens).
``PIOFVLM_VLLM_SAMPLES`` (default 200) sets the number of samples; results go to ``PIOFVLM_VLLM_RESULTS`` (a folder,
default a temporary one) as JSON, which ``docs/vllm.md`` quotes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin's tests run in the vLLM venv: make test-vllm")

import torch  # noqa: E402

from piofvlm.integrations.vllm.selection import method_from_config, tokens_per_image  # noqa: E402
from piofvlm.testbed import data  # noqa: E402
from piofvlm.testbed import model as testbed_model  # noqa: E402

pytestmark = pytest.mark.slow

N = int(os.environ.get("PIOFVLM_VLLM_SAMPLES", "200"))
RUNNER = Path(__file__).with_name("runner.py")
METHODS = {
    "none": {"method": "none"},
    "divprune": {"method": "divprune", "keep": 64},
    "pool": {"method": "pool", "keep": 64},
    "random": {"method": "random", "keep": 64},
    "visionzip": {"method": "visionzip", "keep": 64},
    "vscan": {"method": "vscan", "keep": 64, "local_layer": 1, "window": 4},
    "chain": {"method": "chain", "encoder": {"method": "vscan", "keep": 96, "local_layer": 0, "window": 8}},
}
TIMEOUT = 1800


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    folder = os.environ.get("PIOFVLM_VLLM_RESULTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("vllm")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def testbed():
    return testbed_model.load_testbed()


def reference(testbed, spec: dict, samples: list[dict], bos: bool = True, images: list | None = None) -> dict:
    """piofvlm on transformers (``positions="renumber"``): answers, kept sets, pixel checksums, prompt lengths and
    image tokens per sample."""
    model, processor = testbed
    method = method_from_config(spec)
    images = images or [s["image"] for s in samples]
    answers, kept, checksums, lengths, image_tokens, margins, logprobs = [], [], [], [], [], [], []
    for i in range(0, len(samples), 16):
        batch = samples[i : i + 16]
        inputs = processor(
            images=images[i : i + 16],
            text=[testbed_model.prompt(s["question"]) for s in batch],
            return_tensors="pt",
            padding=True,
            add_special_tokens=bos,
        )
        checksums += [float(p.double().sum()) for p in inputs["pixel_values"]]
        lengths += inputs["attention_mask"].sum(1).tolist()
        image_tokens += (inputs["input_ids"] == testbed_model.IMAGE_TOKEN_ID).sum(1).tolist()
        options = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": testbed_model.PAD_ID}
        options |= {"output_scores": True, "return_dict_in_generate": True}
        with torch.no_grad():
            if method is None:
                result = model.generate(**inputs, **options)
            else:
                with method(model):
                    result = model.generate(**inputs, **options)
                kept += [k.tolist() for k in method.last_selection[0].kept]
        top2 = result.scores[0].float().topk(2, dim=-1).values  # the first answer token's logits
        margins += (top2[:, 0] - top2[:, 1]).tolist()
        logprobs += result.scores[0].double().log_softmax(-1).tolist()
        out = result.sequences
        texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers += [testbed_model.first_word(t) for t in texts]
    return {
        "answers": answers,
        "kept": kept,
        "checksums": checksums,
        "prompt_tokens": lengths,
        "image_tokens": image_tokens,
        "margins": margins,  # top-1 minus top-2 logit of the first answer token, on transformers
        "logprobs": logprobs,  # the first answer token's log-softmax over the vocabulary
    }


def run_vllm(
    spec: dict, results_dir: Path, name: str, tp: int = 1, model: Path | None = None, family: str = "llava"
) -> dict:
    out = results_dir / f"vllm-{family}-{name}-tp{tp}.json"
    command = [sys.executable, str(RUNNER), "--spec", json.dumps(spec), "--n", str(N), "--tp", str(tp)]
    command += ["--out", str(out), "--family", family] + (["--model", str(model)] if model else [])
    log = results_dir / f"vllm-{family}-{name}-tp{tp}.log"
    with open(log, "w") as file:
        done = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, f"vLLM run failed ({log}):\n" + "\n".join(log.read_text().splitlines()[-30:])
    return json.loads(out.read_text())


def kept_by_sample(records: list[dict], checksums: list[float], rank: int = 0) -> list[list[int] | None]:
    """vLLM's kept set of each sample, matched by the image's pixel checksum."""
    mine = [r for r in records if r["rank"] == rank]
    found: list[list[int] | None] = []
    for checksum in checksums:
        best = min(mine, key=lambda r: abs(r["pixel_sum"] - checksum), default=None)
        close = best is not None and abs(best["pixel_sum"] - checksum) <= 1e-3 * max(1.0, abs(checksum))
        found.append(best["kept"] if close else None)
    return found


def compare(name: str, spec: dict, got: dict, ref: dict, results_dir: Path, family: str = "llava") -> dict:
    n = len(ref["answers"])
    same = [a == b for a, b in zip(got["answers"], ref["answers"], strict=True)]
    report = {"family": family, "method": name, "spec": spec, "samples": n, "answers_equal": sum(same)}
    report["tp"] = got["tp"]
    if ref["kept"]:
        kept = kept_by_sample(got["kept"], ref["checksums"])
        assert all(k is not None for k in kept), "an image's kept set was not recorded by vLLM"
        overlap = [len(set(a) & set(b)) for a, b in zip(kept, ref["kept"], strict=True)]
        sizes = [len(k) for k in ref["kept"]]
        report["overlap_per_sample"] = overlap
        report["kept_identical"] = sum(o == k for o, k in zip(overlap, sizes, strict=True))
        report["kept_tokens"] = sorted(set(sizes))
        report["disagreements"] = [
            {
                "sample": i,
                "vllm": got["answers"][i],
                "transformers": ref["answers"][i],
                "overlap": f"{overlap[i]}/{sizes[i]}",
                "logit_margin": round(ref["margins"][i], 4),
            }
            for i in range(n)
            if not same[i]
        ]
        different = sorted(f"{o}/{k}" for o, k in zip(overlap, sizes, strict=True) if o < k)
        report["overlaps_when_different"] = different
    if got.get("first_logprobs") and ref.get("logprobs"):
        # |vLLM - transformers| of the first answer token's top-5 log-probabilities, per sample
        diffs = [
            max((abs(lp - ref["logprobs"][i][int(t)]) for t, lp in got["first_logprobs"][i].items()), default=0.0)
            for i in range(n)
        ]
        report["logprob_max_diff"] = max(diffs)
        if ref["kept"]:
            identical = [i for i in range(n) if report["overlap_per_sample"][i] == len(ref["kept"][i])]
            report["logprob_max_diff_same_kept"] = max((diffs[i] for i in identical), default=0.0)
        report["logprob_diffs"] = diffs
    report["seconds"] = got["seconds"]
    (results_dir / f"compare-{family}-{name}-tp{got['tp']}.json").write_text(json.dumps(report, indent=1))
    skip = ("disagreements", "overlap_per_sample", "logprob_diffs")
    print(json.dumps({k: v for k, v in report.items() if k not in skip}))
    return report


@pytest.mark.parametrize("name", list(METHODS))
def test_vllm_answers_equal_piofvlm_on_transformers(name, testbed, results_dir):
    spec = METHODS[name]
    samples = data.make_split("test", N)
    got = run_vllm(spec, results_dir, name)
    ref = reference(testbed, spec, samples)
    # the prompt is shorter by exactly the dropped tokens
    method = method_from_config(spec)
    budget = 256 if method is None else tokens_per_image(method, 256)
    assert got["prompt_tokens"] == [length - 256 + budget for length in ref["prompt_tokens"]]
    report = compare(name, spec, got, ref, results_dir)
    assert report["answers_equal"] >= 0.99 * N, report


# LLaVA-NeXT (anyres): the testbed as a LLaVA-NeXT (tests/vllm_plugin/models.py), its images resized to 7 sizes, so
# images have 528 to 784 tokens; budgets are ratios of each image's count (what a user would configure).
NEXT_METHODS = {
    "none": {"method": "none"},
    "divprune": {"method": "divprune", "keep": 0.25},
    "pool": {"method": "pool", "keep": 0.25},
    "random": {"method": "random", "keep": 0.25},
    "visionzip": {"method": "visionzip", "keep": 0.25},
    "vscan": {"method": "vscan", "keep": 0.25, "local_layer": 1, "window": 4},
    "chain": {"method": "chain", "encoder": {"method": "visionzip", "keep": 128}},
}


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    from vllm_models import save_llava_next

    path = save_llava_next(tmp_path_factory.mktemp("llava_next"))
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, (model, AutoProcessor.from_pretrained(path))


@pytest.mark.parametrize("name", list(NEXT_METHODS))
def test_vllm_llava_next_answers_equal_piofvlm_on_transformers(name, llava_next, results_dir):
    from vllm_models import next_image

    path, pair = llava_next
    spec = NEXT_METHODS[name]
    samples = data.make_split("test", N)
    images = [next_image(s["image"], i) for i, s in enumerate(samples)]
    got = run_vllm(spec, results_dir, name, model=path, family="llava_next")
    ref = reference(pair, spec, samples, images=images)
    method = method_from_config(spec)
    assert len(set(ref["image_tokens"])) >= 5  # anyres: the sizes give different counts
    budgets = [full if method is None else tokens_per_image(method, full) for full in ref["image_tokens"]]
    lengths = zip(ref["prompt_tokens"], ref["image_tokens"], budgets, strict=True)
    expected = [length - full + k for length, full, k in lengths]
    assert got["prompt_tokens"] == expected
    if method is not None:
        assert [len(k) for k in ref["kept"]] == budgets
    report = compare(name, spec, got, ref, results_dir, family="llava_next")
    assert report["answers_equal"] >= 0.99 * N, report


def test_tensor_parallel_2_keeps_the_same_tokens_on_every_rank(testbed, results_dir):
    spec = METHODS["visionzip"]
    samples = data.make_split("test", N)
    got = run_vllm(spec, results_dir, "visionzip", tp=2)
    ref = reference(testbed, spec, samples)
    ranks = [kept_by_sample(got["kept"], ref["checksums"], rank) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    report = compare("visionzip", spec, got, ref, results_dir)
    assert report["answers_equal"] >= 0.99 * N, report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_openai_server_with_the_openai_client(testbed, results_dir):
    """``python -m vllm.entrypoints.openai.api_server --hf-overrides ...``; chat requests with the image as a data
    URL. The chat endpoint adds no BOS and the testbed's template renders none: the reference drops it too."""
    import openai

    from piofvlm.integrations.vllm import hf_overrides
    from piofvlm.testbed.model import CHECKPOINT_DIR

    spec = METHODS["divprune"]
    port = _free_port()
    log = results_dir / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(CHECKPOINT_DIR),
        "--hf-overrides", json.dumps(hf_overrides(str(CHECKPOINT_DIR), **spec)), "--host", "127.0.0.1",
        "--port", str(port), "--max-model-len", "512", "--dtype", "float32", "--enforce-eager",
        "--gpu-memory-utilization", os.environ.get("PIOFVLM_VLLM_MEMORY", "0.04"),
        "--limit-mm-per-prompt", json.dumps({"image": 1}), "--served-model-name", "testbed",
    ]  # fmt: skip
    with open(log, "w") as file:
        server = subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120)
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, "the server exited:\n" + "\n".join(log.read_text().splitlines()[-30:])
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "the server did not start in 600 s"
                time.sleep(2)
        samples = data.make_split("test", N)
        answers = []
        for sample in samples:
            reply = client.chat.completions.create(
                model="testbed",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": _data_url(sample["image"])}},
                            {"type": "text", "text": sample["question"]},
                        ],
                    }
                ],
                max_tokens=2,
                temperature=0,
            )
            answers.append(testbed_model.first_word(reply.choices[0].message.content or ""))
        # a request over the image limit is a client error (4xx), and the server goes on
        image = {"type": "image_url", "image_url": {"url": _data_url(samples[0]["image"])}}
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="testbed", messages=[{"role": "user", "content": [image, image]}], max_tokens=2
            )
        client.models.list()
    finally:
        server.terminate()
        server.wait(timeout=60)
    ref = reference(testbed, spec, samples, bos=False)
    same = sum(a == b for a, b in zip(answers, ref["answers"], strict=True))
    report = {"method": "divprune (OpenAI server, chat)", "samples": N, "answers_equal": same}
    (results_dir / "compare-server.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    assert same >= 0.99 * N, report


# Qwen2.5-VL (M-RoPE): a tiny random Qwen2.5-VL (tests/vllm_plugin/vllm_models.py), the testbed's images resized to 7
# sizes (16 to 49 tokens each). piofvlm's positions="keep": the kept tokens' own grid coordinates. Random weights:
# answers are compared as the 2 generated token ids, disagreements reported with the reference's logit margin.
QWEN_METHODS = {
    "none": {"method": "none"},
    "divprune": {"method": "divprune", "keep": 0.25},
    "pool": {"method": "pool", "keep": 0.25},
    "random": {"method": "random", "keep": 0.25},
}


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    from vllm_models import save_qwen2_5_vl

    path = save_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return path, (model, processor)


def reference_qwen(pair, spec: dict, samples: list[dict], images: list) -> dict:
    """piofvlm on transformers with ``positions="keep"``: generated token ids, kept sets, checksums, lengths."""
    from vllm_models import qwen_prompt

    model, processor = pair
    method = method_from_config(spec, positions="keep")
    tokens, kept, checksums, lengths, image_tokens, margins, logprobs = [], [], [], [], [], [], []
    for i in range(0, len(samples), 16):
        inputs = processor(
            images=images[i : i + 16],
            text=[qwen_prompt(s["question"]) for s in samples[i : i + 16]],
            return_tensors="pt",
            padding=True,
        )
        # vLLM hands the Qwen model unnormalized pixels (it normalizes them on the device): checksum those
        raw = processor.image_processor(images[i : i + 16], do_rescale=False, do_normalize=False, return_tensors="pt")
        patches = raw["image_grid_thw"].prod(-1).tolist()
        checksums += [float(p.double().sum()) for p in raw["pixel_values"].split(patches)]
        lengths += inputs["attention_mask"].sum(1).tolist()
        image_tokens += (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
        options = {"max_new_tokens": 2, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
        with torch.no_grad():
            if method is None:
                result = model.generate(**inputs, **options)
            else:
                with method(model):
                    result = model.generate(**inputs, **options)
                kept += [k.tolist() for k in method.last_selection[0].kept]
        top2 = result.scores[0].float().topk(2, dim=-1).values
        margins += (top2[:, 0] - top2[:, 1]).tolist()
        logprobs += result.scores[0].double().log_softmax(-1).tolist()
        tokens += result.sequences[:, inputs["input_ids"].shape[1] :].tolist()
    return {
        "answers": tokens,
        "kept": kept,
        "checksums": checksums,
        "prompt_tokens": lengths,
        "image_tokens": image_tokens,
        "margins": margins,
        "logprobs": logprobs,
    }


def _check_qwen_family(family: str, name: str, spec: dict, checkpoint, results_dir: Path) -> dict:
    """vLLM with the plugin against piofvlm on transformers (``positions="keep"``) on a tiny random Qwen-VL: prompt
    lengths, >= 99% equal generated token ids, kept sets, first-token log-probabilities where the kept sets agree."""
    from vllm_models import qwen_image

    path, pair = checkpoint
    samples = data.make_split("test", N)
    images = [qwen_image(s["image"], i) for i, s in enumerate(samples)]
    got = run_vllm(spec, results_dir, name, model=path, family=family)
    got["answers"] = got["token_ids"]
    ref = reference_qwen(pair, spec, samples, images)
    method = method_from_config(spec, positions="keep")
    assert len(set(ref["image_tokens"])) >= 5
    budgets = [full if method is None else tokens_per_image(method, full) for full in ref["image_tokens"]]
    lengths = zip(ref["prompt_tokens"], ref["image_tokens"], budgets, strict=True)
    assert got["prompt_tokens"] == [length - full + k for length, full, k in lengths]
    if method is not None:
        assert [len(k) for k in ref["kept"]] == budgets
    report = compare(name, spec, got, ref, results_dir, family=family)
    assert report["answers_equal"] >= 0.99 * N, report
    # A tiny random model's answers hardly depend on the image tokens' positions; its log-probabilities do, a little:
    # with the kept tokens' own M-RoPE positions they are within 6e-7 of transformers' (8 samples, 2026-12-06), with
    # every kept token left at its image's start (the plugin's coordinates not added) 9e-5 to 5e-4 apart.
    assert report.get("logprob_max_diff_same_kept", report["logprob_max_diff"]) < 1e-5, report
    if family == "qwen3_vl":  # images only: the runner's video request was refused with the reason
        assert got["video_error"] and "VLLMValidationError" in got["video_error"], got["video_error"]
        assert "runs Qwen3-VL with images only" in got["video_error"], got["video_error"]
    return report


@pytest.mark.parametrize("name", list(QWEN_METHODS))
def test_vllm_qwen2_5_vl_answers_equal_piofvlm_on_transformers(name, qwen2_5_vl, results_dir):
    _check_qwen_family("qwen2_5_vl", name, QWEN_METHODS[name], qwen2_5_vl, results_dir)


# Qwen3-VL: as Qwen2.5-VL, plus deepstack (the vision tower's features of blocks 0 and 1 added to the kept tokens after
# decoder layers 0 and 1: each kept token's own, as piofvlm does on transformers). Images only.
QWEN3_METHODS = {
    **QWEN_METHODS,
    "chain": {"method": "chain", "encoder": {"method": "divprune", "keep": 0.5}},
}


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
    from vllm_models import save_qwen3_vl

    path = save_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"))
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return path, (model, processor)


@pytest.mark.parametrize("name", list(QWEN3_METHODS))
def test_vllm_qwen3_vl_answers_equal_piofvlm_on_transformers(name, qwen3_vl, results_dir):
    _check_qwen_family("qwen3_vl", name, QWEN3_METHODS[name], qwen3_vl, results_dir)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_gpu_position_route_equals_the_cpu_route(family):
    """vLLM's GPU model runner rewrites the positions through the model's ``recompute_mrope_positions`` (not run on
    this CPU build); the plugin's override of it must give what its CPU route gives (the shorter prompt's positions +
    each kept token's coordinate at its slot), also when chunked prefill splits an image."""
    from types import SimpleNamespace

    from piofvlm.integrations.vllm.qwen3_vl import PiofvlmQwen3VLForConditionalGeneration
    from piofvlm.integrations.vllm.qwen_vl import PiofvlmQwen2_5_VLForConditionalGeneration
    from piofvlm.integrations.vllm.selection import kept_mrope_channels, shorter_prompt_mrope_positions

    Model = {  # noqa: N806
        "qwen2_5_vl": PiofvlmQwen2_5_VLForConditionalGeneration,
        "qwen3_vl": PiofvlmQwen3VLForConditionalGeneration,
    }[family]
    from piofvlm.tiny import qwen

    config = SimpleNamespace(
        vision_start_token_id=qwen.VISION_START_ID,
        image_token_id=qwen.IMAGE_TOKEN_ID,
        video_token_id=qwen.VIDEO_TOKEN_ID,
    )
    width = 8
    fake = SimpleNamespace(piofvlm_method=object(), config=config, _embedding_width=lambda: width)
    grids = [(1, 8, 6), (1, 4, 10)]
    kept = [torch.tensor([1, 4, 5, 11]), torch.tensor([0, 3, 7])]
    ids, items = [20, 21, qwen.VISION_START_ID], []
    for i, (grid, index) in enumerate(zip(grids, kept, strict=True)):
        items.append((len(ids), len(index), grid[0], grid[1] // 2, grid[2] // 2, 1.0))
        ids += [qwen.IMAGE_TOKEN_ID] * len(index) + [qwen.VISION_END_ID, 22, 23]
        ids += [qwen.VISION_START_ID] if i == 0 else [24]
    before, delta_before = shorter_prompt_mrope_positions(len(ids), items)
    channels = [kept_mrope_channels(grid, 2, index) for grid, index in zip(grids, kept, strict=True)]
    expected = before.clone()
    for (offset, k, *_), channel in zip(items, channels, strict=True):
        expected[:, offset : offset + k] += channel[:, :3].T
    embeddings = [torch.cat([torch.randn(len(c), width), c.float()], dim=1) for c in channels]
    out, positions, delta = Model.recompute_mrope_positions(fake, ids, embeddings, before.clone(), 0)
    assert torch.equal(positions, expected)
    assert delta == delta_before
    assert [tuple(e.shape) for e in out] == [(len(c), width) for c in channels]
    # chunked prefill: the first chunk ends inside image 0 (2 of its 4 kept tokens), the second takes the rest
    first = items[0][0] + 2
    positions = before.clone()
    _, positions, _ = Model.recompute_mrope_positions(fake, ids, [embeddings[0][:2]], positions, 0)
    _, positions, delta = Model.recompute_mrope_positions(
        fake, ids, [embeddings[0][2:], embeddings[1]], positions, first
    )
    assert torch.equal(positions, expected)
    assert delta == delta_before
