"""How far weight-only fp4 moves a random-weight Llama's logits, by width and depth, on the CPU.

``bench_decode.py`` reports the first token's logits error against bf16 on random-weight models;
on the 32-layer Llama-3-8B shape it is about 1.0. This replays that with the reference math
alone (Llama-3-8B at ``--hidden 4096``: heads of 128, one KV head per 4; every decoder-layer
weight replaced by ``dequantize(quantize(w))``, fp32, no kernels), to tell a kernel defect from
what fp4 weight error does to a random network.

    python benchmarks/logits_error_by_depth.py [--hidden 4096] [--layers 2,8] [--format nvfp4]
"""

import argparse

import torch
import transformers

from fp4compile.formats import dequantize, quantize


def logits_error(hidden: int, layers: int, fmt: str, tokens: int = 64) -> float:
    """Relative L2 error of the last position's logits, fp4 weights against the fp32 originals."""
    config = transformers.AutoConfig.for_model(
        "llama", hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512), vocab_size=4096)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    prompt = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(prompt).logits[0, -1]
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantize(quantize(module.weight, fmt), torch.float32))
        fp4 = model(prompt).logits[0, -1]
    return ((fp4 - reference).norm() / reference.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=lambda s: [int(n) for n in s.split(",")], default=[2, 8])
    parser.add_argument("--format", choices=("mxfp4", "nvfp4"), default="nvfp4")
    args = parser.parse_args()
    for layers in args.layers:
        print(f"hidden {args.hidden}, {layers} layers, {args.format} W4A16: logits error "
              f"{logits_error(args.hidden, layers, args.format):.3f}", flush=True)


if __name__ == "__main__":
    main()
