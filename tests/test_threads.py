"""Threads: any number of threads calling one model under one applied method each get what they would get alone.

Each job (a prompt batch of some size, forward + kept sets, then greedy ``generate``) is run once sequentially for
the reference; then several threads run all the jobs many times, in different orders, at once, and every result must
equal its reference: the kept visual indices and the generated tokens exactly, the logits to fp32 rounding (the CPU
kernels may split a reduction differently when several threads share the intra-op pool). See ``docs/threads.md``.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import piofvlm
from conftest import make_inputs as llava_inputs
from conftest import model as llava_model
from test_qwen import make_inputs as family_inputs
from test_qwen import model as family_model

#: prompt batches of different sizes and batch sizes (indices of the standard samples)
JOBS = [(0,), (1,), (2,), (0, 1), (1, 2), (0, 1, 2)]


def _setup(kind: str):
    if kind in ("llava", "llava_next"):
        return llava_model(kind), lambda indices: dict(llava_inputs(kind, indices))
    return family_model(kind), lambda indices: dict(family_inputs(kind, indices))


def _method(name: str):
    from test_methods_matrix import build

    return piofvlm.get_method("pio", layers=[1], keep=0.5) if name == "pio" else build(name, 0.5)


def _run(model, method, inputs) -> dict:
    """What one call gives: logits and kept sets of a forward, then the tokens and kept sets of ``generate``."""
    with torch.no_grad():
        logits = model(**inputs).logits
    kept = [[k.tolist() for k in record.kept] for record in method.last_selection]
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    kept_generate = [[k.tolist() for k in record.kept] for record in method.last_selection]
    return {"logits": logits, "kept": kept, "tokens": tokens, "kept_generate": kept_generate}


def _assert_same(got: dict, want: dict, where: str) -> None:
    assert got["kept"] == want["kept"], where
    assert got["kept_generate"] == want["kept_generate"], where
    assert torch.equal(got["tokens"], want["tokens"]), where
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-5, msg=where)


def check_threads(kind: str, method_name: str, threads: int, rounds: int, jobs=JOBS) -> None:
    model, inputs_of = _setup(kind)
    inputs = {job: inputs_of(job) for job in jobs}
    method = _method(method_name)
    with method(model):
        reference = {job: _run(model, method, inputs[job]) for job in jobs}
        assert all(reference[job]["kept"] for job in jobs)  # something was pruned in every job

        def worker(seed: int) -> list[str]:
            order = [job for _ in range(rounds) for job in jobs]
            random.Random(seed).shuffle(order)
            done = []
            for job in order:
                _assert_same(_run(model, method, inputs[job]), reference[job], f"{kind} {method_name} job {job}")
                done.append(threading.current_thread().name)
            return done

        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(worker, range(threads)))
    assert sum(len(r) for r in results) == threads * rounds * len(jobs)
    assert not model._forward_pre_hooks  # the handle left with the block


@pytest.mark.parametrize(
    ("kind", "method_name"),
    [("llava", "pio"), ("llava_next", "fastv"), ("qwen2_5_vl", "visionzip"), ("qwen3_vl", "random")],
)
def test_threads_equal_sequential(kind: str, method_name: str) -> None:
    check_threads(kind, method_name, threads=3, rounds=1, jobs=[(0,), (2,), (0, 1)])


def _long_cases() -> list:
    from test_methods_matrix import REFUSED

    kinds = ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3", "qwen3_5"]
    names = ["pio", "fastv", "divprune", "random", "visionzip", "pool", "dart"]
    return [(kind, name) for kind in kinds for name in names if (name, kind) not in REFUSED]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "method_name"), _long_cases())
def test_threads_equal_sequential_long(kind: str, method_name: str) -> None:
    check_threads(kind, method_name, threads=4, rounds=3)


def _in_thread(fn):
    """Run ``fn`` in a new thread; return what it returned or raise what it raised."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def test_a_static_cache_continued_from_another_thread_is_refused() -> None:
    from transformers import StaticCache

    from piofvlm import transformers_compat

    m, inputs = llava_model("llava"), dict(llava_inputs("llava", (0, 1)))
    name = transformers_compat.cache_kwarg_name(m)
    method = piofvlm.get_method("pio", layers=[1], keep=0.5)

    def step(out):
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids)], 1)
        cache = transformers_compat.output_cache(out)
        return m(input_ids=ids, attention_mask=mask, use_cache=True, **{name: cache})

    with torch.no_grad(), method(m):
        cache = StaticCache(config=m.config, max_cache_len=inputs["input_ids"].shape[1] + 4)
        out = m(**inputs, use_cache=True, **{name: cache})
        with pytest.raises(RuntimeError, match="static KV cache prefilled in thread .* continued in thread"):
            _in_thread(lambda: step(out))
        step(out)  # the thread that prefilled it continues it


def test_one_cache_used_by_two_threads_at_once_is_refused() -> None:
    """Thread A is inside a decode step on a cache (held at its last decoder layer) when thread B continues the
    same cache: B is refused with an error naming the concurrency; A finishes normally."""
    from piofvlm import transformers_compat

    m, inputs = llava_model("llava"), dict(llava_inputs("llava", (0,)))
    name = transformers_compat.cache_kwarg_name(m)
    adapter = piofvlm.adapters.get_adapter(m)
    inside, release = threading.Event(), threading.Event()

    def hold(module, args, output):
        if args[0].shape[1] == 1 and threading.current_thread().name == "holder":
            inside.set()
            assert release.wait(30)

    with torch.no_grad(), piofvlm.get_method("pio", layers=[1], keep=0.5)(m):
        out = m(**inputs, use_cache=True)
        cache = transformers_compat.output_cache(out)
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids)], 1)

        def step():
            return m(input_ids=ids, attention_mask=mask, use_cache=True, **{name: cache})

        hook = adapter.layers[-1].register_forward_hook(hold)
        try:
            holder = threading.Thread(target=step, name="holder")
            holder.start()
            assert inside.wait(30)
            with pytest.raises(RuntimeError, match="in use by another thread"):
                _in_thread(step)
            release.set()
            holder.join(30)
        finally:
            release.set()
            hook.remove()
        assert getattr(cache, "_piofvlm_busy", None) is None  # released after the call, so reusable
