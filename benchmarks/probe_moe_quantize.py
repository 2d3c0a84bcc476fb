"""Where W4A4 MoE at one token should quantize: in launches of its own, or inside the GEMMs.

At direct slots (``use_direct_slots``) each GEMM program can quantize its slot's row itself
(``moe.quantize_in_gemms`` decides which rows). This times, per model of ``shapes.json`` and
format, every combination with ``quantize_in_gemms`` overridden (CUDA-graph replays, bench_moe's
experts and routings; each variant three times, interleaved; medians in us): "separate" (both
rows in launches of their own), "x" (the hidden states in the gate/up GEMM), and for NVFP4
"inter" (the intermediate in the down GEMM) and "both". W4A16 for reference.

    python benchmarks/probe_moe_quantize.py [--models qwen3-30b-a3b,...]
"""

import argparse
import statistics

import torch

from bench_moe import SHAPES, fp4_call, hf_experts, quantize_experts, routing_sets
from fp4compile.kernels.triton import moe
from timing import time_ms

VARIANTS = {"separate": (False, False), "x": (True, False), "inter": (False, True), "both": (True, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES))
    chosen = moe.quantize_in_gemms
    for model in parser.parse_args().models.split(","):
        shape = SHAPES[model]
        experts, _ = hf_experts(shape)
        weights = {fmt: (quantize_experts(experts.gate_up_proj.data, fmt), quantize_experts(experts.down_proj.data, fmt))
                   for fmt in ("mxfp4", "nvfp4")}
        del experts
        torch.cuda.empty_cache()
        expert_bytes = sum(w.packed[0].numel() + w.scales[0].numel() for w in weights["mxfp4"])
        sets = routing_sets(1, shape, expert_bytes)
        hidden = torch.randn(1, shape["H"], device="cuda", dtype=torch.bfloat16)
        for fmt in ("mxfp4", "nvfp4"):
            variants = {name: v for name, v in VARIANTS.items() if fmt == "nvfp4" or not v[1]}
            times: dict[str, list[float]] = {name: [] for name in variants}
            try:
                for _ in range(3):
                    for name, (in_x, in_inter) in variants.items():
                        moe.quantize_in_gemms = (
                            lambda direct, mxfp4, x_amax, *_, a=in_x, b=in_inter:
                            (direct and a and (mxfp4 or x_amax), direct and b and not mxfp4))
                        call = fp4_call(weights, fmt, "fp4", sets, hidden)
                        times[name].append(time_ms(call, len(sets), graph=True) * 1e3)
            finally:
                moe.quantize_in_gemms = chosen
            w4a16 = time_ms(fp4_call(weights, fmt, "none", sets, hidden), len(sets), graph=True) * 1e3
            print(f"{model} {fmt}: W4A16 {w4a16:.1f} | W4A4 "
                  + " ".join(f"{name} {statistics.median(t):.1f}" for name, t in times.items()), flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
