"""MXFP4 W4A4 through fp8 tensor cores: the prefill (large-M) path.

Hopper multiplies e4m3 operands at twice the bf16 rate. Every e2m1 value is exact in e4m3, and an
MXFP4 group scale is a power of two, so ``e2m1 * 2**s`` is exact in e4m3 *relative to a per-row
base*: with ``B`` the largest group exponent of the row, the kernels here store
``e2m1 * 2**(s - B + 6)`` (at most 6 * 2**6 = 384 < 448, e4m3's largest) and apply ``2**(B - 6)``
per activation row and per weight row (output channel) after the MMA, in float32.

Exactness: e4m3 steps are 2**-9 below 2**-6, so a group is exact when ``s >= B - 14``: its
smallest nonzero value 0.5 * 2**(s - B + 6) is then at least 2**-9. Groups more than 2**14 below
their row's largest are rounded to nearest-even e4m3 (possibly to zero); their values are then
below 6 * 2**-8 of the row's largest, so the error they add is small against the row's largest
product (measured in the tests and ``benchmarks/RESULTS.md``).

Accumulation: Hopper's fp8 MMA accumulates in reduced precision; the GEMM promotes its partial
sums to float32 every K tile (``max_num_imprecise_acc``).
"""

import torch
import triton
import triton.language as tl

from .codecs import (
    check_offsets, decode_e2m1, e4m3_value, encode_e4m3, exp2_int, mxfp4_spec_exponent, round_to_e2m1,
)

E4M3_HEADROOM = tl.constexpr(6)
"""The row's largest group maps to 2**6 times its e2m1 values: 6 * 2**6 = 384 <= 448."""


@triton.jit
def _to_e4m3_bytes(values, HW_CVT: tl.constexpr):
    """float32 -> e4m3 bytes (uint8) with the sign; round-to-nearest-even, NaN -> NaN. ``HW_CVT``:
    the GPU's conversion instruction; else bit arithmetic (the interpreter's float8 casts flush
    subnormals)."""
    if HW_CVT:
        return values.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        sign = (values.to(tl.int32, bitcast=True) >> 24) & 0x80
        return (encode_e4m3(tl.abs(values)) | tl.where(values != values, 0, sign)).to(tl.uint8)


@triton.jit
def _activation_to_fp8_kernel(x_ptr, q_ptr, row_scale_ptr, K, stride_xm, BLOCK_K: tl.constexpr,
                              HW_CVT: tl.constexpr):
    """One row of x: MXFP4-quantize it (spec rule, bit for bit ``formats.quantize_mxfp4``) and
    write the e4m3 bytes of ``e2m1 * 2**(s - B + 6)`` and the row scale ``2**(B - 6)``.

    Maxima are taken on the integer bits of |x| (ordered like the values; NaN and inf above every
    finite value, which is how a poisoned block is found)."""
    row = tl.program_id(0)
    GROUPS: tl.constexpr = BLOCK_K // 32
    largest = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        largest = tl.maximum(largest, tl.where(bits < 0x7F800000, bits, 0))  # finite values only
    base = mxfp4_spec_exponent(tl.max(largest, axis=0))
    tl.store(row_scale_ptr + row, exp2_int(base - E4M3_HEADROOM))
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
        blocks = tl.reshape(x, (GROUPS, 32))
        block_bits = tl.max(blocks.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
        exponent = mxfp4_spec_exponent(block_bits)
        # x * 2**-e is x / 2**e exactly (e <= 125 for finite x, so 2**-e is a normal float).
        rounded = round_to_e2m1(blocks * exp2_int(-exponent)[:, None])
        values = rounded * exp2_int(exponent - base + E4M3_HEADROOM)[:, None]
        values = tl.where((block_bits >= 0x7F800000)[:, None], float("nan"), values)
        tl.store(q_ptr + row * K + ks, tl.reshape(_to_e4m3_bytes(values, HW_CVT), (BLOCK_K,)), mask=ks < K)


@triton.jit
def _weight_to_fp8_kernel(packed_ptr, scales_ptr, q_ptr, row_scale_ptr, N, K,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_CHUNK: tl.constexpr,
                          HW_CVT: tl.constexpr):
    """A (BLOCK_R, BLOCK_K) tile of a canonical MXFP4 weight -> e4m3 bytes of ``e2m1 * 2**(s - B + 6)``;
    ``B``, the largest biased e8m0 byte of the row, comes from the row's scales (re-read by each K
    tile, 1/16 of the packed bytes); the first K tile also writes the row scale ``2**(B - 133)``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.minimum(rows, N - 1)  # rows past N redo row N - 1: same values, never out of bounds
    GROUPS: tl.constexpr = BLOCK_K // 32
    largest = tl.zeros((BLOCK_R, SCALE_CHUNK), dtype=tl.int32)
    for g0 in range(0, K // 32, SCALE_CHUNK):
        groups = g0 + tl.arange(0, SCALE_CHUNK)
        s = tl.load(scales_ptr + rows[:, None] * (K // 32) + groups[None, :], mask=groups[None, :] < K // 32, other=0)
        largest = tl.maximum(largest, s.to(tl.int32))
    base = tl.max(largest, axis=1)
    if tl.program_id(1) == 0:
        tl.store(row_scale_ptr + rows, exp2_int(tl.minimum(base, 254) - 127 - E4M3_HEADROOM))
    k0 = tl.program_id(1) * BLOCK_K
    pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(packed_ptr + rows[:, None] * (K // 2) + pairs[None, :], mask=pairs[None, :] < K // 2, other=0)
    packed = packed.to(tl.int32)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_R, GROUPS, 32))
    groups = k0 // 32 + tl.arange(0, GROUPS)
    s = tl.load(scales_ptr + rows[:, None] * (K // 32) + groups[None, :], mask=groups[None, :] < K // 32, other=0)
    s = s.to(tl.int32)
    values = decode_e2m1(codes) * exp2_int(s - base[:, None] + E4M3_HEADROOM)[:, :, None]
    values = tl.where((s == 255)[:, :, None], float("nan"), values)
    ks = k0 + tl.arange(0, BLOCK_K)
    tl.store(q_ptr + rows[:, None] * K + ks[None, :], tl.reshape(_to_e4m3_bytes(values, HW_CVT), (BLOCK_R, BLOCK_K)),
             mask=ks[None, :] < K)


@triton.jit
def _e4m3_operand(byte_tile, DOT_DTYPE: tl.constexpr):
    """uint8 e4m3 bytes as a dot operand: fp8 on the GPU; float32 in the interpreter (no fp8 dot)."""
    if DOT_DTYPE == tl.float8e4nv:
        return byte_tile.to(tl.float8e4nv, bitcast=True)
    else:
        b = byte_tile.to(tl.int32)
        magnitude = e4m3_value(b & 0x7F)
        return tl.where((b & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, alpha_ptr, bias_ptr, out_ptr, M, N, K,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """out = alpha * a_scale[m] * b_scale[n] * sum_k a[m, k] * b[n, k] (+ bias), e4m3 operands."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles share their weight tiles in L2.
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_rows, b_rows = tl.minimum(rows, M - 1), tl.minimum(cols, N - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_rows[:, None] * K + ks[None, :], mask=ks[None, :] < K, other=0)
        b = tl.load(b_ptr + b_rows[:, None] * K + ks[None, :], mask=ks[None, :] < K, other=0)
        acc = tl.dot(_e4m3_operand(a, DOT_DTYPE), tl.trans(_e4m3_operand(b, DOT_DTYPE)), acc,
                     max_num_imprecise_acc=BLOCK_K if DOT_DTYPE == tl.float8e4nv else None)
    scale = tl.load(a_scale_ptr + a_rows)[:, None] * tl.load(b_scale_ptr + b_rows)[None, :]
    acc = acc * scale * tl.load(alpha_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def mxfp4_activation_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (e4m3 bytes uint8 (M, K), row scales float32 (M,)): the MXFP4 quantization of x
    as e4m3 relative to each row's largest group (see the module docstring)."""
    m, k = x.shape
    check_offsets(m, max(k, x.stride(0)))
    q = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    row_scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        _activation_to_fp8_kernel[(m,)](x, q, row_scale, k, x.stride(0), BLOCK_K=min(1024, triton.next_power_of_2(k)),
                                        HW_CVT=x.device.type == "cuda")
    return q, row_scale


def mxfp4_weight_to_fp8(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A canonical MXFP4 weight (N, K/2) -> (e4m3 bytes uint8 (N, K), row scales float32 (N,))."""
    n, k = packed.shape[0], packed.shape[1] * 2
    check_offsets(n, k)
    q = torch.empty((n, k), dtype=torch.uint8, device=packed.device)
    row_scale = torch.empty((n,), dtype=torch.float32, device=packed.device)
    block_k = min(512, max(32, triton.next_power_of_2(k)))
    scale_chunk = min(128, triton.next_power_of_2(k // 32))
    _weight_to_fp8_kernel[(triton.cdiv(n, 16), triton.cdiv(k, block_k))](
        packed, scales, q, row_scale, n, k, BLOCK_R=16, BLOCK_K=block_k, SCALE_CHUNK=scale_chunk,
        HW_CVT=packed.device.type == "cuda",
    )
    return q, row_scale


def _has_rowwise_scaled_mm(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` takes e4m3 operands with per-row float32 scales here (CUTLASS
    on sm_90 and newer); elsewhere the Triton fp8 GEMM below runs."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def fp8_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, w_global_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 W4A4 ``x @ w.T * w_global_scale + bias`` through e4m3 tensor cores (x (M, K), unit
    column stride; the activation's MXFP4 global scale is 1).

    Both operands are converted per call (two Triton kernels), then multiplied by
    ``torch._scaled_mm`` with per-row scales (PyTorch's CUTLASS fp8 GEMM, float32 accumulation)
    where the GPU has it and the call fits its contract (bf16 output, N a multiple of 16), else
    by ``_fp8_gemm_kernel``."""
    m, k = x.shape
    n = w_packed.shape[0]
    a, a_scale = mxfp4_activation_to_fp8(x)
    b, b_scale = mxfp4_weight_to_fp8(w_packed, w_scales)
    if _has_rowwise_scaled_mm(x.device) and out_dtype == torch.bfloat16 and n % 16 == 0 and k % 16 == 0:
        e4m3 = torch.float8_e4m3fn
        scale_b = (b_scale * w_global_scale.reshape(()))[None, :]
        out = torch._scaled_mm(a.view(e4m3), b.view(e4m3).t(), scale_a=a_scale[:, None], scale_b=scale_b,
                               out_dtype=torch.bfloat16)
        return out.add_(bias) if bias is not None else out
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    on_gpu = x.device.type == "cuda"
    block_m, block_n, block_k = (128, 128, 128) if on_gpu else (16, 32, 32)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_gemm_kernel[grid](
        a, b, a_scale, b_scale, w_global_scale.reshape(()), bias if bias is not None else out, out, m, n, k,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        DOT_DTYPE=tl.float8e4nv if on_gpu else tl.float32, num_warps=8 if on_gpu else 4, num_stages=3,
    )
    return out
