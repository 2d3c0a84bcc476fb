"""Sweep ``GemmConfig``s of the fp4 GEMM kernel on the GPU, against cuBLAS bf16 in the same run.

For each M and each config, times W4A16 (the GEMM alone; W4A4 adds the activation quantization)
on a subset of ``shapes.json`` and prints the geometric-mean ratio to bf16, best first. Used to
choose ``choose_config``'s buckets; the chosen ones are then measured by ``bench_linear.py``.

    python benchmarks/tune_linear.py [--m 1,16,128,4096] [--fmt mxfp4,nvfp4]
    python benchmarks/tune_linear.py --short-run-splits [--m 1,16]   # the decode tile's split cap
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import fp4compile  # noqa: F401
from fp4compile.formats import dequantize, quantize
from fp4compile.kernels.triton.gemm import GemmConfig, choose_config, fp4_gemm
from timing import geomean, relative_error, rotation, time_interleaved_ms, time_ms

SHAPES = json.loads((Path(__file__).parent / "shapes.json").read_text())["linear"]
SUBSET = [SHAPES["llama3-8b"]["o"], SHAPES["llama3-8b"]["qkv"], SHAPES["llama3-8b"]["gate_up"],
          SHAPES["llama3-8b"]["down"], SHAPES["llama3-70b"]["o"], SHAPES["llama3-70b"]["gate_up"]]
# (block_m, block_n, block_k, num_warps, num_stages, programs_per_sm)
CANDIDATES = {  # GemmConfig fields, in order
    "small": [(16, 128, 128, 4, 4, 2), (16, 128, 128, 4, 4, 3), (16, 128, 256, 4, 3, 2), (16, 64, 256, 4, 3, 2),
              (16, 64, 256, 2, 3, 4), (16, 32, 256, 1, 3, 8), (16, 32, 256, 1, 3, 4),
              # fewer K splits: longer runs of K tiles per program, fewer partial sums (small layers)
              (16, 64, 256, 2, 3, 2), (16, 64, 256, 2, 3, 3), (16, 64, 256, 2, 4, 2)],
    "mid": [(32, 128, 128, 4, 4, 2), (32, 64, 256, 2, 3, 4),
            # no register spills on sm_90, where (32, 64, 256, 2, 3) spills inside its K loop (tests/sm90.py)
            (32, 32, 256, 2, 3, 4), (32, 64, 128, 2, 3, 4), (32, 64, 256, 4, 3, 4), (128, 64, 128, 4, 3, 1), (128, 64, 128, 4, 3, 2), (128, 64, 128, 4, 3, 3), (64, 64, 128, 4, 3, 2),
            (128, 128, 128, 8, 3, 1), (128, 128, 128, 8, 3, 2),
            # no register spills on sm_90 for NVFP4, where (128, 64, 128, 4, 3) spills 48-80 bytes (tests/sm90.py)
            (128, 64, 128, 8, 3, 2), (128, 32, 128, 4, 3, 2), (128, 64, 64, 4, 3, 2)],
    "large": [(128, 256, 128, 8, 3, 2)],
}


def large_m_paths(m: int, n: int, k: int, x: torch.Tensor, weights: list[torch.Tensor], bf16: float, graph: bool) -> None:
    """At prefill sizes, time the whole-layer alternatives to the fused GEMM (one shape)."""
    from fp4compile.kernels.triton.dequantize import dequantize_linear, fp4_dequantize
    from fp4compile.kernels.triton.fp8 import fp8_linear, mxfp4_activation_to_fp8, mxfp4_weight_to_fp8
    from fp4compile.kernels.triton.quantize import fp4_fake_quantize

    for fmt in ("mxfp4", "nvfp4"):
        qs = [quantize(weights[i % len(weights)], fmt) for i in range(rotation(n * k // 2))]
        t = time_ms(lambda i: dequantize_linear(x, qs[i].packed, qs[i].scales, qs[i].global_scale, None, fmt), len(qs), graph)
        t_dq = time_ms(lambda i: fp4_dequantize(qs[i].packed, qs[i].scales, qs[i].global_scale, fmt, torch.bfloat16),
                       len(qs), graph)
        t_fq = time_ms(lambda i: fp4_fake_quantize(x, fmt, None, torch.bfloat16), 1, graph)
        print(f"M={m} {n}x{k} {fmt} W4A16 dequantize+cublas: {bf16 / t:.2f}x (dequantize alone {t_dq * 1e3:.0f} us, "
              f"{n * k * 2.53 / (t_dq * 1e-3) / 1e9:.0f} GB/s; activation fake-quant {t_fq * 1e3:.0f} us, bf16 {bf16 * 1e3:.0f} us)",
              flush=True)
    qs = [quantize(weights[i % len(weights)], "mxfp4") for i in range(rotation(n * k // 2))]
    y = fp8_linear(x, qs[0].packed, qs[0].scales, qs[0].global_scale, None, torch.bfloat16)
    ref = dequantize(quantize(x[:16], "mxfp4"), torch.float64) @ dequantize(qs[0], torch.float64).T
    print(f"M={m} {n}x{k} mxfp4 W4A4 fp8_linear: error {relative_error(y[:16], ref):.1e}", flush=True)
    t = time_ms(lambda i: fp8_linear(x, qs[i].packed, qs[i].scales, qs[i].global_scale, None, torch.bfloat16), len(qs),
                graph)
    print(f"M={m} {n}x{k} mxfp4 W4A4 fp8_linear (conversions + GEMM): {bf16 / t:.2f}x", flush=True)
    a, sa = mxfp4_activation_to_fp8(x)
    bs = [mxfp4_weight_to_fp8(q.packed, q.scales) for q in qs]
    t_act = time_ms(lambda i: mxfp4_activation_to_fp8(x), 1, graph)
    t_w = time_ms(lambda i: mxfp4_weight_to_fp8(qs[i].packed, qs[i].scales), len(qs), graph)
    f8 = torch.float8_e4m3fn
    t = time_ms(lambda i: torch._scaled_mm(a.view(f8), bs[i][0].view(f8).t(), scale_a=sa[:, None], scale_b=bs[i][1][None, :],
                                           out_dtype=torch.bfloat16), len(bs), graph)
    print(f"M={m} {n}x{k} conversions: activation {t_act * 1e3:.0f} us, weight {t_w * 1e3:.0f} us; "
          f"torch._scaled_mm alone {bf16 / t:.2f}x, with conversions {bf16 / (t + t_act + t_w):.2f}x", flush=True)


SMALL_LAYERS = [(1024, 2048), (1536, 2048), (2048, 1536), (2048, 2048), (4096, 2048), (2048, 4096), (2560, 2560),
                (2880, 2816), (3072, 3072), (3584, 3584), (4096, 4096), (5120, 5120), (6144, 4096), (8192, 8192)]
"""(N, K) of small layers (hidden sizes 1024-8192), where decode splits K over many programs."""


def short_run_splits(ms: list[int], fmts: list[str]) -> None:
    """``choose_config``'s decode tile with and without its cap on K splits (``short_run_splits``)
    on ``SMALL_LAYERS``, W4A16 GEMM alone, graph replays timed interleaved, against cuBLAS bf16."""
    for m in ms:
        ratios: dict[tuple[str, str], list[float]] = {}
        for n, k in SMALL_LAYERS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(rotation(n * k * 2))]
            capped = choose_config(m, n, k)
            configs = {"uncapped": dataclasses.replace(capped, short_run_splits=None), "capped": capped}
            for fmt in fmts:
                qs = [quantize(weights[i % len(weights)], fmt) for i in range(rotation(n * k // 2))]
                ref = x.double() @ dequantize(qs[0], torch.float64).T
                calls = {"bf16": lambda i: F.linear(x, weights[i % len(weights)])}
                for name, cfg in configs.items():
                    def run(i: int, cfg: GemmConfig = cfg) -> torch.Tensor:
                        return fp4_gemm(x, qs[i].packed, qs[i].scales, qs[i].global_scale, None, fmt, torch.bfloat16, cfg)

                    assert relative_error(run(0), ref) < 1e-2, (n, k, fmt, name)
                    calls[name] = run
                times = time_interleaved_ms(calls, len(qs))
                for name in configs:
                    ratios.setdefault((fmt, name), []).append(times["bf16"] / times[name])
                print(f"M={m} {n}x{k} {fmt}: bf16 {times['bf16'] * 1e3:.2f} us, uncapped {times['uncapped'] * 1e3:.2f} "
                      f"us, capped {times['capped'] * 1e3:.2f} us", flush=True)
        for (fmt, name), values in ratios.items():
            print(f"M={m} {fmt} {name}: geomean {geomean(values):.3f}x of bf16", flush=True)


def bucket(m: int) -> str:
    return "small" if m <= 16 else "mid" if m <= 512 else "large"


def launch_overhead() -> None:
    """CPU time per call (no sync) of ``F.linear``, of the fp4 op, and of the Triton wrapper the op
    calls (the difference is the op layer: custom-op dispatch, argument checks, implementation choice)."""
    import time

    from fp4compile.kernels.triton import fp4_linear

    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    calls = {"F.linear": lambda: F.linear(x, w)}
    for fmt, act_mode in (("nvfp4", "none"), ("mxfp4", "fp4")):
        q = quantize(w, fmt)
        args = (x, q.packed, q.scales, q.global_scale, None, None, fmt, act_mode)
        calls[f"fp4::linear {fmt} {act_mode}"] = lambda args=args: torch.ops.fp4.linear(*args)
        calls[f"triton fp4_linear {fmt} {act_mode}"] = lambda args=args: fp4_linear(*args)
    for name, fn in calls.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            fn()
        cpu = (time.perf_counter() - start) / 200
        torch.cuda.synchronize()
        print(f"launch overhead {name}: {cpu * 1e6:.1f} us of CPU per call", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,16,128,4096")
    parser.add_argument("--fmt", default="mxfp4,nvfp4")
    parser.add_argument("--graph", action="store_true", help="time every M as CUDA-graph replays (GPU time only)")
    parser.add_argument("--short-run-splits", action="store_true",
                        help="only compare the decode tile with and without its K-split cap on small layers")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    if args.short_run_splits:
        short_run_splits([int(m) for m in args.m.split(",") if int(m) <= 16], args.fmt.split(","))
        return
    launch_overhead()
    for m in map(int, args.m.split(",")):
        graph = m <= 16 or args.graph
        shapes = SUBSET if m < 4096 else SUBSET[:4]
        data = []
        for n, k in shapes:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(rotation(n * k * 2))]
            bf16 = time_ms(lambda i: F.linear(x, weights[i]), len(weights), graph)
            data.append((n, k, x, weights, bf16))
        if m >= 256:
            for n, k, x, weights, bf16 in data[:2]:
                large_m_paths(m, n, k, x, weights, bf16, graph)
        for fmt in args.fmt.split(","):
            quantized = [[quantize(weights[i % len(weights)], fmt) for i in range(rotation(n * k // 2))]
                         for n, k, _, weights, _ in data]
            references = [x[:16].double() @ dequantize(qs[0], torch.float64).T for (_, _, x, _, _), qs in zip(data, quantized)]
            results = []
            for cand in CANDIDATES[bucket(m)]:
                cfg = GemmConfig(*cand)
                ratios = []
                try:
                    for (n, k, x, weights, bf16), qs, ref in zip(data, quantized, references):
                        run = lambda i: fp4_gemm(x, qs[i].packed, qs[i].scales, qs[i].global_scale, None, fmt,  # noqa: E731
                                                 torch.bfloat16, cfg)
                        err = relative_error(run(0)[:16], ref)
                        assert err < 1e-2, f"error {err}"
                        ratios.append(bf16 / time_ms(run, len(qs), graph))
                except AssertionError:  # a wrong result is a bug, never a configuration to skip
                    raise
                except Exception as e:  # a config that does not compile or run is reported, not fatal
                    print(f"M={m} {fmt} {cand}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                results.append((geomean(ratios), cand, ratios))
                print(f"M={m} {fmt} {cand}: geomean {geomean(ratios):.2f}x  " + " ".join(f"{r:.2f}" for r in ratios), flush=True)
            del quantized, references
            results.sort(reverse=True)
            print(f"BEST M={m} {fmt}: " + "; ".join(f"{c} {g:.2f}x" for g, c, _ in results[:3]), flush=True)


if __name__ == "__main__":
    main()
