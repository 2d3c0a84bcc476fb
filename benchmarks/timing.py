"""Timing helpers shared by the GPU benchmarks (protocol: ../shared/BENCHMARKS.md)."""

import math
import statistics
from collections.abc import Callable

import torch
import triton

ROTATE_BYTES = 256 * 2**20
"""Weights rotate over sets of at least this many bytes: far past the 50-60 MB L2."""


def rotation(bytes_per_set: int) -> int:
    """How many weight sets make the working set exceed the L2."""
    return max(2, math.ceil(ROTATE_BYTES / bytes_per_set))


def _every_set(fn, sets: int) -> Callable[[], None]:
    """One call of ``fn(i)`` for each weight set i."""
    def run_all():
        for i in range(sets):
            fn(i)

    return run_all


def _captured(fn, sets: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn(i)`` for every weight set, after a warm-up run on a side stream."""
    run_all = _every_set(fn, sets)
    run_all()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_all()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    return graph


def time_ms(fn, sets: int, graph: bool) -> float:
    """Median time of one call of ``fn(i)``, over calls cycling through ``sets`` weight sets.

    ``graph``: time CUDA-graph replays (how decode runs; removes launch gaps from every side),
    else ``triton.testing.do_bench``.
    """
    timed = _captured(fn, sets).replay if graph else _every_set(fn, sets)
    return triton.testing.do_bench(timed, warmup=25, rep=100, return_mode="median") / sets


def time_interleaved_ms(fns: dict[str, Callable[[int], object]], sets: int, rounds: int = 7) -> dict[str, float]:
    """``time_ms`` (graph replays) of several functions, for comparisons closer than run-to-run
    drift: each is captured once, then timed in ``rounds`` short rounds that take the functions in
    turn, starting from a different one each round, and gets the median of its rounds. Drift of
    the GPU's clocks or temperature over a run then falls on all of them alike (timed one after
    the other, two calls of the same kernels differed by up to 4% on the largest shapes). The
    graphs, and so the memory of their outputs, are all held until the last round."""
    graphs = {name: _captured(fn, sets) for name, fn in fns.items()}
    names = list(graphs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        start = round_ % len(names)
        for name in names[start:] + names[:start]:
            samples[name].append(
                triton.testing.do_bench(graphs[name].replay, warmup=10, rep=40, return_mode="median") / sets)
    return {name: statistics.median(times) for name, times in samples.items()}


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64."""
    return ((y.double() - ref).norm() / ref.norm()).item()


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))
