"""Quantize every linear weight of a small transformers model to MXFP4 and NVFP4; print the error.

Builds a Llama-architecture model from a config (random weights, nothing downloaded), quantizes
each ``nn.Linear`` weight with both formats and both scale rules, and prints the per-layer
relative L2 error of the round trip and the bytes before and after.

    python examples/quantize_weights.py [--layers 2] [--hidden 256]
"""

import argparse

import torch
from torch import nn

import fp4compile

VARIANTS = [("mxfp4", "spec"), ("mxfp4", "optimal"), ("nvfp4", "spec"), ("nvfp4", "optimal")]


def build_model(layers: int, hidden: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1), vocab_size=1024,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16)


def relative_error(weight: torch.Tensor, fmt: str, scale_rule: str) -> float:
    decoded = fp4compile.dequantize(fp4compile.quantize(weight, fmt, scale_rule=scale_rule))
    return ((decoded - weight.float()).norm() / weight.float().norm()).item()


def fp4_bytes(weight: torch.Tensor, fmt: str) -> int:
    q = fp4compile.quantize(weight, fmt)
    return sum(t.numel() * t.element_size() for t in (q.packed, q.scales, q.global_scale))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.layers, args.hidden)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]

    header = f"{'layer':<36} {'shape':>11} " + " ".join(f"{f + '/' + r:>14}" for f, r in VARIANTS)
    print("relative L2 error of the quantized weights (lm_head kept in bf16)\n" + header)
    totals = {v: 0.0 for v in VARIANTS}
    for name, module in linears:
        errors = {v: relative_error(module.weight.detach(), *v) for v in VARIANTS}
        for v, e in errors.items():
            totals[v] += e / len(linears)
        shape = "x".join(map(str, module.weight.shape))
        print(f"{name:<36} {shape:>11} " + " ".join(f"{errors[v]:>14.4f}" for v in VARIANTS))
    print(f"{'mean':<36} {'':>11} " + " ".join(f"{totals[v]:>14.4f}" for v in VARIANTS))

    bf16 = sum(m.weight.numel() * 2 for _, m in linears)
    for fmt in ("mxfp4", "nvfp4"):
        packed = sum(fp4_bytes(m.weight.detach(), fmt) for _, m in linears)
        print(f"{fmt}: {bf16 / 2**20:.2f} MiB of bf16 weights -> {packed / 2**20:.2f} MiB ({packed / bf16:.3f}x)")


if __name__ == "__main__":
    main()
