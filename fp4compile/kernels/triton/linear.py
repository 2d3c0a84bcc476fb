"""``fp4::linear`` on CUDA: the kernel for each M bucket, chosen per call from the shape.

- M <= ``LARGE_M``: ``gemm.fp4_gemm``, every row in one M tile (each weight tile decoded once),
  K split over programs when the N tiles alone cannot fill the GPU (decode sizes).
- M > ``LARGE_M``: compute-bound. MXFP4 W4A4 runs on fp8 tensor cores (``fp8.fp8_linear``, twice
  the bf16 rate; the same through CUTLASS is ``kernels.cutlass``, and the op times both);
  everything else dequantizes the weight to bf16 in chunks and calls cuBLAS
  (``dequantize.dequantize_linear``), which beats decoding tiles inside the GEMM there.

W4A4 other than the fp8 path quantizes the activation first (``fp4_fake_quantize``: the exact
``e2m1 * scale`` values in bf16) and multiplies like W4A16, with ``alpha = gs_a * gs_w`` formed
inside the GEMM. Quantizing inside the GEMM's K loop instead (no separate launch) was measured
slower at every decode size (``benchmarks/RESULTS.md``).
"""

import torch

from ...formats.spec import MXFP4, get_format
from .codecs import check_offsets
from .dequantize import dequantize_linear
from .fp8 import fp8_linear
from .gemm import fp4_gemm
from .quantize import fp4_fake_quantize
from .target import KernelTarget, kernel_target

LARGE_M = 128
"""Above this many rows the compute-bound paths (fp8, or dequantize + cuBLAS) take over: measured
faster at M=256, 512 and 4096 (``benchmarks/RESULTS.md``; between 128 and 256 not measured)."""


def kernel_plan(fmt: str, act_mode: str, device: torch.device) -> str:
    """Which kernel runs at which M for this format and mode on ``device`` (for the layer report)."""
    target = kernel_target(device)
    return f"M<={LARGE_M} {kernel_for(1, fmt, act_mode, target)}, else {kernel_for(LARGE_M + 1, fmt, act_mode, target)}"


def kernel_for(m: int, fmt: str, act_mode: str, target: KernelTarget) -> str:
    """The kernel that ``fp4_linear`` runs for ``m`` rows on ``target``: fp8 needs fp8 tensor cores
    (compute capability 8.9 and up); the interpreter runs every M through the fp4 GEMM."""
    if m <= LARGE_M or not target.compiled:
        return "fp4-gemm"
    if get_format(fmt) is MXFP4 and act_mode == "fp4" and target.fp8_tensor_cores:
        return "fp8"
    return "dequantize+cublas"


def fp4_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    act_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    act_mode: str,
    weight_e4m3: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Triton version of ``fp4::linear`` (arguments validated by the op); ``weight_e4m3``: the
    weight's fp8 form made at compile time, for the fp8 path."""
    *lead, k = x.shape
    n = w_packed.shape[0]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    check_offsets(m, max(k, n, rows.stride(0)))
    check_offsets(n, k)
    if m == 0 or n == 0:
        return x.new_zeros((*lead, n))
    # The kernels index weights, scales and bias as dense row-major arrays (no copy when they are).
    w_packed, w_scales = w_packed.contiguous(), w_scales.contiguous()
    bias = bias.contiguous() if bias is not None else None
    target = kernel_target(x.device)
    kernel = kernel_for(m, fmt, act_mode, target)
    if kernel == "fp8":
        return fp8_linear(rows, w_packed, w_scales, w_global_scale, bias, x.dtype, weight_e4m3).reshape(*lead, n)
    w_gs = w_global_scale.reshape(-1 if w_global_scale.numel() > 1 else ()).float()
    dot_dtype = target.dot_dtype
    a_gs = None
    if act_mode == "fp4":
        rows, a_gs = fp4_fake_quantize(rows, fmt, act_global_scale, dot_dtype)
    if kernel == "dequantize+cublas":
        alpha = w_gs if a_gs is None else a_gs * w_gs
        out = dequantize_linear(rows.to(dot_dtype), w_packed, w_scales, alpha, bias, fmt).to(x.dtype)
    else:
        out = fp4_gemm(rows, w_packed, w_scales, w_gs, bias, fmt, x.dtype, a_global_scale=a_gs)
    return out.reshape(*lead, n)
