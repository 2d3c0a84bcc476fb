"""Every Triton kernel compiles for sm_90 (Hopper) without spilling registers, checked on CPU.

The interpreter tests check what the kernels compute; these check that the GPU compiler accepts
them and that none spills registers (spills cost these register-bound kernels their speed),
for the launches the op wrappers make (``tests/sm90.py`` says how). They run in CPU CI, so a
session without a GPU still catches a kernel that would not build on one.
"""

import pytest

from sm90 import compile_launches, tools_missing

pytestmark = pytest.mark.skipif(tools_missing() is not None, reason=str(tools_missing()))

_WEIGHTS = """
import torch
from fp4compile.formats import quantize
generator = torch.Generator().manual_seed(0)
def weight(*shape, fmt):
    return quantize(torch.randn(*shape, generator=generator) / shape[-1] ** 0.5, fmt)
def activation(*shape):
    return torch.randn(*shape, generator=generator).bfloat16()
"""

LINEAR = _WEIGHTS + """
from fp4compile.kernels.triton.linear import fp4_linear
for fmt in ("mxfp4", "nvfp4"):
    for k in (4096, 4128):  # 4128: K tiles that do not divide K
        w = weight(1024, k, fmt=fmt)
        for act_mode in ("fp4", "none"):
            for m in (1, 16, 32, 64, 128, 256):  # every M bucket of the dispatch and of choose_config
                fp4_linear(activation(m, k), w.packed, w.scales, w.global_scale, None, None, fmt, act_mode)
w = weight(1536, 4096, fmt="nvfp4")
fp4_linear(activation(1, 4096), w.packed, w.scales, torch.rand(1536), None, torch.zeros(1536, dtype=torch.bfloat16),
           "nvfp4", "fp4")  # a fused projection: one global scale per row, and a bias
"""

MOE = _WEIGHTS + """
from fp4compile.kernels.triton.moe import fp4_moe
experts, hidden, inter, top_k = 8, 2048, 768, 4
for fmt in ("mxfp4", "nvfp4"):
    gate_up, down = weight(experts, 2 * inter, hidden, fmt=fmt), weight(experts, hidden, inter, fmt=fmt)
    for act_mode in ("fp4", "none"):
        for tokens in (1, 16, 512):  # one slot per M tile; dispatched by expert: decode and prefill tiles
            ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
            fp4_moe(activation(tokens, hidden), ids, torch.rand(tokens, top_k), gate_up.packed, gate_up.scales,
                    gate_up.global_scale, down.packed, down.scales, down.global_scale,
                    torch.zeros(experts, 2 * inter), torch.zeros(experts, hidden), fmt, act_mode,
                    "clamped_swiglu" if tokens > 1 else "swiglu", 1.702, 7.0)
"""

FP8 = _WEIGHTS + """
from fp4compile.kernels.cutlass import hopper
from fp4compile.kernels.triton.fp8 import fp8_linear
torch._scaled_mm = lambda a, b, *args, out_dtype, **kwargs: torch.empty(a.shape[0], b.shape[1], dtype=out_dtype)
torch._scaled_grouped_mm = lambda a, b, *args, out_dtype, **kwargs: torch.empty(a.shape[0], b.shape[-1],
                                                                                   dtype=out_dtype)
w = weight(1024, 4096, fmt="mxfp4")
fp8_linear(activation(512, 4096), w.packed, w.scales, w.global_scale, None, torch.bfloat16)
hopper.scaled_mm_linear(activation(512, 4096), w.packed, w.scales, w.global_scale, None, None)
experts, hidden, inter = 8, 2048, 768
gate_up, down = weight(experts, 2 * inter, hidden, fmt="mxfp4"), weight(experts, hidden, inter, fmt="mxfp4")
ids = torch.stack([torch.randperm(experts, generator=generator)[:4] for _ in range(64)])
hopper.scaled_grouped_mm_moe(activation(64, hidden), ids, torch.rand(64, 4), gate_up[:3],
                             down[:3], None, None, "swiglu", 1.702, 7.0)
"""


KNOWN_SPILLS = [
    # (kernel, constexprs that identify the launch, bytes spilled when this test was written)
    ("_fp4_gemm_kernel", {"IS_MXFP4": "False", "BLOCK_M": "128"}, 80),  # NVFP4 at M=65-128 (wgmma tile)
    ("_gate_up_kernel", {"BLOCK_M": "128"}, 504),  # MoE prefill tile (128x128, 8 warps), most with a bias
    ("_down_kernel", {"IS_MXFP4": "True", "HAS_BIAS": "True", "DIRECT": "False"}, 8),
]
"""Launches that spilled when this check was written (``benchmarks/RESULTS.md``, 2026-11-23, says
where in the kernel): they may spill up to the bytes given, no more; a change that removes a
spill should remove its entry."""


def _spill_allowance(stats) -> int:
    for name, constexprs, ceiling in KNOWN_SPILLS:
        if stats.name == name and all(stats.constexprs.get(k) == v for k, v in constexprs.items()):
            return ceiling
    return 0


@pytest.mark.parametrize(("calls", "kernels"), [
    (LINEAR, {"_fp4_gemm_kernel", "_quantize_kernel", "_finite_amax_kernel"}),
    (MOE, {"_gate_up_kernel", "_down_kernel", "_combine_kernel", "_dispatch_small_kernel", "_quantize_kernel"}),
    (FP8, {"_rows_to_fp8_kernel", "_weight_to_fp8_kernel", "_fp8_gemm_kernel"}),
], ids=["linear", "moe", "fp8"])
def test_kernels_compile_for_hopper_without_spills(calls, kernels):
    compiled = compile_launches(calls)
    assert kernels <= {stats.name for stats in compiled}, "a kernel these calls launch was not compiled"
    spilled = [stats.line() for stats in compiled if stats.spill_bytes > _spill_allowance(stats)]
    assert not spilled, "kernels that spill registers on sm_90:\n" + "\n".join(spilled)


def test_the_check_sees_spills():
    """A tile far too large for the registers spills, and the check reports it (it can fail)."""
    calls = _WEIGHTS + """
from fp4compile.kernels.triton.gemm import GemmConfig, fp4_gemm
w = weight(256, 1024, fmt="nvfp4")
fp4_gemm(activation(256, 1024), w.packed, w.scales, w.global_scale, None, "nvfp4", torch.bfloat16,
         config=GemmConfig(128, 256, 256, 2, 3))
"""
    (stats,) = compile_launches(calls)
    assert stats.name == "_fp4_gemm_kernel" and stats.spill_bytes > 1000
