"""Greedy decoding of an fp4-compiled transformers model, under CUDA graphs on a GPU.

Builds a small Llama-architecture model from a config (random weights, nothing downloaded; pass
``--pretrained NAME`` to load a checkpoint instead), compiles it in place with the fp4 backend and
``mode="reduce-overhead"`` and decodes with a static cache. On the CPU the same code runs without
CUDA graphs (reference ops: slow but exact).

    python examples/generate.py [--pretrained NAME] [--format nvfp4|mxfp4] [--new-tokens 32]
"""

import argparse
import time

import torch
import transformers

import fp4compile
from fp4compile import Fp4Config


def build(pretrained: str | None, device: str) -> torch.nn.Module:
    """The checkpoint ``pretrained``, or a 2-layer Llama with random weights, bf16 on ``device``."""
    if pretrained:
        return transformers.AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.bfloat16).to(device).eval()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    return transformers.LlamaForCausalLM(config).to(device, torch.bfloat16).eval()


def main() -> None:
    """Compile, decode twice (the first call compiles), print the timings, tokens and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default=None, help="a Hugging Face model name or path")
    parser.add_argument("--format", default="nvfp4", choices=["nvfp4", "mxfp4"])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args.pretrained, device)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)

    # In place, so generate() calls the compiled model; a backend object carries the fp4 settings
    # (torch.compile takes mode= or options=, not both).
    model.compile(backend=fp4compile.backend(Fp4Config(format=args.format)), mode="reduce-overhead")
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=model.config.eos_token_id, cache_implementation="static",
                    max_cache_len=prompt.shape[1] + args.new_tokens,  # fixed: the decode graph never recompiles
                    prefill_chunk_size=prompt.shape[1],  # the cache is allocated outside the CUDA graphs
                    disable_compile=True)  # already compiled: no second torch.compile around it
    with torch.no_grad():
        for run in ("first (compiles)", "second"):
            start = time.perf_counter()
            tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), **generate)
            seconds = time.perf_counter() - start
            print(f"{run}: {args.new_tokens} tokens in {seconds:.2f} s")
    print("tokens:", tokens[0, prompt.shape[1]:].tolist())
    print(fp4compile.report(model))


if __name__ == "__main__":
    main()
