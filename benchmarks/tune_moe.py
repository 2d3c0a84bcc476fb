"""Sweep ``MoeConfig``s of the fp4 MoE kernels on the GPU (CUDA-graph replays, bench_moe's setup).

For each model, token count and format, times ``fp4_moe`` (W4A16: the GEMMs without activation
quantization) with every candidate tile set of the token count's bucket, the same tiles for both
GEMMs, and prints the fastest totals with each GEMM's own kernel time (torch.profiler), then the
fastest tiles for each GEMM alone: the two GEMMs' tiles are chosen separately
(``choose_moe_config``, whose pick is timed too). The chosen ones are then measured by
``bench_moe.py``.

    python benchmarks/tune_moe.py [--tokens 1,16,128,4096] [--models qwen3-30b-a3b,...] [--fmts nvfp4,mxfp4]
"""

import argparse
import itertools

import torch

from bench_moe import SHAPES, hf_experts, quantize_experts, routing_sets
from fp4compile.kernels.triton.moe import GemmTiles, MoeConfig, choose_moe_config, fp4_moe
from timing import time_ms

# (block_m, block_n, block_k, num_warps, scale_words) per bucket of tokens
CANDIDATES = {
    "decode": itertools.product([16], [32, 64], [64, 128, 256], [2, 4], [True, False]),
    "mid": itertools.product([16, 32], [32, 64], [128, 256], [2, 4], [True, False]),
    "prefill": itertools.product([64, 128], [64, 128], [64, 128], [4, 8], [True]),
}


def bucket(tokens: int) -> str:
    return "decode" if tokens <= 16 else "mid" if tokens <= 512 else "prefill"


def kernel_times(call, calls: int) -> dict[str, float]:
    """Mean GPU time (us) of the gate/up and the down kernel over ``calls`` eager calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            call(i)
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {"gate_up": [], "down": []}
    for event in prof.events():
        for name, values in times.items():
            if event.device_type == torch.autograd.DeviceType.CUDA and f"_{name}_kernel" in event.name:
                values.append(event.device_time)
    return {name: sum(values) / max(len(values), 1) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,128,4096")
    parser.add_argument("--models", default="qwen3-30b-a3b")
    parser.add_argument("--fmts", default="nvfp4,mxfp4")
    args = parser.parse_args()
    torch.manual_seed(0)
    candidates = {name: list(configs) for name, configs in CANDIDATES.items()}
    for model in args.models.split(","):
        shape = SHAPES[model]
        experts, _ = hf_experts(shape)
        weights = {fmt: [quantize_experts(w.data, fmt) for w in (experts.gate_up_proj, experts.down_proj)]
                   for fmt in args.fmts.split(",")}
        del experts
        for tokens, (fmt, (gate_up, down)) in itertools.product(map(int, args.tokens.split(",")), weights.items()):
            hidden = torch.randn(tokens, shape["H"], device="cuda", dtype=torch.bfloat16)
            sets = routing_sets(tokens, shape, gate_up.packed[0].numel() + down.packed[0].numel())

            def timed(config: MoeConfig) -> tuple[float, dict[str, float]]:
                def call(i: int):
                    ids, weights = sets[i % len(sets)]
                    return fp4_moe(hidden, ids, weights, gate_up.packed, gate_up.scales, gate_up.global_scale,
                                   down.packed, down.scales, down.global_scale, None, None, fmt, "none", "silu",
                                   1.0, 1.0, config=config)
                return time_ms(call, len(sets), graph=True) * 1e3, kernel_times(call, 2 * len(sets))

            chosen = choose_moe_config(tokens, shape["top_k"], shape["E"], shape["H"], shape["I"], fmt)
            results = [(*timed(chosen), chosen)]
            for block_m, block_n, block_k, warps, words in candidates[bucket(tokens)]:
                tiles = GemmTiles(block_n, block_k, warps, words)
                config = MoeConfig(block_m, tiles, tiles)
                try:
                    results.append((*timed(config), config))
                except Exception as error:  # a config Triton cannot compile (shared memory, registers)
                    print(f"  {config}: {type(error).__name__}")
            print(f"\n{model} tokens={tokens} {fmt} W4A16; chosen {chosen}: {results[0][0]:.1f} us "
                  f"(gate/up {results[0][1]['gate_up']:.1f}, down {results[0][1]['down']:.1f})")
            for total, kernels, config in sorted(results[1:], key=lambda r: r[0])[:8]:
                print(f"  {total:8.1f} us  gate/up {kernels['gate_up']:7.1f}  down {kernels['down']:7.1f}  {config}")
            for gemm in ("gate_up", "down"):
                best = sorted(results[1:], key=lambda r: r[1][gemm])[:3]
                print(f"  fastest {gemm}: " + "; ".join(f"{r[1][gemm]:.1f} us {getattr(r[2], gemm)} (block_m "
                                                        f"{r[2].block_m})" for r in best), flush=True)


if __name__ == "__main__":
    main()
