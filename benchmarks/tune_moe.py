"""Sweep ``MoeConfig``s of the fp4 MoE kernels on the GPU (CUDA-graph replays, bench_moe's setup).

For each model and token count, times ``fp4_moe`` (NVFP4 W4A16: the GEMMs without activation
quantization) with every candidate config of the token count's bucket and prints them, best
first, with the config ``choose_moe_config`` picks marked. Used to choose its buckets; the chosen
ones are then measured by ``bench_moe.py``.

    python benchmarks/tune_moe.py [--tokens 1,16,128,4096] [--models qwen3-30b-a3b,...]
"""

import argparse
import itertools

import torch

from bench_moe import SHAPES, hf_experts, quantize_experts, routing_sets
from fp4compile.kernels.triton.moe import MoeConfig, choose_moe_config, fp4_moe
from timing import time_ms

# (block_m, block_n, block_k for both GEMMs, num_warps, num_stages) per bucket of tokens
CANDIDATES = {
    "decode": itertools.product([16], [32, 64], [128, 256], [2, 4], [3]),
    "mid": itertools.product([16, 32], [32, 64], [128, 256], [4], [3]),
    "prefill": itertools.product([64, 128], [64, 128], [64, 128], [4, 8], [3]),
}


def bucket(tokens: int) -> str:
    return "decode" if tokens <= 16 else "mid" if tokens <= 512 else "prefill"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,128,4096")
    parser.add_argument("--models", default="qwen3-30b-a3b")
    parser.add_argument("--fmt", default="nvfp4")
    args = parser.parse_args()
    torch.manual_seed(0)
    candidates = {name: list(configs) for name, configs in CANDIDATES.items()}
    for model in args.models.split(","):
        shape = SHAPES[model]
        experts, _ = hf_experts(shape)
        gate_up, down = (quantize_experts(w.data, args.fmt) for w in (experts.gate_up_proj, experts.down_proj))
        del experts
        per_expert = gate_up.packed[0].numel() + down.packed[0].numel()
        for tokens in map(int, args.tokens.split(",")):
            hidden = torch.randn(tokens, shape["H"], device="cuda", dtype=torch.bfloat16)
            sets = routing_sets(tokens, shape, per_expert)
            chosen = choose_moe_config(tokens * shape["top_k"], shape["E"], shape["H"], shape["I"], args.fmt)
            results = []
            for block_m, block_n, block_k, warps, stages in candidates[bucket(tokens)]:
                config = MoeConfig(block_m, block_n, min(block_k, shape["H"]), min(block_k, shape["I"]), warps, stages)

                def call(i: int, config=config):
                    ids, weights = sets[i]
                    return fp4_moe(hidden, ids, weights, gate_up.packed, gate_up.scales, gate_up.global_scale,
                                   down.packed, down.scales, down.global_scale, None, None, args.fmt, "none", "silu",
                                   1.0, 1.0, config=config)
                try:
                    results.append((time_ms(call, len(sets), graph=True), config))
                except Exception as error:  # a config Triton cannot compile (shared memory, registers)
                    print(f"  {config}: {type(error).__name__}")
            print(f"\n{model} tokens={tokens} ({args.fmt} W4A16), chosen: {chosen}")
            for t, config in sorted(results, key=lambda r: r[0]):
                print(f"  {t * 1e3:8.1f} us  {config}{'  <- chosen' if config == chosen else ''}", flush=True)


if __name__ == "__main__":
    main()
