"""Compile a small transformers model with the fp4 backend; print the layer report and the error.

Builds a Llama-architecture model from a config (random weights, nothing downloaded), keeps a
bf16 reference of its logits, compiles it with ``torch.compile(model, backend="fp4")`` and
compares. Runs on the GPU when there is one, else on the CPU (reference ops: slow but exact).

    python examples/quickstart.py [--format nvfp4|mxfp4] [--act-mode none|fp4]
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fp4compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="nvfp4", choices=["nvfp4", "mxfp4"])
    parser.add_argument("--act-mode", default="none", choices=["none", "fp4"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    model = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (2, 32), device=device)

    with torch.no_grad():
        reference = model(ids).logits.float()
        compiled = torch.compile(model, backend="fp4", options={"format": args.format, "act_mode": args.act_mode})
        start = time.perf_counter()
        logits = compiled(ids).logits.float()
        seconds = time.perf_counter() - start

    print(fp4compile.report(compiled))
    error = ((logits - reference).norm() / reference.norm()).item()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"\non {device}: compiled in {seconds:.1f} s; logits vs bf16: relative L2 error {error:.4f}, "
          f"top-1 agreement {agree:.1%}")


if __name__ == "__main__":
    main()
