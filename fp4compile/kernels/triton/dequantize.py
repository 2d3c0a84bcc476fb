"""Dequantization kernel: packed fp4 (R, K/2) + scale bytes -> ``e2m1 * block_scale * gs`` (R, K).

Used for large-M (prefill) linear layers in W4A16: there the GEMM is compute-bound, and decoding
a weight tile once per output tile in the GEMM costs more than writing the whole bf16 weight once
and handing it to cuBLAS (``dequantize_linear``). Memory-bound: the float32 codecs suffice.
"""

import torch
import triton
import triton.language as tl

from ...formats.spec import MXFP4, get_format
from .codecs import check_offsets, decode_e2m1, e4m3_value, e8m0_value
from .launch import cdiv, next_power_of_2

CHUNK_ELEMENTS = 64 * 2**20
"""``dequantize_linear`` dequantizes at most this many weight elements at a time (128 MiB in bf16),
so a large layer never needs a full-size bf16 copy of its weight."""


@triton.jit
def _dequantize_kernel(packed_ptr, scales_ptr, gs_ptr, out_ptr, R, K,
                       GROUP: tl.constexpr, IS_MXFP4: tl.constexpr, ROW_SCALED: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pairs = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    mask = (rows[:, None] < R) & (pairs[None, :] < K // 2)
    packed = tl.load(packed_ptr + rows[:, None] * (K // 2) + pairs[None, :], mask=mask, other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_R, BLOCK_K // GROUP, GROUP))
    groups = tl.program_id(1) * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
    gmask = (rows[:, None] < R) & (groups[None, :] < K // GROUP)
    scale_bytes = tl.load(scales_ptr + rows[:, None] * (K // GROUP) + groups[None, :], mask=gmask, other=0)
    if IS_MXFP4:
        scale = e8m0_value(scale_bytes.to(tl.int32))
        scale = tl.where(scale_bytes.to(tl.int32) == 255, float("nan"), scale)
    else:
        scale = e4m3_value(scale_bytes.to(tl.int32))
    if ROW_SCALED:  # one global scale per row (a weight fused from projections with their own)
        gs = tl.load(gs_ptr + rows, mask=rows < R, other=0.0)[:, None, None]
    else:
        gs = tl.load(gs_ptr)
    values = decode_e2m1(codes) * scale[:, :, None] * gs
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], tl.reshape(values, (BLOCK_R, BLOCK_K)).to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < R) & (cols[None, :] < K))


def fp4_dequantize(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, fmt: str,
                   dtype: torch.dtype) -> torch.Tensor:
    """(..., K/2) packed -> (..., K) ``dtype`` values: the reference ``dequantize``'s float32
    ``e2m1 * block_scale * global_scale`` rounded once to ``dtype`` (the op ``fp4::dequantize``
    still runs the reference; this serves ``dequantize_linear``). ``global_scale``: one element,
    or one per row of a 2-D ``packed``."""
    spec = get_format(fmt)
    *lead, half_k = packed.shape
    k = 2 * half_k
    rows = packed.reshape(-1, half_k)
    r = rows.shape[0]
    check_offsets(r, k)
    out = torch.empty((r, k), dtype=dtype, device=packed.device)
    if r:
        block_k = max(min(256, next_power_of_2(k)), spec.group_size)
        _dequantize_kernel[(cdiv(r, 32), cdiv(k, block_k))](
            rows, scales.reshape(r, -1), global_scale.reshape(-1), out, r, k,
            GROUP=spec.group_size, IS_MXFP4=spec is MXFP4, ROW_SCALED=global_scale.numel() > 1, BLOCK_R=32,
            BLOCK_K=block_k,
        )
    return out.reshape(*lead, k)


def dequantize_linear(a: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, alpha: torch.Tensor,
                      bias: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """``alpha * (a @ w.T) + bias`` through cuBLAS, for large M. a: (M, K) bf16; alpha: float32
    device tensor, one element or one per weight row (N,). The fp4 weight is dequantized CHUNK_ELEMENTS at a time with ``alpha`` folded in
    (``e2m1 * block_scale * alpha`` formed in float32, then rounded to bf16; exact when alpha is 1,
    as for MXFP4 W4A16), and each chunk's product (bias included) is written into its columns of
    the bf16 output."""
    m, k = a.shape
    n = w_packed.shape[0]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    # Chunks of whole 128-row blocks: an output column slice that starts off a 16-byte boundary
    # sends cuBLAS to kernels 6-7x slower (measured).
    rows_per_chunk = max(128, CHUNK_ELEMENTS // k // 128 * 128)
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        chunk_alpha = alpha.reshape(-1)[start:stop] if alpha.numel() > 1 else alpha
        weight = fp4_dequantize(w_packed[start:stop], w_scales[start:stop], chunk_alpha, fmt, a.dtype)
        if bias is None:
            torch.mm(a, weight.t(), out=out[:, start:stop])
        else:
            torch.addmm(bias[start:stop].to(a.dtype), a, weight.t(), out=out[:, start:stop])
    return out
