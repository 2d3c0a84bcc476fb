"""Every implementation of the MXFP4 W4A4 ops, and the automatic choice, in one run on the GPU.

The issue-7 companion of ``bench_linear.py`` and ``bench_moe.py`` (same shapes, timing and
protocol, ../shared/BENCHMARKS.md): for each shape, cuBLAS bf16 (``F.linear``) or bf16
``torch._grouped_mm`` on pre-sorted tokens (MoE), then ``torch.ops.fp4.{linear,moe}`` forced to
``triton``, to ``cutlass`` (conversions per call), to ``cutlass`` with the compile-time e4m3
weights of ``Fp4Config(fp8_weights=True)``, and left to ``auto`` (the chooser times triton and
cutlass at its first call, into a fresh cache). Everything is timed as CUDA-graph replays, after
a check against the fp64 reference, with a shape's columns interleaved (``timing.
time_interleaved_ms``): ``auto`` runs the same kernels as one forced column, so their gap is
within a few percent and must not be the GPU's drift between two timings. Prints a table per op, the geometric means of the ratio to
bf16, and how much slower ``auto`` is than the best forced implementation.

    python benchmarks/bench_implementations.py [--m 16,128,4096] [--tokens 16,128,4096] [--skip-moe]
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ[  # a fresh choice cache: the auto column measures at its first call
    "FP4COMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fp4compile-bench-")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import fp4compile  # noqa: E402,F401  (registers torch.ops.fp4)
from fp4compile.formats import dequantize, quantize  # noqa: E402
from fp4compile.formats.moe import moe_reference  # noqa: E402
from fp4compile.kernels.cutlass.hopper import weight_to_e4m3  # noqa: E402
from fp4compile.ops import chooser  # noqa: E402
from bench_moe import quantize_experts  # noqa: E402
from timing import geomean, relative_error, rotation, time_interleaved_ms  # noqa: E402

SHAPES = json.loads((Path(__file__).parent / "shapes.json").read_text())
COLUMNS = ["triton", "cutlass", "cutlass+e4m3", "auto"]


def forced(column: str) -> tuple[str, bool]:
    """(implementation argument, with e4m3 weights) of a column."""
    return ("cutlass", True) if column == "cutlass+e4m3" else (column, False)


def report(title: str, rows: list[dict], ratio_name: str) -> None:
    print(f"\n{title}: geometric mean of the ratio to {ratio_name} (>1: faster), and auto against the best forced one")
    print("| size | " + " | ".join(COLUMNS) + " | auto / best forced (worst shape) |\n|---" + "|---" * (len(COLUMNS) + 1) + "|")
    for size in sorted({r["size"] for r in rows}):
        group = [r for r in rows if r["size"] == size]
        means = [f"{geomean([r['base'] / r[c] for r in group]):.2f}x" for c in COLUMNS]
        worst = max(r["auto"] / min(r["triton"], r["cutlass"]) for r in group)
        print(f"| {size} | " + " | ".join(means) + f" | {worst:.3f} |")


def print_row(cells: list) -> None:
    print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def bench_linear(ms: list[int]) -> list[dict]:
    print("\n| model | layer | N x K | M | bf16 us | " + " | ".join(f"{c} us (x bf16)" for c in COLUMNS)
          + " | auto chose | error cutlass / triton |")
    print("|---" * (7 + len(COLUMNS)) + "|")
    rows = []
    for model, layers in SHAPES["linear"].items():
        for layer, (n, k) in layers.items():
            sets = rotation(n * k // 2)
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(min(sets, 2))]
            qs = [quantize(weights[i % len(weights)], "mxfp4") for i in range(sets)]
            e4m3 = [weight_to_e4m3(q.packed, q.scales) for q in qs]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                timed = {"base": lambda i: F.linear(x, weights[i % len(weights)])}
                ref = dequantize(quantize(x[:16], "mxfp4"), torch.float64) @ dequantize(qs[0], torch.float64).T
                errors = {}
                for column in COLUMNS:
                    implementation, with_e4m3 = forced(column)

                    def call(i, implementation=implementation, with_e4m3=with_e4m3):
                        extra = e4m3[i] if with_e4m3 else ()
                        return torch.ops.fp4.linear(x, qs[i].packed, qs[i].scales, qs[i].global_scale, None, None,
                                                    "mxfp4", "fp4", implementation, *extra)

                    errors[column] = relative_error(call(0)[:16], ref)
                    assert errors[column] < 1e-2, f"{column} M={m} {n}x{k}: relative error {errors[column]:.2e}"
                    timed[column] = call
                row = {"size": m, **time_interleaved_ms(timed, sets)}
                chosen = [name for key, name in next(iter(chooser.choices().values()), {}).items()
                          if f"N={n} K={k} M<={chooser.bucket(m)} " in key]
                rows.append(row)
                print_row([model, layer, f"{n}x{k}", m, f"{row['base'] * 1e3:.1f}",
                           *(f"{row[c] * 1e3:.1f} ({row['base'] / row[c]:.2f}x)" for c in COLUMNS),
                           chosen[0] if chosen else "(one candidate)",
                           f"{errors['cutlass']:.1e} / {errors['triton']:.1e}"])
            del weights, qs, e4m3
            torch.cuda.empty_cache()
    return rows


def bench_moe(token_counts: list[int]) -> list[dict]:
    print("\n| model | tokens | bf16 grouped_mm us | " + " | ".join(f"{c} us (x bf16)" for c in COLUMNS)
          + " | error cutlass vs reference (vs bf16-projection reference) | error triton |")
    print("|---" * (6 + len(COLUMNS)) + "|")
    rows = []
    for model, shape in SHAPES["moe"].items():
        experts, hidden_size, inter, top_k = shape["E"], shape["H"], shape["I"], shape["top_k"]
        gate_up_bf16 = torch.randn(experts, 2 * inter, hidden_size, device="cuda", dtype=torch.bfloat16) / hidden_size**0.5
        down_bf16 = torch.randn(experts, hidden_size, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
        gate_up, down = quantize_experts(gate_up_bf16, "mxfp4"), quantize_experts(down_bf16, "mxfp4")
        e4m3 = (*weight_to_e4m3(gate_up.packed, gate_up.scales), *weight_to_e4m3(down.packed, down.scales))
        for tokens in token_counts:
            hidden = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16)
            logits = torch.randn(tokens, experts, device="cuda")
            weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
            order = ids.reshape(-1).argsort()
            sorted_hidden = hidden[order // top_k]
            ends = torch.bincount(ids.reshape(-1), minlength=experts).cumsum(0).to(torch.int32)

            def bf16_moe(i):
                gate, up = torch._grouped_mm(sorted_hidden, gate_up_bf16.transpose(-2, -1), offs=ends).chunk(2, dim=-1)
                return torch._grouped_mm(F.silu(gate) * up, down_bf16.transpose(-2, -1), offs=ends)

            timed = {"base": bf16_moe}
            checked = min(tokens, 64)
            refs = [moe_reference(hidden[:checked], ids[:checked], weights[:checked], gate_up, down, None, None, "fp4",
                                  "silu", 1.0, 0.0, dtype).double() for dtype in (torch.float32, torch.bfloat16)]
            errors = {}
            for column in COLUMNS:
                implementation, with_e4m3 = forced(column)

                def call(i, implementation=implementation, with_e4m3=with_e4m3, rows=slice(None)):
                    return torch.ops.fp4.moe(hidden[rows], ids[rows], weights[rows], *gate_up[:3], *down[:3], None, None,
                                             "mxfp4", "fp4", "silu", 1.0, 0.0, implementation,
                                             *(e4m3 if with_e4m3 else ()))

                y = call(0, rows=slice(0, checked))
                errors[column] = [relative_error(y, ref) for ref in refs]
                assert min(errors[column]) < 2e-2, f"{model} {column} T={tokens}: relative errors {errors[column]}"
                timed[column] = call
            row = {"size": tokens, **time_interleaved_ms(timed, 1)}
            rows.append(row)
            print_row([model, tokens, f"{row['base'] * 1e3:.1f}",
                       *(f"{row[c] * 1e3:.1f} ({row['base'] / row[c]:.2f}x)" for c in COLUMNS),
                       f"{errors['cutlass'][0]:.1e} ({errors['cutlass'][1]:.1e})", f"{errors['triton'][0]:.1e}"])
            del hidden, sorted_hidden
        del gate_up_bf16, down_bf16, gate_up, down, e4m3
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="16,128,4096")
    parser.add_argument("--tokens", default="16,128,4096")
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--skip-moe", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if not args.skip_linear:
        report("fp4::linear MXFP4 W4A4", bench_linear([int(m) for m in args.m.split(",")]), "cuBLAS bf16")
    if not args.skip_moe:
        report("fp4::moe MXFP4 W4A4", bench_moe([int(t) for t in args.tokens.split(",")]), "bf16 grouped_mm")
    print("\nchoices made:", json.dumps(chooser.choices(), indent=1))


if __name__ == "__main__":
    main()
