"""fp4 MoE experts (``fp4::moe`` on CUDA) against the physical floor and bf16, in one GPU run.

For each MoE shape in shapes.json (one layer, all E experts, random weights) and each token
count, routing comes from random logits (softmax, top-k, renormalized). Times, as CUDA-graph
replays cycling through enough routing sets that the touched experts exceed the L2:

- ``fp4::moe`` for MXFP4/NVFP4 x W4A16/W4A4 (its weights quantized from the bf16 ones), checked
  against the reference on the same routing first;
- the **floor**: bytes of the fp4 experts the routing touches (codes and scales of each distinct
  expert, both projections) plus the hidden states in and the output out, over the device copy
  bandwidth measured in the same run;
- **bf16 grouped GEMM**: ``torch._grouped_mm`` for gate/up and down with the tokens already sorted
  by expert, and SiLU-and-multiply between (the issue's 4096-token baseline);
- **HF bf16**: transformers' own experts (``Qwen3MoeExperts`` at the shape; ``grouped_mm`` and
  ``batched_mm``), the faster of the two; eager timing (its dispatch syncs with the host, so it
  cannot be captured), ``OOM`` where ``batched_mm``'s per-token weight copies do not fit.

Prints a markdown table (us; fp4 columns also as a multiple of the floor) and the expert memory
of each format against bf16.

``--implementations`` (issue 7) instead times MXFP4 W4A4 ``fp4::moe`` forced to each
implementation and left to the chooser, against the bf16 grouped GEMM (``implementations.py``).

    python benchmarks/bench_moe.py [--tokens 1,16,128,4096] [--models qwen3-30b-a3b,...]
    python benchmarks/bench_moe.py --implementations [--tokens 16,128,4096]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import fp4compile  # noqa: F401  (registers torch.ops.fp4)
from fp4compile.formats import QuantizedTensor
from fp4compile.formats.moe import moe_reference
from fp4compile.formats.nvfp4 import nvfp4_global_scale
from fp4compile.kernels.cutlass.hopper import weight_to_e4m3
from fp4compile.kernels.triton import fp4_quantize
from fp4compile.ops.moe import choice_prefix
from implementations import COLUMNS, cells, check_auto_runs, forced, picked, report, use_fresh_choice_cache
from timing import ROTATE_BYTES, relative_error, time_interleaved_ms, time_ms

SHAPES = json.loads((Path(__file__).parent / "shapes.json").read_text())["moe"]
VARIANTS = [("mxfp4", "none"), ("nvfp4", "none"), ("mxfp4", "fp4"), ("nvfp4", "fp4")]
NAMES = {v: f"{v[0]} {'W4A4' if v[1] == 'fp4' else 'W4A16'}" for v in VARIANTS}
EXPERT_CHUNK = 8


def hf_experts(shape: dict):
    """transformers' Qwen3-MoE experts module at ``shape``, bf16 on the GPU, random weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=shape["H"], moe_intermediate_size=shape["I"], num_experts=shape["E"],
                            num_experts_per_tok=shape["top_k"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            experts = Qwen3MoeExperts(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=shape["H"] ** -0.5)
        experts.down_proj.normal_(std=shape["I"] ** -0.5)
    return experts, config


def quantize_experts(weight: torch.Tensor, fmt: str) -> QuantizedTensor:
    """(E, N, K) bf16 -> fp4 with one global scale for the tensor, a few experts at a time (the
    quantize kernel, bit for bit the reference) so that no float32 copy of it is ever made."""
    chunks = range(0, weight.shape[0], EXPERT_CHUNK)
    # The tensor's global scale, from its amax taken chunk by chunk (the largest chunk scale).
    gs = torch.stack([nvfp4_global_scale(weight[e:e + EXPERT_CHUNK]) for e in chunks]).max() if fmt == "nvfp4" else None
    parts = [fp4_quantize(weight[e:e + EXPERT_CHUNK], fmt, gs) for e in chunks]
    packed = torch.cat([p[0] for p in parts])
    scales = torch.cat([p[1] for p in parts])
    return QuantizedTensor(packed, scales, parts[0][2], fmt)


def routing_sets(tokens: int, shape: dict, expert_bytes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Routings from random logits, enough that the experts they touch exceed ``ROTATE_BYTES``."""
    sets = []
    touched = 0
    while len(sets) < 2 or (touched < ROTATE_BYTES and len(sets) < 16):
        logits = torch.randn(tokens, shape["E"], device="cuda")
        weights, ids = torch.topk(logits.softmax(-1), shape["top_k"], dim=-1)
        sets.append((ids, weights / weights.sum(-1, keepdim=True)))
        touched += ids.unique().numel() * expert_bytes
    return sets


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the floor's denominator."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_ms(lambda i: dst.copy_(src), 1, True) * 1e-3)


def grouped_mm_bf16(experts, sets: list, hidden: torch.Tensor):
    """A call per routing set of the bf16 grouped GEMMs on pre-sorted tokens (sorting outside)."""
    prepared = []
    for ids, weights in sets:
        order = ids.reshape(-1).argsort()
        tokens = order // ids.shape[1]
        counts = torch.bincount(ids.reshape(-1), minlength=experts.gate_up_proj.shape[0])
        prepared.append((hidden[tokens], torch.cumsum(counts, 0).to(torch.int32)))

    def call(i: int):
        x, offsets = prepared[i]
        gate, up = torch._grouped_mm(x, experts.gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, experts.down_proj.transpose(-2, -1), offs=offsets)
    return call


def hf_time(experts, config, sets: list, hidden: torch.Tensor) -> tuple[float, str]:
    """The faster of transformers' grouped_mm and batched_mm experts (eager), in ms."""
    best = (float("inf"), "OOM")
    for implementation in ("grouped_mm", "batched_mm"):
        config._experts_implementation = implementation
        try:
            with torch.no_grad():
                t = time_ms(lambda i: experts(hidden, sets[i][0], sets[i][1].to(hidden.dtype)), len(sets), graph=False)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            continue
        best = min(best, (t, implementation))
    return best


def fp4_call(q: dict, fmt: str, act_mode: str, sets: list, hidden: torch.Tensor):
    gate_up, down = q[fmt]

    def call(i: int):
        ids, weights = sets[i]
        return torch.ops.fp4.moe(hidden, ids, weights, gate_up.packed, gate_up.scales, gate_up.global_scale,
                                 down.packed, down.scales, down.global_scale, None, None, fmt, act_mode, "silu", 1.0, 1.0)
    return call


def implementations_table(token_counts: list[int], models: list[str]) -> None:
    """``--implementations``: MXFP4 W4A4 ``fp4::moe`` per implementation and auto, each checked on
    the first 64 tokens against ``moe_reference`` (the op's float32 definition) and against the
    reference that rounds the gate/up product to bf16 as the grouped fp8 GEMM does; graph replays
    interleaved with the bf16 grouped GEMM."""
    print("\n| model | tokens | bf16 grouped_mm us | " + " | ".join(f"{c} us (x bf16)" for c in COLUMNS)
          + " | auto chose | regret | error cutlass vs reference (vs bf16-projection reference) | error triton |")
    print("|---" * (7 + len(COLUMNS)) + "|")
    rows = []
    for model in models:
        rows += _implementation_rows(model, token_counts)
        torch.cuda.empty_cache()
    report("fp4::moe MXFP4 W4A4", rows, "bf16 grouped_mm")


def _implementation_rows(model: str, token_counts: list[int]) -> list[dict]:
    """``implementations_table``'s rows of one model, one per token count (printed as they come)."""
    shape = SHAPES[model]
    experts, _ = hf_experts(shape)
    gate_up, down = (quantize_experts(w.data, "mxfp4") for w in (experts.gate_up_proj, experts.down_proj))
    e4m3 = (*weight_to_e4m3(gate_up.packed, gate_up.scales), *weight_to_e4m3(down.packed, down.scales))
    rows = []
    for tokens in token_counts:
        hidden = torch.randn(tokens, shape["H"], device="cuda", dtype=torch.bfloat16)
        sets = routing_sets(tokens, shape, ROTATE_BYTES)[:1]  # one routing: the experts exceed the L2 by far
        ids, weights = sets[0]
        timed = {"base": grouped_mm_bf16(experts, sets, hidden)}
        checked = min(tokens, 64)
        refs = [moe_reference(hidden[:checked], ids[:checked], weights[:checked], gate_up, down, None, None, "fp4",
                              "silu", 1.0, 0.0, dtype).double() for dtype in (torch.float32, torch.bfloat16)]
        errors = {}
        for column in COLUMNS:
            implementation, with_e4m3 = forced(column)

            def call(i, implementation=implementation, with_e4m3=with_e4m3, head=slice(None)):
                return torch.ops.fp4.moe(hidden[head], ids[head], weights[head], *gate_up[:3], *down[:3], None, None,
                                         "mxfp4", "fp4", "silu", 1.0, 0.0, implementation,
                                         *(e4m3 if with_e4m3 else ()))

            call(0)  # auto: the chooser measures at the timed size
            errors[column] = [relative_error(call(0, head=slice(0, checked)), ref) for ref in refs]
            assert min(errors[column]) < 2e-2, f"{model} {column} T={tokens}: relative errors {errors[column]}"
            timed[column] = call
        prefix = choice_prefix("mxfp4", "fp4", shape["E"], shape["H"], shape["I"], shape["top_k"])
        row = {"size": tokens, "pick": picked(prefix, tokens)}
        check_auto_runs(row["pick"], timed)
        row.update(time_interleaved_ms(timed, 1))
        rows.append(row)
        print(f"| {model} | {tokens} | {row['base'] * 1e3:.1f} | " + " | ".join(cells(row))
              + f" | {errors['cutlass'][0]:.1e} ({errors['cutlass'][1]:.1e}) | {errors['triton'][0]:.1e} |",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,128,4096")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--implementations", action="store_true", help="the implementation comparison (issue 7)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.implementations:
        use_fresh_choice_cache()
        implementations_table(list(map(int, args.tokens.split(","))), args.models.split(","))
        return
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print("| model | tokens | floor us (mxfp4 / nvfp4) | " + " | ".join(f"{NAMES[v]} us (x floor)" for v in VARIANTS)
          + " | bf16 grouped_mm us | fp4 best x grouped_mm | HF bf16 us (impl) | fp4 best x HF |")
    print("|---" * (7 + len(VARIANTS)) + "|")
    memory = []
    for model in args.models.split(","):
        shape = SHAPES[model]
        experts, config = hf_experts(shape)
        q = {fmt: (quantize_experts(experts.gate_up_proj.data, fmt), quantize_experts(experts.down_proj.data, fmt))
             for fmt in ("mxfp4", "nvfp4")}
        bf16_bytes = (experts.gate_up_proj.numel() + experts.down_proj.numel()) * 2
        for fmt, (gate_up, down) in q.items():
            fp4_bytes = sum(t.numel() * t.element_size() for w in (gate_up, down)
                            for t in (w.packed, w.scales, w.global_scale))
            memory.append((model, fmt, fp4_bytes, bf16_bytes))
        per_expert = {fmt: sum(w.packed[0].numel() + w.scales[0].numel() for w in q[fmt]) for fmt in q}
        for tokens in map(int, args.tokens.split(",")):
            hidden = torch.randn(tokens, shape["H"], device="cuda", dtype=torch.bfloat16)
            sets = routing_sets(tokens, shape, per_expert["nvfp4"])
            touched = sum(ids.unique().numel() for ids, _ in sets) / len(sets)
            floor = {fmt: (touched * per_expert[fmt] + 2 * hidden.numel() * 2) / bandwidth * 1e3 for fmt in q}
            row = {}
            for fmt, act_mode in VARIANTS:
                call = fp4_call(q, fmt, act_mode, sets, hidden)
                checked = min(tokens, 64)
                ids, weights = sets[0]
                y = fp4_call(q, fmt, act_mode, [(ids[:checked], weights[:checked])], hidden[:checked])(0)
                ref = moe_reference(hidden[:checked], ids[:checked], weights[:checked], *q[fmt], None, None, act_mode,
                                    "silu", 1.0, 1.0)
                error = relative_error(y, ref.double())
                assert error < 2e-2, f"{model} {fmt}/{act_mode} T={tokens}: relative error {error:.2e}"
                row[(fmt, act_mode)] = time_ms(call, len(sets), graph=True)
            grouped = time_ms(grouped_mm_bf16(experts, sets, hidden), len(sets), graph=True)
            hf, hf_impl = hf_time(experts, config, sets, hidden)
            best = min(row.values())
            cells = [f"{row[v] * 1e3:.1f} ({row[v] / floor[v[0]]:.1f}x)" for v in VARIANTS]
            hf_cell = f"{hf * 1e3:.0f} ({hf_impl})" if hf_impl != "OOM" else "OOM"
            print(f"| {model} | {tokens} | {floor['mxfp4'] * 1e3:.1f} / {floor['nvfp4'] * 1e3:.1f} | " + " | ".join(cells)
                  + f" | {grouped * 1e3:.1f} | {grouped / best:.2f}x | {hf_cell} | "
                  + (f"{hf / best:.1f}x |" if hf_impl != "OOM" else "- |"), flush=True)
            del sets, hidden
        del experts, q
        torch.cuda.empty_cache()
    print("\nExpert weight memory (codes + scales + global scale) against bf16")
    print("| model | format | fp4 MB | bf16 MB | ratio |\n|---|---|---|---|---|")
    for model, fmt, fp4_bytes, bf16_bytes in memory:
        print(f"| {model} | {fmt} | {fp4_bytes / 2**20:.0f} | {bf16_bytes / 2**20:.0f} | {fp4_bytes / bf16_bytes:.3f} |")


if __name__ == "__main__":
    main()
