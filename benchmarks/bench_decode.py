"""Whole-model decoding of fp4-compiled HF models against bf16, under CUDA graphs, in one GPU run.

Models are transformers classes built from configs with random weights (no downloads), in bf16
on the GPU: ``llama3-8b`` (``LlamaForCausalLM`` with Llama-3-8B's shape) and ``qwen3-30b-a3b``
(``Qwen3MoeForCausalLM`` with Qwen3-30B-A3B's shape; ``--layers`` keeps the first N of its 48
layers when memory or time requires, and the table says so).

Each variant gets a fresh model (fp4 compilation releases the bf16 weights), compiled in place
with CUDA graphs: bf16 with ``model.compile(mode="reduce-overhead")`` (Inductor), fp4 with
``model.compile(backend=fp4compile.backend(cfg), mode="reduce-overhead")``. It then decodes with
``generate(cache_implementation="static", prefill_chunk_size=prompt, disable_compile=True)``:
greedy, a random prompt of ``--prompt`` tokens per sequence, exactly ``--new`` new tokens, the
static cache sized once and allocated before the first forward (``prefill_chunk_size`` does that;
a cache allocated inside the compiled prefill would live in CUDA-graph memory).
Per batch size:

- **decode tok/s** = batch * (new - 1) / (t(new) - t(1)), where t(k) is the median time of a warm
  ``generate`` of k new tokens (prefill and HF's per-step Python included, as a user sees it);
- **step ms** = the wall time of one decode step, (t(new) - t(1)) / (new - 1), and **GPU ms**, the
  kernel time of one step (torch.profiler's sum over kernels, CUDA-graph replays included, of a
  17-token ``generate`` minus a 1-token one, over 16): the difference is host time the GPU waits
  for (HF's per-step Python, guards, CUDA-graph launch);
- **TTFT** = t(1): prefill plus the first token;
- **compile s**: the first ``generate`` minus a warm one (tracing, quantizing, Inductor, graph
  recording); at the first batch size it covers the prefill and decode graphs;
- **logits err**: relative L2 of the first generated token's logits against the bf16 model's on
  the same prompt (same weights: every variant is built from the same seed);
- **stop check** (``--stop-check``, one or both, comma-separated: both time the same compiled
  model one after the other, so the pair differs only in the check): ``sync``, transformers'
  default on CUDA, reads "are all sequences done?" on the host after every step, so the host waits for each step's kernels
  before it queues the next and its per-step time (HF's Python, guards, graph launch) adds to the
  GPU's. ``deferred`` turns on transformers' own ``DeferredStopCheck`` for CUDA (5.17 enables it
  on MPS only): the flag is read one step late, so the host queues step n+1 while the GPU runs
  step n. A sequence stopped by EOS would cost one more step, which transformers undoes; here
  every sequence runs to its token count, so none is wasted. Every variant runs with the chosen
  check (the run stops if one did not), so the ratio compares like with like;
- **weights GiB**: the bytes the model's weights occupy after compilation (fp4 codes, scales and
  global scales of quantized layers; everything else, e.g. the embeddings and the bf16 LM head,
  at its size), against bf16; **peak GiB**: ``max_memory_allocated`` (the most memory allocated
  at once) during the warm runs.

    python benchmarks/bench_decode.py --model llama3-8b [--batches 1,16] [--variants bf16,nvfp4-w4a16,...]
        [--stop-check sync,deferred] [--kernels 45]

``--kernels N`` prints the N costliest kernels of one decode step (the profile behind "GPU ms"),
which is how RESULTS.md splits a step into layer GEMMs, LM head, attention and the rest.
"""

import argparse
import contextlib
import gc
import statistics
import time
from dataclasses import dataclass

import torch

import fp4compile
from fp4compile import Fp4Config, quantized_weights
from fp4compile.report import layer_records

MODELS = {
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                rope_theta=500000.0, max_position_embeddings=8192)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                        vocab_size=151936, max_position_embeddings=32768)),
}
VARIANTS = {
    "bf16": None,
    "mxfp4-w4a16": Fp4Config(format="mxfp4"),
    "nvfp4-w4a16": Fp4Config(format="nvfp4"),
    "mxfp4-w4a4": Fp4Config(format="mxfp4", act_mode="fp4"),
    "nvfp4-w4a4": Fp4Config(format="nvfp4", act_mode="fp4"),
    # The same without Fp4Config.fuse_projections (q/k/v and gate/up as separate GEMMs), to measure it.
    "nvfp4-w4a16-unfused": Fp4Config(format="nvfp4", fuse_projections=False),
    "mxfp4-w4a4-unfused": Fp4Config(format="mxfp4", act_mode="fp4", fuse_projections=False),
}
REPEATS = 3


@dataclass
class Row:
    """One variant at one batch size (units in the names; see the module docstring)."""

    variant: str
    batch: int
    stop_check: str
    tokens_per_s: float
    step_ms: float
    gpu_step_ms: float
    ttft_ms: float
    compile_s: float
    logits_error: float
    weights_gib: float
    peak_gib: float


def build(model_name: str, layers: int | None):
    """The model at its real shape (``layers`` of them if given), bf16 on the GPU, seed 0."""
    import transformers

    kind, fields = MODELS[model_name]
    config = transformers.AutoConfig.for_model(kind, **{**fields, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes of the model's weights as they are now: quantized ones at their fp4 size."""
    total = sum(r.bytes_after for r in layer_records(model) if r.skipped is None)
    for param in model.parameters():
        if quantized_weights.lookup(param) is None or not quantized_weights.is_released(param):
            total += param.numel() * param.element_size()
    return total


@contextlib.contextmanager
def deferred_stop_checks(device_type: str = "cuda"):
    """transformers' ``DeferredStopCheck`` enabled for ``device_type`` (it is for MPS only), by
    asking its own capability check as if the device were MPS; yields the number of decoding
    loops that used it so far (a list of one int), for the caller to check it took effect."""
    from transformers.generation import utils

    check = getattr(utils, "DeferredStopCheck", None)
    if check is None:
        raise SystemExit("--stop-check deferred needs transformers' DeferredStopCheck (transformers >= 5.17)")
    original_is_supported, original_init = check.__dict__["is_supported"], check.__init__
    used = [0]

    def is_supported(device, *args, **kwargs):
        return original_is_supported.__func__(torch.device("mps") if device.type == device_type else device, *args,
                                              **kwargs)

    def init(self, *args, **kwargs):
        used[0] += 1
        original_init(self, *args, **kwargs)

    check.is_supported, check.__init__ = staticmethod(is_supported), init
    try:
        yield used
    finally:
        check.is_supported, check.__init__ = original_is_supported, original_init


def generate(model, prompt: torch.Tensor, new_tokens: int, cache_length: int, logits: bool = False):
    """Greedy ``generate`` of exactly ``new_tokens``: its seconds, or (``logits``) the first new
    token's logits. The cache is not returned (``return_dict_in_generate`` off), as a deferred stop
    check needs for a static cache, which it cannot roll back."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                         max_cache_len=cache_length, prefill_chunk_size=prompt.shape[1], disable_compile=True,
                         pad_token_id=0, return_dict_in_generate=logits, output_logits=logits)
    torch.cuda.synchronize()
    return out.logits[0].float() if logits else time.perf_counter() - start


def kernel_times(model, prompt: torch.Tensor, new_tokens: int, cache_length: int) -> dict[str, float]:
    """GPU microseconds of one ``generate`` per kernel name (as torch.profiler records them, CUDA-graph
    replays included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        generate(model, prompt, new_tokens, cache_length)
    return {event.key: event.self_device_time_total for event in profile.key_averages()}


def decode_step_kernels(model, prompt: torch.Tensor, cache_length: int, steps: int = 16) -> dict[str, float]:
    """GPU microseconds per decode step, by kernel: a ``steps + 1``-token ``generate`` minus a
    1-token one (prefill, first token and set-up cancel), over ``steps``."""
    longer = kernel_times(model, prompt, steps + 1, cache_length)
    shorter = kernel_times(model, prompt, 1, cache_length)
    return {name: (us - shorter.get(name, 0.0)) / steps for name, us in longer.items()}


def kernel_table(per_step: dict[str, float], rows: int) -> str:
    """The ``rows`` costliest kernels of a decode step, with their share of the step."""
    total = sum(per_step.values())
    ranked = sorted(per_step.items(), key=lambda item: item[1], reverse=True)[:rows]
    return "\n".join([f"  decode step: {total:.1f} us of kernels"]
                     + [f"  {us:9.1f} us {us / total:6.1%}  {name[:110]}" for name, us in ranked])


def stop_check(name: str):
    """A context for ``generate`` with the named stop check; it yields a ``used`` counter (a list
    of one int) that each deferred generate must raise, or None for ``sync``."""
    return deferred_stop_checks() if name == "deferred" else contextlib.nullcontext()


def run_variant(args, variant: str, reference_logits: dict[int, torch.Tensor]) -> list[Row]:
    """Build, compile and time one variant at every batch size and stop check; bf16 fills
    ``reference_logits``. The first check's first generate compiles, so "compile s" is its."""
    model = build(args.model, args.layers)
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    config = VARIANTS[variant]
    if config is None:
        model.compile(mode="reduce-overhead")
    else:
        model.compile(backend=fp4compile.backend(config), mode="reduce-overhead")
    cache_length = args.prompt + args.new
    rows = []
    with torch.no_grad():
        for batch in args.batches:
            prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt),
                                   generator=torch.Generator().manual_seed(batch)).cuda()
            timings = {}  # stop check -> (first, full, short) seconds
            for check in args.stop_check:
                with stop_check(check) as used:
                    used_before = used[0] if used else 0
                    first = generate(model, prompt, args.new, cache_length)
                    if used is not None and used[0] == used_before:
                        raise SystemExit(f"{variant}: generate did not use the deferred stop check")
                    if not timings:  # the peak of decoding, not of compiling (the bf16 weights are alive then)
                        torch.cuda.reset_peak_memory_stats()
                    full = statistics.median(generate(model, prompt, args.new, cache_length) for _ in range(REPEATS))
                    short = statistics.median(generate(model, prompt, 1, cache_length) for _ in range(REPEATS))
                timings[check] = first, full, short
            compile_s = timings[args.stop_check[0]][0] - timings[args.stop_check[0]][1]
            logits = generate(model, prompt, 1, cache_length, logits=True)
            if variant == "bf16":
                reference_logits[batch] = logits
            error = ((logits - reference_logits[batch]).norm() / reference_logits[batch].norm()).item() \
                if batch in reference_logits else float("nan")
            peak = torch.cuda.max_memory_allocated() / 2**30
            per_step = decode_step_kernels(model, prompt, cache_length)
            gpu_step = sum(per_step.values()) / 1e6
            if args.kernels:
                print(kernel_table(per_step, args.kernels), flush=True)
            weights_gib = weight_bytes(model) / 2**30
            for check, (_, full, short) in timings.items():
                row = Row(variant, batch, check, batch * (args.new - 1) / (full - short),
                          (full - short) / (args.new - 1) * 1e3, gpu_step * 1e3, short * 1e3, compile_s, error,
                          weights_gib, peak)
                print(f"  {variant} batch {batch}, {check} stop check: {row.tokens_per_s:.1f} tok/s, step "
                      f"{row.step_ms:.2f} ms (GPU {row.gpu_step_ms:.2f}), TTFT {row.ttft_ms:.1f} ms, compile "
                      f"{row.compile_s:.1f} s, logits err {error:.4f}, weights {row.weights_gib:.2f} GiB "
                      f"(bf16 {bf16_bytes / 2**30:.2f}), peak {row.peak_gib:.2f} GiB", flush=True)
                rows.append(row)
    del model
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return rows


def table(args, rows: list[Row]) -> str:
    """The markdown table of ``rows`` for RESULTS.md, with each ratio against bf16 at the same
    batch size and stop check."""
    base = {(r.batch, r.stop_check): r for r in rows if r.variant == "bf16"}
    layers = f", {args.layers} of its layers" if args.layers else ""
    lines = [f"{args.model}{layers}; prompt {args.prompt}, {args.new} new tokens; "
             f"{torch.cuda.get_device_name()}",
             "",
             "| variant | batch | stop check | decode tok/s | vs bf16 | step ms | GPU ms | TTFT ms | compile s "
             "| logits err | weights GiB | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reference = base.get((r.batch, r.stop_check))
        ratio = f"{r.tokens_per_s / reference.tokens_per_s:.2f}x" if reference else "-"
        lines.append(f"| {r.variant} | {r.batch} | {r.stop_check} | {r.tokens_per_s:.1f} | {ratio} | {r.step_ms:.2f} "
                     f"| {r.gpu_step_ms:.2f} | {r.ttft_ms:.1f} | {r.compile_s:.1f} "
                     f"| {r.logits_error:.4f} | {r.weights_gib:.2f} | {r.peak_gib:.2f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run bf16 then every fp4 variant, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 16])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--kernels", type=int, default=0,
                        help="print the N costliest kernels of a decode step (GPU us per step)")
    parser.add_argument("--stop-check", type=lambda s: s.split(","), default=["sync"],
                        help="how generate decides to stop: sync, deferred or both (see the module docstring)")
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    checks = args.stop_check
    if not checks or set(checks) - {"sync", "deferred"} or len(set(checks)) < len(checks):
        parser.error(f"--stop-check takes sync, deferred or both, each once; got {args.stop_check}")
    if args.variants[0] != "bf16":
        parser.error("the first variant must be bf16: every ratio and logits error is against it, in the same run")
    reference_logits: dict[int, torch.Tensor] = {}
    rows = []
    for variant in args.variants:
        print(f"{variant}:", flush=True)
        rows += run_variant(args, variant, reference_logits)
    print(table(args, rows))


if __name__ == "__main__":
    main()
