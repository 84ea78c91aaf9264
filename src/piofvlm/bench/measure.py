"""Timers, peak memory and profiler aggregation that behave the same on CPU and CUDA."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Profiler labels put by the library around the parts of a selection (see ``core/prefill.py``,
#: ``methods/pio/__init__.py`` and ``methods/pio/proxy_loss.py``).
SELECTION_LABELS = {
    "select": "piofvlm.select",
    "proxy_forward": "piofvlm.proxy.forward",
    "proxy_backward": "piofvlm.proxy.backward",
    "nms": "piofvlm.nms",
    "rebuild": "piofvlm.rebuild",
}


class Timer:
    """Wall time of a callable: ``perf_counter`` on CPU; CUDA events between two synchronisations on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """Run ``fn`` once; returns ``(seconds, result)``."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0, result
        begin = time.perf_counter()
        result = fn()
        return time.perf_counter() - begin, result


class PeakMemory:
    """Peak memory of a region: CUDA max allocated, or the process's peak RSS on CPU.

    On Linux the RSS high-water mark is reset through ``/proc/self/clear_refs`` so every region gets its own peak;
    where that is not possible the peak is the process's lifetime maximum (``reset_ok`` is then False).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset_ok = True
        self.start = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.reset_ok = False
        self.start = _status_bytes("VmRSS")

    def peak(self) -> dict[str, int]:
        """``{"peak_bytes", "start_bytes"}``: the peak since :meth:`reset` and what was in use at the reset."""
        if self.cuda:
            torch.cuda.synchronize()
            return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "start_bytes": int(self.start)}
        return {"peak_bytes": _status_bytes("VmHWM"), "start_bytes": int(self.start)}

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.cuda else "process_peak_rss"


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def summary(values: list[float]) -> dict[str, float]:
    """Median, min, max and the raw values (seconds)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def profile_labels(fn: Callable[[], Any], device: torch.device, top: int = 12) -> tuple[dict[str, float], list]:
    """Run ``fn`` under ``torch.profiler``: seconds spent in each :data:`SELECTION_LABELS` range, and the top ops.

    CPU: the ranges' wall time. CUDA: the device time attributed to the ranges when the profiler reports it.
    Returns ``(label seconds, top ops by self time)``.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with quiet_stderr(), profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    by_name = {event.key: event for event in events}
    seconds = {}
    for short, label in SELECTION_LABELS.items():
        event = by_name.get(label)
        if event is None:
            continue
        device_us = getattr(event, "device_time_total", 0) if cuda else 0
        seconds[short] = (device_us or event.cpu_time_total) / 1e6
    time_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, time_key, 0), reverse=True)[:top]
    top_ops = [
        {
            "op": e.key,
            "calls": int(e.count),
            "self_ms": getattr(e, time_key, 0) / 1e3,
            "total_ms": e.cpu_time_total / 1e3,
        }
        for e in rows
    ]
    return seconds, top_ops


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block: the profiler's native library (kineto) writes
    ``profiler_start`` / ``profiler_stop`` lines there at every session, whatever ``KINETO_LOG_LEVEL`` says."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real file descriptor 2 (embedded interpreters): leave it alone
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]
