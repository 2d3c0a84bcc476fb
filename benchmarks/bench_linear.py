"""fp4 linear layers against cuBLAS bf16, in one run on the GPU (protocol: ../shared/BENCHMARKS.md).

For each (N, K) in shapes.json and each M, times ``F.linear`` in bf16 (cuBLAS), a naive Triton
``tl.dot_scaled`` kernel (MXFP4 W4A16; the baseline the issue names), and ``torch.ops.fp4.linear``
for MXFP4/NVFP4 x W4A16/W4A4 (activation quantization included), each checked against the fp64
reference on the same inputs first. M <= 16 is timed as CUDA-graph replays; larger M with
``triton.testing.do_bench`` (median), and also as graph replays (``graph``: the GPU time without
the per-call CPU cost of the Python launch path, which the eager numbers include). Weights rotate
over enough sets to exceed the L2. Then the activation quantization's bandwidth at M=4096
against a device copy. Prints markdown tables: time, ratio to bf16 (>1 is faster), weight GB/s.

``--implementations`` (issue 7) instead times MXFP4 W4A4 ``fp4::linear`` forced to each
implementation and left to the chooser, against cuBLAS bf16 (``implementations.py``).

    python benchmarks/bench_linear.py [--m 1,16,128,4096] [--models llama3-8b,...]
    python benchmarks/bench_linear.py --models ""    # only the activation quantization
    python benchmarks/bench_linear.py --implementations [--m 16,128,4096]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fp4compile  # noqa: F401  (registers torch.ops.fp4)
from fp4compile.formats import dequantize, quantize
from fp4compile.kernels.triton import fp4_quantize
from fp4compile.kernels.triton.linear import kernel_for
from fp4compile.kernels.cutlass.hopper import weight_to_e4m3
from fp4compile.kernels.triton.target import kernel_target
from fp4compile.ops.linear import choice_prefix
from implementations import COLUMNS, cells, check_auto_runs, forced, picked, report, use_fresh_choice_cache
from timing import geomean, relative_error, rotation, time_interleaved_ms, time_ms

SHAPES = json.loads((Path(__file__).parent / "shapes.json").read_text())["linear"]
VARIANTS = [("mxfp4", "none"), ("nvfp4", "none"), ("mxfp4", "fp4"), ("nvfp4", "fp4")]
NAMES = {v: f"{v[0]} {'W4A4' if v[1] == 'fp4' else 'W4A16'}" for v in VARIANTS}


@triton.jit
def _dot_scaled_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The straightforward MXFP4 W4A16 kernel: ``tl.dot_scaled`` (bf16 x e2m1 with e8m0 scales),
    which Triton lowers on Hopper by upcasting the weight tile to bf16. Baseline only."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=rows[:, None] < M, other=0.0)
        half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        w = tl.load(w_ptr + cols[None, :] * (K // 2) + half[:, None], mask=cols[None, :] < N, other=0)  # (K/2, N)
        groups = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s = tl.load(s_ptr + cols[:, None] * (K // 32) + groups[None, :], mask=cols[:, None] < N, other=0)
        acc = tl.dot_scaled(x, None, "bf16", w, s, "e2m1", acc)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(tl.bfloat16), mask=(rows[:, None] < M) & (cols[None, :] < N))


def dot_scaled_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    block_m = 16 if m <= 16 else 64 if m <= 128 else 128
    _dot_scaled_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, 128))](x, packed, scales, out, m, n, k,
                                                                       BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128)
    return out


def weight_sets(n: int, k: int) -> tuple[list[torch.Tensor], dict]:
    """bf16 weights and, per format, fp4 weights (optimal scales), each enough distinct copies to
    exceed the L2 (fp4 sets beyond the bf16 ones are clones: distinct memory, same values)."""
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(rotation(n * k * 2))]
    quantized = {}
    for fmt in ("mxfp4", "nvfp4"):
        base = [quantize(w, fmt, scale_rule="optimal") for w in weights]
        sets = rotation(n * k // 2)
        quantized[fmt] = [base[i] if i < len(base) else type(base[0])(*(t.clone() if torch.is_tensor(t) else t
                                                                          for t in base[i % len(base)]))
                          for i in range(sets)]
    return weights, quantized


def bench_shape(m: int, n: int, k: int, weights: list[torch.Tensor], quantized: dict, graph: bool) -> dict:
    """Times of every variant for one (M, N, K), in ms; correctness checked first on rows [:16]."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    row = {"bf16": time_ms(lambda i: F.linear(x, weights[i]), len(weights), graph)}
    checked = x[:16]
    for fmt, act_mode in VARIANTS:
        qs = quantized[fmt]
        args = lambda i: (x, qs[i].packed, qs[i].scales, qs[i].global_scale, None, None, fmt, act_mode)  # noqa: E731
        # NVFP4's activation global scale comes from all of x: quantize all rows, check the first 16.
        a = dequantize(quantize(x, fmt), torch.float64)[:16] if act_mode == "fp4" else checked.double()
        reference = a @ dequantize(qs[0], torch.float64).T
        # The checked rows go through the same kernel as the timed call (the dispatch is by M).
        error = relative_error(torch.ops.fp4.linear(*args(0))[:16], reference)
        assert error < 1e-2, f"{fmt}/{act_mode} M={m} N={n} K={k}: relative error {error:.2e}"
        row[(fmt, act_mode)] = time_ms(lambda i: torch.ops.fp4.linear(*args(i)), len(qs), graph)
        if (fmt, act_mode) == ("mxfp4", "none"):
            error = relative_error(dot_scaled_linear(x, qs[0].packed, qs[0].scales)[:16], reference)
            assert error < 1e-2, f"dot_scaled M={m} N={n} K={k}: relative error {error:.2e}"
            row["dot_scaled"] = time_ms(lambda i: dot_scaled_linear(x, qs[i].packed, qs[i].scales), len(qs), graph)
    return row


def quantize_bandwidth() -> None:
    """Activation quantization (``fp4::quantize`` on CUDA) at M=4096 against a device copy of x."""
    print("\nActivation quantization at M=4096 (bytes: x read + codes and scales written)")
    print("| K | format | quantize us | GB/s | copy GB/s (x to x) | ratio |\n|---|---|---|---|---|---|")
    for k in sorted({k for layers in SHAPES.values() for _, k in layers.values()}):
        x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
        copy = torch.empty_like(x)
        t_copy = time_ms(lambda i: copy.copy_(x), 1, True)
        copy_gbs = 2 * x.numel() * 2 / (t_copy * 1e-3) / 1e9
        static_scale = torch.tensor(0.01, device="cuda")
        for fmt, scale, label in (("mxfp4", None, "mxfp4"), ("nvfp4", None, "nvfp4 (dynamic global scale: x read twice)"),
                                  ("nvfp4", static_scale, "nvfp4 (static global scale)")):
            packed, scales, _ = fp4_quantize(x, fmt, scale)
            reference = quantize(x, fmt, global_scale=scale)
            assert torch.equal(packed, reference.packed) and torch.equal(scales, reference.scales)
            t = time_ms(lambda i: fp4_quantize(x, fmt, scale), 1, True)
            nbytes = x.numel() * 2 + packed.numel() + scales.numel()
            gbs = nbytes / (t * 1e-3) / 1e9
            print(f"| {k} | {label} | {t * 1e3:.1f} | {gbs:.0f} | {copy_gbs:.0f} | {gbs / copy_gbs:.2f} |", flush=True)


def implementations_table(ms: list[int], models: list[str]) -> None:
    """``--implementations``: MXFP4 W4A4 ``fp4::linear`` per implementation and auto, each checked
    against the fp64 reference on the first 16 rows, graph replays interleaved with cuBLAS bf16."""
    print("\n| model | layer | N x K | M | bf16 us | " + " | ".join(f"{c} us (x bf16)" for c in COLUMNS)
          + " | auto chose | regret | error cutlass / triton |")
    print("|---" * (8 + len(COLUMNS)) + "|")
    rows = []
    for model in models:
        for layer, (n, k) in SHAPES[model].items():
            rows += _implementation_rows(f"{model} | {layer} | {n}x{k}", n, k, ms)
            torch.cuda.empty_cache()
    report("fp4::linear MXFP4 W4A4", rows, "cuBLAS bf16")


def _implementation_rows(label: str, n: int, k: int, ms: list[int]) -> list[dict]:
    """``implementations_table``'s rows of one (N, K), one per M (printed as they come)."""
    sets = rotation(n * k // 2)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(min(sets, 2))]
    qs = [quantize(weights[i % len(weights)], "mxfp4") for i in range(sets)]
    e4m3 = [weight_to_e4m3(q.packed, q.scales) for q in qs]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        timed = {"base": lambda i: F.linear(x, weights[i % len(weights)])}
        reference = dequantize(quantize(x[:16], "mxfp4"), torch.float64) @ dequantize(qs[0], torch.float64).T
        errors = {}
        for column in COLUMNS:
            implementation, with_e4m3 = forced(column)

            def call(i, implementation=implementation, with_e4m3=with_e4m3):
                extra = e4m3[i] if with_e4m3 else ()
                return torch.ops.fp4.linear(x, qs[i].packed, qs[i].scales, qs[i].global_scale, None, None,
                                            "mxfp4", "fp4", implementation, *extra)

            errors[column] = relative_error(call(0)[:16], reference)  # auto: the chooser measures here
            assert errors[column] < 1e-2, f"{column} M={m} {n}x{k}: relative error {errors[column]:.2e}"
            timed[column] = call
        row = {"size": m, "pick": picked(choice_prefix("mxfp4", "fp4", n, k), m)}
        check_auto_runs(row["pick"], timed)
        row.update(time_interleaved_ms(timed, sets))
        rows.append(row)
        print(f"| {label} | {m} | {row['base'] * 1e3:.1f} | " + " | ".join(cells(row))
              + f" | {errors['cutlass']:.1e} / {errors['triton']:.1e} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,16,128,4096")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--skip-quantize", action="store_true")
    parser.add_argument("--implementations", action="store_true", help="the implementation comparison (issue 7)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.implementations:
        use_fresh_choice_cache()
        implementations_table(list(map(int, args.m.split(","))), list(filter(None, args.models.split(","))))
        return
    columns = ["dot_scaled", *VARIANTS]
    titles = ["dot_scaled mxfp4 W4A16", *(NAMES[v] for v in VARIANTS)]
    print("| model | layer | N x K | M | timing | bf16 us | " + " | ".join(f"{t} us (x bf16, GB/s)" for t in titles) + " |")
    print("|---" * (6 + len(columns)) + "|")
    ratios: dict[tuple[int, str], dict] = {}
    for model in filter(None, args.models.split(",")):  # --models "": only the quantize bandwidth
        for layer, (n, k) in SHAPES[model].items():
            weights, quantized = weight_sets(n, k)
            for m in map(int, args.m.split(",")):
                for timing in ["graph"] if m <= 16 else ["eager", "graph"]:
                    row = bench_shape(m, n, k, weights, quantized, graph=timing == "graph")
                    cells = []
                    for c in columns:
                        ratio = row["bf16"] / row[c]
                        ratios.setdefault((m, timing), {}).setdefault(c, []).append(ratio)
                        fmt = "mxfp4" if c == "dot_scaled" else c[0]
                        gbs = n * k * (0.5 + 1 / (32 if fmt == "mxfp4" else 16)) / (row[c] * 1e-3) / 1e9
                        cells.append(f"{row[c] * 1e3:.1f} ({ratio:.2f}x, {gbs:.0f})")
                    print(f"| {model} | {layer} | {n}x{k} | {m} | {timing} | {row['bf16'] * 1e3:.1f} | " + " | ".join(cells) + " |",
                          flush=True)
            del weights, quantized
    print("\nGeometric mean of the ratio to bf16 (>1: faster); kernel = what fp4::linear runs at that M")
    print("| M | timing | kernel (W4A16 / MXFP4 W4A4) | " + " | ".join(titles) + " |\n|---|---|---" + "|---" * len(columns) + "|")
    target = kernel_target(torch.device("cuda"))
    for (m, timing), per in sorted(ratios.items()):
        kernels = f"{kernel_for(m, 'nvfp4', 'none', target)} / {kernel_for(m, 'mxfp4', 'fp4', target)}"
        print(f"| {m} | {timing} | {kernels} | " + " | ".join(f"{geomean(per[c]):.2f}x" for c in columns) + " |")
    if not args.skip_quantize:
        quantize_bandwidth()


if __name__ == "__main__":
    main()
