"""Timing helpers shared by the GPU benchmarks (protocol: ../shared/BENCHMARKS.md)."""

import math

import torch
import triton

ROTATE_BYTES = 256 * 2**20
"""Weights rotate over sets of at least this many bytes: far past the 50-60 MB L2."""


def rotation(bytes_per_set: int) -> int:
    """How many weight sets make the working set exceed the L2."""
    return max(2, math.ceil(ROTATE_BYTES / bytes_per_set))


def time_ms(fn, sets: int, graph: bool) -> float:
    """Median time of one call of ``fn(i)``, over calls cycling through ``sets`` weight sets.

    ``graph``: time CUDA-graph replays (how decode runs; removes launch gaps from every side),
    else ``triton.testing.do_bench``.
    """
    def run_all():
        for i in range(sets):
            fn(i)

    run_all()
    torch.cuda.synchronize()
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run_all()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run_all()
        return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median") / sets
    return triton.testing.do_bench(run_all, warmup=25, rep=100, return_mode="median") / sets


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64."""
    return ((y.double() - ref).norm() / ref.norm()).item()


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))
