"""MXFP4 W4A4 on Hopper through PyTorch's CUTLASS fp8 GEMMs: ``torch._scaled_mm`` (linear) and
``torch._scaled_grouped_mm`` (MoE), both with row-wise float32 scales and float32 accumulation.

The operands are the exact e4m3 forms of ``kernels/triton/fp8.py`` (each row's values relative to
its largest MXFP4 group, the row scale ``2**(B - 6)`` applied after the MMA, here as CUTLASS's
row and column scales, with the weight's global scale folded into the column scales on the
device). The activation is converted per call; the weight too, unless its e4m3 form was made at
compile time (``Fp4Config(fp8_weights=True)``, which costs 1 byte per weight value).

The MoE: tokens are grouped by expert without padding (``dispatch_tokens`` with rows aligned to
1), converted to e4m3 in that order, multiplied by the grouped GEMM with the experts' cumulative
row counts as its offsets; one kernel applies SwiGLU (bias included) and converts the
intermediate, the second grouped GEMM projects down, and the combine applies the routing weights
and the down bias. Nothing reads a count on the host. The grouped GEMM writes bf16 only, so the
gate/up product is rounded to bf16 before the intermediate is re-quantized: about 3% relative L2
against the op's float32 definition at real sizes, 0.3% against a reference with the same rounding
(``moe_reference(projection_dtype=torch.bfloat16)``; ``benchmarks/RESULTS.md``).
"""

import torch

from ...formats.spec import MXFP4, get_format
from ..triton.fp8 import mxfp4_activation_to_fp8, mxfp4_routed_rows_to_fp8, mxfp4_weight_to_fp8
from ..triton.moe import combine_slots
from ..triton.moe_dispatch import dispatch_tokens

E4M3 = torch.float8_e4m3fn
E4m3Weight = tuple[torch.Tensor, torch.Tensor]
"""A weight as e4m3 bytes (..., N, K) uint8 and its row scales (..., N) float32."""


def unsupported(fmt: str, act_mode: str, op: str) -> str | None:
    """Why no fp8 GEMM here can compute ``op`` ("linear", "moe") in this format and mode, or None."""
    if get_format(fmt) is not MXFP4 or act_mode != "fp4":
        return ("only MXFP4 W4A4 is exact on fp8 tensor cores (NVFP4 values need 5 mantissa bits, W4A16 "
                "activations 8)")
    if op == "moe" and not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    return None


def shape_unsupported(x: torch.Tensor, sizes: dict[str, int]) -> str | None:
    """Why the CUTLASS fp8 GEMMs cannot take activations ``x`` and these GEMM sizes, or None."""
    if x.numel() == 0 or 0 in sizes.values():
        return "empty input or output"
    if x.dtype != torch.bfloat16:
        return f"the row-wise scaled fp8 GEMMs write bf16, the activations are {x.dtype}"
    odd = {name: size for name, size in sizes.items() if size % 16}
    if odd:
        return f"CUTLASS needs sizes that are multiples of 16, got {odd}"
    return None


def weight_to_e4m3(packed: torch.Tensor, scales: torch.Tensor) -> E4m3Weight:
    """A canonical MXFP4 weight (..., N, K/2) -> its e4m3 form (..., N, K) and row scales (..., N),
    converted in chunks of rows that the conversion kernel's 32-bit offsets can address (all the
    experts of a large MoE are more)."""
    *lead, n, half_k = packed.shape
    rows, groups = packed.reshape(-1, half_k), scales.reshape(-1, scales.shape[-1])
    chunk = max(1, (2**31 - 1) // (2 * half_k))
    parts = [mxfp4_weight_to_fp8(rows[r:r + chunk], groups[r:r + chunk]) for r in range(0, rows.shape[0], chunk)]
    q = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    row_scale = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return q.reshape(*lead, n, 2 * half_k), row_scale.reshape(*lead, n)


def scaled_mm_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    bias: torch.Tensor | None,
    weight_e4m3: E4m3Weight | None = None,
) -> torch.Tensor:
    """MXFP4 W4A4 ``fp4::linear`` (x (..., K) bf16) through ``torch._scaled_mm``."""
    *lead, k = x.shape
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    a, a_scale = mxfp4_activation_to_fp8(rows)
    b, b_scale = weight_e4m3 or weight_to_e4m3(w_packed.contiguous(), w_scales.contiguous())
    out = torch._scaled_mm(a.view(E4M3), b.view(E4M3).t(), scale_a=a_scale[:, None],
                           scale_b=(b_scale * w_global_scale.reshape(()))[None, :], out_dtype=torch.bfloat16)
    if bias is not None:
        out.add_(bias)
    return out.reshape(*lead, b.shape[0])


def scaled_grouped_mm_moe(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    gate_up_e4m3: E4m3Weight | None = None,
    down_e4m3: E4m3Weight | None = None,
) -> torch.Tensor:
    """MXFP4 W4A4 ``fp4::moe`` through ``torch._scaled_grouped_mm``; ``gate_up`` and ``down`` are
    (packed, scales, global scale) of the (E, 2I, H) and (E, H, I) expert weights."""
    experts = gate_up[0].shape[0]
    dispatch = dispatch_tokens(topk_ids, experts, block_m=1)
    ends = dispatch.counts.cumsum(0, dtype=torch.int32)  # the grouped GEMMs' offsets
    routed_rows = ends[-1:]
    row_of_slot = torch.empty(topk_ids.numel(), dtype=torch.int32, device=hidden.device)
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    a, a_scale = mxfp4_routed_rows_to_fp8(x, dispatch.slot_of_row, routed_rows, topk_ids, row_of_slot=row_of_slot)
    w, w_scale = gate_up_e4m3 or weight_to_e4m3(gate_up[0].contiguous(), gate_up[1].contiguous())
    projected = torch._scaled_grouped_mm(a.view(E4M3), w.view(E4M3).transpose(-2, -1), a_scale,
                                         w_scale * gate_up[2].reshape(()), offs=ends, out_dtype=torch.bfloat16)
    h, h_scale = mxfp4_routed_rows_to_fp8(projected, dispatch.slot_of_row, routed_rows, topk_ids,
                                          swiglu=(activation, alpha, limit), gate_up_bias=gate_up_bias)
    w, w_scale = down_e4m3 or weight_to_e4m3(down[0].contiguous(), down[1].contiguous())
    out_rows = torch._scaled_grouped_mm(h.view(E4M3), w.view(E4M3).transpose(-2, -1), h_scale,
                                        w_scale * down[2].reshape(()), offs=ends, out_dtype=torch.bfloat16)
    return combine_slots(out_rows, topk_ids, experts, hidden.dtype, row_of_slot, topk_weights.reshape(-1), down_bias)
