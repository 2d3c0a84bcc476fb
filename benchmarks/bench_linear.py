"""fp4 linear layers against cuBLAS bf16, in one run on the GPU (protocol: ../shared/BENCHMARKS.md).

For each (N, K) in shapes.json and each M, times ``F.linear`` in bf16 (cuBLAS) and
``torch.ops.fp4.linear`` for MXFP4/NVFP4 x W4A16/W4A4 (activation quantization included), each
checked against the fp64 reference on the same inputs first. M <= 16 is timed as CUDA-graph
replays, larger M with ``triton.testing.do_bench`` (median); weights rotate over enough sets to
exceed the L2 cache. Prints a markdown table: time, ratio to bf16 (>1 is faster), weight GB/s.

    python benchmarks/bench_linear.py [--m 1,16,128,4096] [--models llama3-8b,...]
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import fp4compile  # noqa: F401  (registers torch.ops.fp4)
from fp4compile.formats import dequantize, quantize

SHAPES = json.loads((Path(__file__).parent / "shapes.json").read_text())["linear"]
VARIANTS = [("mxfp4", "none"), ("nvfp4", "none"), ("mxfp4", "fp4"), ("nvfp4", "fp4")]
ROTATE_BYTES = 256 * 2**20  # well past the 50 MB L2


def time_ms(fn, sets: int, graph: bool) -> float:
    """Median time of one call, over calls that cycle through ``sets`` weight sets."""
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
    return ((y.double() - ref).norm() / ref.norm()).item()


def bench_shape(m: int, n: int, k: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bf16_sets = max(2, math.ceil(ROTATE_BYTES / (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(bf16_sets)]
    graph = m <= 16
    row = {"bf16": time_ms(lambda i: F.linear(x, weights[i]), bf16_sets, graph)}
    for fmt, act_mode in VARIANTS:
        q = quantize(weights[0], fmt, scale_rule="spec")
        sets = max(2, math.ceil(ROTATE_BYTES / (q.packed.numel() + q.scales.numel())))
        qs = [q] + [quantize(weights[i % bf16_sets], fmt) for i in range(1, sets)]
        args = lambda i: (x, qs[i].packed, qs[i].scales, qs[i].global_scale, None, None, fmt, act_mode)  # noqa: E731
        a = dequantize(quantize(x, fmt), torch.float64) if act_mode == "fp4" else x.double()
        error = relative_error(torch.ops.fp4.linear(*args(0)), a @ dequantize(q, torch.float64).T)
        assert error < 1e-2, f"{fmt}/{act_mode} M={m} N={n} K={k}: relative error {error:.2e}"
        row[(fmt, act_mode)] = time_ms(lambda i: torch.ops.fp4.linear(*args(i)), sets, graph)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,16,128,4096")
    parser.add_argument("--models", default=",".join(SHAPES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    names = [f"{f} {'W4A4' if a == 'fp4' else 'W4A16'}" for f, a in VARIANTS]
    print("| model | layer | N x K | M | bf16 us | " + " | ".join(f"{v} us (x bf16)" for v in names) + " |")
    print("|---" * (5 + len(names)) + "|")
    ratios = {m: {v: [] for v in VARIANTS} for m in map(int, args.m.split(","))}
    for m in ratios:
        for model in args.models.split(","):
            for layer, (n, k) in SHAPES[model].items():
                row = bench_shape(m, n, k)
                cells = []
                for v in VARIANTS:
                    ratio = row["bf16"] / row[v]
                    ratios[m][v].append(ratio)
                    gbs = n * k * (0.5 + 1 / (32 if v[0] == "mxfp4" else 16)) / (row[v] * 1e-3) / 1e9
                    cells.append(f"{row[v] * 1e3:.1f} ({ratio:.2f}x, {gbs:.0f} GB/s)")
                print(f"| {model} | {layer} | {n}x{k} | {m} | {row['bf16'] * 1e3:.1f} | " + " | ".join(cells) + " |",
                      flush=True)
    print("\nGeometric mean of the ratio to bf16 (>1: faster)")
    print("| M | " + " | ".join(names) + " |\n|---" * 1 + "|---" * len(names) + "|")
    for m, per in ratios.items():
        means = [math.exp(sum(map(math.log, per[v])) / len(per[v])) for v in VARIANTS]
        print(f"| {m} | " + " | ".join(f"{g:.2f}x" for g in means) + " |")


if __name__ == "__main__":
    main()
