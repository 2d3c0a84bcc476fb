"""fp4 linear kernel: y = alpha * (a @ w.T) + bias with an fp4 weight, W4A16 or W4A4.

Hopper has no fp4 tensor cores: weight tiles are decoded in registers to bf16, which holds every
``e2m1 * block_scale`` product exactly (MXFP4: 2 significant bits times a power of two; NVFP4: 2
times 4 bits), and multiplied on bf16 tensor cores with float32 accumulation. In W4A4 the
activation is quantized and decoded once, by ``fp4_fake_quantize`` (the same exact products),
before the GEMM. For decode-sized M the K loop is split over programs to fill the GPU. ``alpha`` (``gs_activation * gs_weight``) is read from device memory in the
epilogue, where the bias is added. In W4A16 the activation tile is rounded to bf16.
Under the interpreter (CPU) the tiles are float32 instead (see ``DOT_DTYPE``).
"""

import functools

import torch
import triton
import triton.language as tl

from ...formats.spec import MXFP4, get_format
from .codecs import check_offsets, decode_e2m1, e4m3_value, e8m0_value
from .quantize import fp4_fake_quantize


@triton.jit
def _decode_tile(packed_ptr, scales_ptr, rows, k0, n_rows, K, GROUP: tl.constexpr, IS_MXFP4: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Rows ``rows`` x columns [k0, k0 + BLOCK_K) of a packed fp4 matrix as ``e2m1 * scale``."""
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask = (rows[:, None] < n_rows) & (half[None, :] < K // 2)
    packed = tl.load(packed_ptr + rows[:, None] * (K // 2) + half[None, :], mask=mask, other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_R, BLOCK_K))
    groups = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    gmask = (rows[:, None] < n_rows) & (groups[None, :] < K // GROUP)
    scale_bytes = tl.load(scales_ptr + rows[:, None] * (K // GROUP) + groups[None, :], mask=gmask, other=0)
    scale_bytes = scale_bytes.to(tl.int32)
    if IS_MXFP4:
        scale = e8m0_value(scale_bytes)
    else:
        scale = e4m3_value(scale_bytes)
    values = tl.reshape(decode_e2m1(codes), (BLOCK_R, BLOCK_K // GROUP, GROUP)) * scale[:, :, None]
    return tl.reshape(values, (BLOCK_R, BLOCK_K)).to(DOT_DTYPE)


@triton.jit
def _linear_kernel(
    x_ptr, w_packed_ptr, w_scales_ptr, alpha_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, K_PER_SPLIT,
    GROUP: tl.constexpr, IS_MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile over K range ``program_id(2)``. With WRITE_PARTIAL the
    float32 partial sum goes to ``out_ptr[split]`` for ``_reduce_splits_kernel``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        w = _decode_tile(w_packed_ptr, w_scales_ptr, cols, k0, N, K, GROUP, IS_MXFP4, BLOCK_N, BLOCK_K, DOT_DTYPE)
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0).to(DOT_DTYPE)
        acc += tl.dot(a, tl.trans(w))
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if WRITE_PARTIAL:
        tl.store(out_ptr + tl.program_id(2) * M * N + rows[:, None] * N + cols[None, :], acc, mask=mask)
    else:
        acc = acc * tl.load(alpha_ptr)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_splits_kernel(partial_ptr, alpha_ptr, bias_ptr, out_ptr, M, N, SPLITS,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = alpha * sum over splits of the partial sums (+ bias), in a fixed order: deterministic."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, SPLITS):
        acc += tl.load(partial_ptr + split * M * N + offs, mask=mask, other=0.0)
    acc = acc * tl.load(alpha_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """About two programs per multiprocessor keep a memory-bound GEMV busy (4 in the interpreter,
    which exercises the split path on small shapes)."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _block_k(k: int, group: int) -> int:
    """The widest of 128 / 64 / 32 that divides K (so tiles never straddle a group)."""
    return next(b for b in (128, 64, 32) if k % b == 0 and b % group == 0) if k % 32 == 0 else group


def fp4_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    act_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    act_mode: str,
) -> torch.Tensor:
    """Triton version of ``fp4::linear`` (arguments validated by the op)."""
    spec = get_format(fmt)
    *lead, k = x.shape
    n = w_packed.shape[0]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    check_offsets(m, max(k, n, rows.stride(0)))
    check_offsets(n, k)
    if m == 0:
        return x.new_empty((*lead, n))
    dot_dtype = torch.float32 if x.device.type == "cpu" else torch.bfloat16
    if act_mode == "fp4":
        rows, a_gs = fp4_fake_quantize(rows, fmt, act_global_scale, dot_dtype)
        alpha = a_gs * w_global_scale.reshape(())
    else:
        alpha = w_global_scale.reshape(()).float()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else (64 if m <= 128 else 128)
    block_n = 64 if m <= 128 else 128
    block_k = _block_k(k, spec.group_size)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # Split K when the output tiles alone cannot fill the GPU (decode-sized M).
    splits = max(1, min(_programs_wanted(x.device) // tiles, triton.cdiv(k, block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    bias_arg = bias if bias is not None else rows  # never read without HAS_BIAS
    _linear_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)](
        rows, w_packed, w_scales, alpha, bias_arg, partial,
        m, n, k, rows.stride(0), k_per_split,
        GROUP=spec.group_size, IS_MXFP4=spec is MXFP4, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        # The interpreter (CPU CI) computes bf16 dots wrongly (numpy has no bf16): fp32 there.
        DOT_DTYPE=tl.float32 if dot_dtype is torch.float32 else tl.bfloat16,
        WRITE_PARTIAL=splits > 1,
    )
    if splits > 1:
        block = 1024
        _reduce_splits_kernel[(triton.cdiv(m * n, block),)](
            partial, alpha, bias_arg, out, m, n, splits, HAS_BIAS=bias is not None, BLOCK=block
        )
    return out.reshape(*lead, n)
