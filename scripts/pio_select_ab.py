"""A/B of PIO's selection (issue 25 item 5, docs/benchmarks.md section 7.5b): the time of ``method.select`` (wall,
and the thread's CPU time with 1 thread) of PIO with this branch's closed form ("new") and with the previous one
restored in the same process ("old": the LM head's two passes, ``x . dL/d(P n)`` recomputed, the norm and rotation
probes run at every call), and FastV's, alternating (rotating order), on the speed benchmark's prefill stand-in
(``next-1024x24``, 4 layers, fp32, 1 thread, 11.1% after layer 2). Also checks that old and new keep the same
tokens.

    PYTHONPATH=src python scripts/pio_select_ab.py [repeats]
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch

import piofvlm
from piofvlm.bench.measure import load_average
from piofvlm.bench.shapes import build_inputs, build_model
from piofvlm.bench.speed import _shape
from piofvlm.methods.pio import proxy_loss


@contextlib.contextmanager
def previous_closed_form():
    """The closed form as on main 1427b0a: every change of this branch undone by patching."""
    saved = (proxy_loss._head_loss, proxy_loss._WeightedRows.apply, proxy_loss.rms_norm_parts)
    apply = proxy_loss._WeightedRows.apply
    parts = proxy_loss.rms_norm_parts

    def two_pass(head, hidden):
        return proxy_loss._self_argmax_loss(proxy_loss._output_head(head)(hidden))

    def probe_every_time(norm, like):
        proxy_loss._NORM_VERDICTS.pop(norm, None)
        return parts(norm, like)

    proxy_loss._head_loss = two_pass
    proxy_loss._WeightedRows.apply = lambda weights, rows, keep=None: apply(weights, rows)
    proxy_loss.rms_norm_parts = probe_every_time
    proxy_loss._is_rotate_half.cache_clear()
    try:
        yield
    finally:
        proxy_loss._head_loss, proxy_loss._WeightedRows.apply, proxy_loss.rms_norm_parts = saved


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.set_num_threads(1)
    shape = _shape("next-1024x24", 4, None)
    model = build_model(shape, torch.float32, "sdpa", "cpu", seed=0)
    inputs = build_inputs(model, shape, seed=0)
    variants = {"pio new": ("pio", False), "pio old": ("pio", True), "fastv": ("fastv", False)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    kept: dict[str, list] = {}
    load = load_average()
    names = list(variants)
    for round_index in range(1 + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            method_name, old = variants[name]
            method = piofvlm.get_method(method_name, keep=0.111, layers=[2])
            seconds: list[tuple[float, float]] = []
            select = method.select

            def timed_select(ctx, select=select, seconds=seconds):  # noqa: ANN001, ANN202 - a method's select
                begin, begin_cpu = time.perf_counter(), time.thread_time()
                result = select(ctx)
                seconds.append((time.perf_counter() - begin, time.thread_time() - begin_cpu))
                return result

            method.select = timed_select
            with previous_closed_form() if old else contextlib.nullcontext(), method(model), torch.no_grad():
                model(**inputs, use_cache=True, logits_to_keep=1)
            kept[name] = [k.tolist() for k in method.last_selection[0].kept]
            if round_index:
                times[name].append(seconds[0])
    print(f"load {load} -> {load_average()}; {repeats} rounds; torch {torch.__version__}")
    medians = {}
    for name, value in times.items():
        wall, cpu = [1000 * w for w, _ in value], [1000 * c for _, c in value]
        medians[name] = statistics.median(wall), statistics.median(cpu)
        print(
            f"{name}: select wall median {medians[name][0]:.1f} ms [{min(wall):.1f}-{max(wall):.1f}], "
            f"thread CPU median {medians[name][1]:.1f} ms [{min(cpu):.1f}-{max(cpu):.1f}]"
        )
    for index, what in enumerate(("wall", "CPU")):
        new, old = (medians[key][index] / medians["fastv"][index] for key in ("pio new", "pio old"))
        print(f"pio/fastv ({what}): new {new:.2f}x, old {old:.2f}x")
    print(f"old and new keep the same tokens: {kept['pio new'] == kept['pio old']}")


if __name__ == "__main__":
    main()
