"""What a printed timing ran on, chosen sanely: a dtype the device computes natively, a thread count that a shared
machine can give, and one line that says both (device, dtype, threads).

Nothing here imports torch at module import (the command line's ``--help`` stays fast); the functions that need it
import it when called.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass

#: ``/proc/cpuinfo`` flags of x86 CPUs that compute bfloat16 matmuls natively (AVX512-BF16, AMX-BF16). Without them
#: torch emulates bfloat16 on the CPU, about 20x slower than float32 (measured on a 2-core AMD EPYC, issue 27).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: The same for ARM CPUs (``Features`` line): the BF16 extension.
NATIVE_BF16_FEATURES_ARM = ("bf16",)
#: dtype names the command line accepts; ``auto`` picks one with :func:`choose_dtype`.
DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32", "float64")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (x86 ``flags`` or ARM ``Features`` of the first processor); None if unreadable."""
    try:
        with open(path) as handle:
            for line in handle:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def cpu_name(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (``/proc/cpuinfo``), else :func:`platform.processor`, else ``"cpu"``."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_has_native_bf16(flags: Iterable[str] | None) -> bool:
    """Whether a CPU with these feature flags computes bfloat16 natively (False when the flags are unknown)."""
    if flags is None:
        return False
    flags = set(flags)
    return any(flag in flags for flag in (*NATIVE_BF16_FLAGS, *NATIVE_BF16_FEATURES_ARM))


def choose_dtype(requested: str | None, device: str = "cpu", flags: Iterable[str] | None = None) -> tuple[str, str]:
    """``(dtype name, why)``: ``requested`` as given unless it is None or ``"auto"``; then bfloat16 where the device
    computes it natively (a CUDA device that supports it; a CPU with :data:`NATIVE_BF16_FLAGS`), else float32.

    ``flags`` are the CPU's feature flags (default: read from ``/proc/cpuinfo``).
    """
    if requested not in (None, "auto"):
        if requested not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {requested!r}")
        return requested, "as asked"
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU computes bfloat16 natively"
        return "float32", "auto: this GPU has no bfloat16 support"
    if str(device) != "cpu" and not str(device).startswith("cpu:"):
        return "float32", f"auto: float32 on {device}"
    flags = cpu_flags() if flags is None else set(flags)
    if cpu_has_native_bf16(flags):
        return "bfloat16", "auto: the CPU computes bfloat16 natively (avx512_bf16 / amx_bf16)"
    return "float32", (
        "auto: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16 flag), so bfloat16 would be emulated "
        "(~20x slower); --dtype bfloat16 to force it"
    )


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average_1min() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def default_threads(cores: int | None = None, load: float | None = None, env: dict[str, str] | None = None) -> int:
    """A thread count a shared machine can give: ``OMP_NUM_THREADS`` when set, else the cores not already busy
    (cores minus the 1-minute load average, rounded), at least 1.

    Why: torch's default (one thread per core) on cores that other processes keep busy makes every parallel region
    wait for its slowest thread; issue 27 measured 2.3-5.7 s for a prefill with 2 threads on a loaded 2-core machine
    and 77 ms with 1.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    cores = available_cores() if cores is None else cores
    load = load_average_1min() if load is None else load
    if load is None:
        return cores
    return max(1, min(cores, cores - int(load + 0.5)))


@dataclass(frozen=True)
class Threads:
    """The thread count set for torch and how it was chosen."""

    count: int
    how: str


def set_threads(requested: int | None) -> Threads:
    """Set ``torch.set_num_threads``: ``requested``, or :func:`default_threads`; says how it was chosen."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
        return Threads(requested, "--threads")
    count = default_threads()
    torch.set_num_threads(count)
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return Threads(count, "OMP_NUM_THREADS")
    load = load_average_1min()
    busy = "" if load is None else f", 1-min load {load:.1f}"
    return Threads(count, f"default: {available_cores()} cores{busy}; --threads N to choose")


def describe(device: str, dtype: str, threads: int | None = None) -> str:
    """``"cpu (AMD EPYC 7B13), float32, 1 thread"``: what a timing ran on."""
    import torch

    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    elif device.startswith("cpu"):
        name = f"cpu ({cpu_name()})"
    else:
        name = device
    count = torch.get_num_threads() if threads is None else threads
    return f"{name}, {dtype}, {count} CPU thread{'s' if count != 1 else ''}"
