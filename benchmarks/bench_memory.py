"""GPU memory held by the weights of an fp4-compiled transformers model, against bf16.

Builds a Llama-3-8B-shaped ``LlamaForCausalLM`` (random weights; ``--layers`` of the 32 to fit
the time budget) in bf16 on the GPU, compiles it with ``backend="fp4"``, runs one forward, and
reports ``torch.cuda.memory_allocated`` before and after (the bf16 copies of quantized layers
are released), the bytes of the quantized layers before and after, and the compile time.

    python benchmarks/bench_memory.py [--layers 4] [--format nvfp4]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fp4compile
from fp4compile.report import layer_records

SHAPES = json.loads((Path(__file__).parent / "shapes.json").read_text())


def llama3_8b_config(layers: int) -> LlamaConfig:
    shapes = SHAPES["linear"]["llama3-8b"]
    hidden = shapes["o"][0]
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=shapes["down"][1], num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--format", default="nvfp4", choices=["nvfp4", "mxfp4"])
    args = parser.parse_args()
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama3_8b_config(args.layers)).to(torch.bfloat16).eval()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    ids = torch.randint(0, 128256, (1, 16), device="cuda")
    with torch.no_grad():
        start = time.perf_counter()
        torch.compile(model, backend="fp4", options={"format": args.format})(ids)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    torch.cuda.empty_cache()
    after = torch.cuda.memory_allocated()
    quantized = [r for r in layer_records(model) if r.skipped is None]
    bf16_bytes = sum(r.bytes_before for r in quantized)
    fp4_bytes = sum(r.bytes_after for r in quantized)
    print(fp4compile.report(model).splitlines()[-1])
    print(f"| {torch.cuda.get_device_name()} | Llama-3-8B shapes, {args.layers} layers | {args.format} "
          f"| {bf16_bytes / 2**30:.3f} GiB -> {fp4_bytes / 2**30:.3f} GiB ({fp4_bytes / bf16_bytes:.3f}x) "
          f"| {before / 2**30:.3f} GiB -> {after / 2**30:.3f} GiB (freed {(before - after) / 2**30:.3f} GiB, "
          f"expected {(bf16_bytes - fp4_bytes) / 2**30:.3f}) | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
