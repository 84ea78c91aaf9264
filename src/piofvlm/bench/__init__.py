"""Efficiency benchmark: latency, selection overhead, memory, KV cache and FLOPs per method and budget.

>>> from piofvlm.bench import BenchConfig, run_benchmark, write_outputs
>>> result = run_benchmark(BenchConfig(preset="tiny", repeats=1))
>>> write_outputs(result, "benchmarks/results")
"""

from piofvlm.bench.harness import BenchConfig, run_benchmark, variant_label, write_outputs
from piofvlm.bench.shapes import SHAPES, ModelShape, available_shapes, get_shape

__all__ = [
    "SHAPES",
    "BenchConfig",
    "ModelShape",
    "available_shapes",
    "get_shape",
    "run_benchmark",
    "variant_label",
    "write_outputs",
]
