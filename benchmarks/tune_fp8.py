"""The MXFP4 -> e4m3 path's two choices, measured on the GPU (issue 7; results in RESULTS.md).

``conversions``: launch variants of the activation and weight conversions (``kernels/triton/fp8.py``)
at M=4096, each checked bit for bit against the current one and timed in CUDA-graph replays over
inputs rotated past the L2, as a multiple of the device copy's time for the bytes it moves.

``accumulation``: ``torch._scaled_mm`` with fp32 against fast (``use_fast_accum=True``)
accumulation, on zero-mean and positive-mean data: relative L2 against the fp64 product of the same
e4m3 operands (so only the accumulation differs) and time, for each K of ``shapes.json``.

    python benchmarks/tune_fp8.py conversions|accumulation
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

import fp4compile  # noqa: F401
from bench_moe import copy_bandwidth
from fp4compile.formats import quantize
from fp4compile.kernels.triton import fp8
from timing import relative_error, rotation, time_ms

SHAPES = json.loads((Path(__file__).parent / "shapes.json").read_text())["linear"]
M = 4096
ROW_CANDIDATES = [(1024, 1), (1024, 4), (2048, 2), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16),
                  (16384, 16), (16384, 32)]  # (BLOCK_K, num_warps)
WEIGHT_CANDIDATES = [(16, 512, 4), (8, 1024, 4), (4, 1024, 4), (2, 1024, 2), (4, 2048, 4), (8, 2048, 8),
                     (16, 1024, 8)]  # (BLOCK_R, BLOCK_K, num_warps)


def sweep(name: str, launch: str, candidates: list[tuple], convert: Callable[[int], tuple], sets: int,
          moved_bytes: int, bandwidth: float) -> None:
    """Time ``convert(i)`` with ``fp8.<launch>`` replaced by each candidate; print time / copy time."""
    chosen = getattr(fp8, launch)
    reference = convert(0)
    cells = []
    try:
        for candidate in [None, *candidates]:
            setattr(fp8, launch, chosen if candidate is None else (lambda k, c=candidate: c))
            got = convert(0)
            same = all(torch.equal(g, r) for g, r in zip(got, reference))
            ratio = time_ms(convert, sets, graph=True) * 1e-3 * bandwidth / moved_bytes
            cells.append(f"{'chosen' if candidate is None else candidate}={ratio:.2f}{'' if same else ' (DIFFERS)'}")
    finally:
        setattr(fp8, launch, chosen)
    print(f"{name}: " + " ".join(cells), flush=True)


def conversions() -> None:
    bandwidth = copy_bandwidth()
    print(f"device copy {bandwidth / 1e12:.2f} TB/s; each cell: time / copy time of the bytes moved", flush=True)
    for k in [768, 2048, 2880, 4096, 5120, 7168, 8192, 14336, 25600, 28672]:
        rows = 4 * M if k < 4096 else M  # the MoE's narrow rows come many per token
        xs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        sweep(f"activation {rows}x{k}", "_row_launch", ROW_CANDIDATES, lambda i: fp8.mxfp4_activation_to_fp8(xs[i]),
              len(xs), rows * k * 3, bandwidth)
        del xs
    for model, layers in SHAPES.items():
        for layer, (n, k) in layers.items():
            per_set = n * k // 2 + n * k // 32
            ws = [quantize(torch.randn(n, k, device="cuda"), "mxfp4") for _ in range(min(4, rotation(per_set)))]
            sweep(f"weight {model} {layer} {n}x{k}", "_weight_launch", WEIGHT_CANDIDATES,
                  lambda i: fp8.mxfp4_weight_to_fp8(ws[i].packed, ws[i].scales), len(ws), per_set + n * k, bandwidth)
            del ws
            torch.cuda.empty_cache()


def accumulation() -> None:
    e4m3 = torch.float8_e4m3fn
    print("| N x K | data | error fp32 acc | error fast acc | us fp32 acc | us fast acc |\n|---|---|---|---|---|---|")
    for layers in SHAPES.values():
        for n, k in layers.values():
            for data in ("zero mean", "positive mean"):
                x = torch.randn(M, k, device="cuda")
                w = torch.randn(n, k, device="cuda")
                if data == "positive mean":
                    x, w = x.abs() + 0.5, w.abs() + 0.25
                a, a_scale = fp8.mxfp4_activation_to_fp8(x.bfloat16())
                q = quantize(w, "mxfp4")
                b, b_scale = fp8.mxfp4_weight_to_fp8(q.packed, q.scales)
                del x, w, q
                exact = ((a.view(e4m3).double() * a_scale.double()[:, None])
                         @ (b.view(e4m3).double() * b_scale.double()[:, None]).T)

                def product(i: int, fast: bool) -> torch.Tensor:
                    return torch._scaled_mm(a.view(e4m3), b.view(e4m3).t(), scale_a=a_scale[:, None],
                                            scale_b=b_scale[None, :], out_dtype=torch.bfloat16, use_fast_accum=fast)

                errors = [relative_error(product(0, fast), exact) for fast in (False, True)]
                del exact
                times = [time_ms(lambda i, f=fast: product(i, f), 1, graph=True) * 1e3 for fast in (False, True)]
                print(f"| {n}x{k} | {data} | {errors[0]:.1e} | {errors[1]:.1e} | {times[0]:.1f} | {times[1]:.1f} |",
                      flush=True)
                del a, b
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["conversions", "accumulation"])
    {"conversions": conversions, "accumulation": accumulation}[parser.parse_args().what]()


if __name__ == "__main__":
    main()
