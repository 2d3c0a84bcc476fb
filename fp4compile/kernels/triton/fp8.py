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
from .launch import cdiv, next_power_of_2
from .moe import swiglu_tile
from .target import kernel_target

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
def _source_chunk(src_ptr, source_row, ks, K, stride_src, bias_ptr, expert, swiglu_alpha, swiglu_limit,
                  SWIGLU: tl.constexpr, CLAMPED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """float32 values ``ks`` of one source row: the row itself, or (``SWIGLU``) the activation of
    a [gate | up] row of width 2K, with the expert's gate/up bias added first."""
    mask = ks < K
    row_ptr = src_ptr + source_row.to(tl.int64) * stride_src
    if SWIGLU:
        gate = tl.load(row_ptr + ks, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(row_ptr + K + ks, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            gate += tl.load(bias_ptr + expert * 2 * K + ks, mask=mask, other=0.0).to(tl.float32)
            up += tl.load(bias_ptr + expert * 2 * K + K + ks, mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, swiglu_tile(gate, up, CLAMPED, swiglu_alpha, swiglu_limit), 0.0)
    else:
        return tl.load(row_ptr + ks, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rows_to_fp8_kernel(src_ptr, q_ptr, row_scale_ptr, K, stride_src,
                        slot_of_row_ptr, routed_rows_ptr, row_of_slot_ptr, ids_ptr, bias_ptr, swiglu_alpha,
                        swiglu_limit, TOP_K: tl.constexpr, ROUTED: tl.constexpr, SWIGLU: tl.constexpr,
                        CLAMPED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr,
                        HW_CVT: tl.constexpr):
    """One row: MXFP4-quantize it (spec rule, bit for bit ``formats.quantize_mxfp4``) and write
    the e4m3 bytes of ``e2m1 * 2**(s - B + 6)`` and the row scale ``2**(B - 6)``.

    ``ROUTED`` (the MoE's rows, grouped by expert): row r holds slot ``slot_of_row[r]`` and only
    the first ``routed_rows`` rows are real (the rest get zeros). Without ``SWIGLU`` the row is
    token ``slot // TOP_K`` of the source, and the kernel also records ``row_of_slot[slot] = r``
    for the combine; with ``SWIGLU`` it is row r of the gate/up output.

    Maxima are taken on the integer bits of |x| (ordered like the values; NaN and inf above every
    finite value, which is how a poisoned block is found)."""
    row = tl.program_id(0)
    source_row = row
    expert = 0
    if ROUTED:
        if row >= tl.load(routed_rows_ptr):
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                tl.store(q_ptr + row * K + ks, tl.zeros((BLOCK_K,), dtype=tl.uint8), mask=ks < K)
            tl.store(row_scale_ptr + row, 0.0)
            return
        slot = tl.load(slot_of_row_ptr + row)
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        if not SWIGLU:
            source_row = slot // TOP_K
            tl.store(row_of_slot_ptr + slot, row)
    if ONE_CHUNK:  # the row fits one chunk: read it once, keep it in registers for both steps
        ks = tl.arange(0, BLOCK_K)
        x = _source_chunk(src_ptr, source_row, ks, K, stride_src, bias_ptr, expert, swiglu_alpha, swiglu_limit,
                          SWIGLU, CLAMPED, HAS_BIAS)
        base = mxfp4_spec_exponent(tl.max(_finite_magnitude_bits(x), axis=0))
        tl.store(row_scale_ptr + row, exp2_int(base - E4M3_HEADROOM))
        _store_e4m3_chunk(x, base, q_ptr + row * K, ks, K, BLOCK_K, HW_CVT)
    else:
        largest = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            x = _source_chunk(src_ptr, source_row, k0 + tl.arange(0, BLOCK_K), K, stride_src, bias_ptr, expert,
                              swiglu_alpha, swiglu_limit, SWIGLU, CLAMPED, HAS_BIAS)
            largest = tl.maximum(largest, _finite_magnitude_bits(x))
        base = mxfp4_spec_exponent(tl.max(largest, axis=0))
        tl.store(row_scale_ptr + row, exp2_int(base - E4M3_HEADROOM))
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = _source_chunk(src_ptr, source_row, ks, K, stride_src, bias_ptr, expert, swiglu_alpha, swiglu_limit,
                              SWIGLU, CLAMPED, HAS_BIAS)
            _store_e4m3_chunk(x, base, q_ptr + row * K, ks, K, BLOCK_K, HW_CVT)


@triton.jit
def _finite_magnitude_bits(x):
    """int32 bits of |x| where x is finite, else 0 (ordered like the magnitudes)."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(bits < 0x7F800000, bits, 0)


@triton.jit
def _store_e4m3_chunk(x, base, q_row_ptr, ks, K, BLOCK_K: tl.constexpr, HW_CVT: tl.constexpr):
    """MXFP4-quantize the float32 chunk ``x`` (columns ``ks`` of a row whose largest group exponent is
    ``base``) and store the e4m3 bytes of ``e2m1 * 2**(s - base + 6)``."""
    GROUPS: tl.constexpr = BLOCK_K // 32
    blocks = tl.reshape(x, (GROUPS, 32))
    block_bits = tl.max(blocks.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    exponent = mxfp4_spec_exponent(block_bits)
    # x * 2**-e is x / 2**e exactly (e <= 125 for finite x, so 2**-e is a normal float).
    rounded = round_to_e2m1(blocks * exp2_int(-exponent)[:, None])
    values = rounded * exp2_int(exponent - base + E4M3_HEADROOM)[:, None]
    values = tl.where((block_bits >= 0x7F800000)[:, None], float("nan"), values)
    tl.store(q_row_ptr + ks, tl.reshape(_to_e4m3_bytes(values, HW_CVT), (BLOCK_K,)), mask=ks < K)


@triton.jit
def _weight_to_fp8_kernel(packed_ptr, scales_ptr, q_ptr, row_scale_ptr, N, K,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_CHUNK: tl.constexpr,
                          HW_CVT: tl.constexpr):
    """``BLOCK_R`` whole rows of a canonical MXFP4 weight -> e4m3 bytes of ``e2m1 * 2**(s - B + 6)``
    and the row scales ``2**(B - 133)``, where ``B`` is the row's largest biased e8m0 byte. Whole
    rows, so each row's scales are read once for ``B`` (a program per K tile had re-read them,
    up to 1.75 times a tile's packed bytes on long rows: 1.45x the copy time, against 0.99x now;
    ``benchmarks/RESULTS.md``)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.minimum(rows, N - 1)  # rows past N redo row N - 1: same values, never out of bounds
    GROUPS: tl.constexpr = BLOCK_K // 32
    largest = tl.zeros((BLOCK_R, SCALE_CHUNK), dtype=tl.int32)
    for g0 in range(0, K // 32, SCALE_CHUNK):
        groups = g0 + tl.arange(0, SCALE_CHUNK)
        s = tl.load(scales_ptr + rows[:, None] * (K // 32) + groups[None, :], mask=groups[None, :] < K // 32, other=0)
        largest = tl.maximum(largest, s.to(tl.int32))
    base = tl.max(largest, axis=1)
    tl.store(row_scale_ptr + rows, exp2_int(tl.minimum(base, 254) - 127 - E4M3_HEADROOM))
    for k0 in range(0, K, BLOCK_K):
        pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(packed_ptr + rows[:, None] * (K // 2) + pairs[None, :], mask=pairs[None, :] < K // 2,
                         other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_R, GROUPS, 32))
        groups = k0 // 32 + tl.arange(0, GROUPS)
        s = tl.load(scales_ptr + rows[:, None] * (K // 32) + groups[None, :], mask=groups[None, :] < K // 32,
                    other=0).to(tl.int32)
        values = decode_e2m1(codes) * exp2_int(s - base[:, None] + E4M3_HEADROOM)[:, :, None]
        values = tl.where((s == 255)[:, :, None], float("nan"), values)
        ks = k0 + tl.arange(0, BLOCK_K)
        tl.store(q_ptr + rows[:, None] * K + ks[None, :],
                 tl.reshape(_to_e4m3_bytes(values, HW_CVT), (BLOCK_R, BLOCK_K)), mask=ks[None, :] < K)


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


def _row_launch(k: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of ``_rows_to_fp8_kernel`` for rows of K values: a row of up to 16384
    values in one chunk (read once), a warp per 1024 values (one warp below); longer rows in chunks
    of 8192 with 16 warps.
    The best of a sweep at K from 768 to 28672 on the H100: 0.94-1.36x the copy time of the
    bytes moved, where chunks of 1024 with 4 warps took 1.19-1.56x (``benchmarks/RESULTS.md``)."""
    block_k = max(32, next_power_of_2(k))
    return (block_k, max(1, block_k // 1024)) if block_k <= 16384 else (8192, 16)


def _weight_launch(k: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps) of ``_weight_to_fp8_kernel``: 4 rows a program, K tiles of up
    to 2048 (the best of a sweep over the 12 linear shapes on the H100)."""
    return 4, min(2048, max(32, next_power_of_2(k))), 4


def mxfp4_activation_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (e4m3 bytes uint8 (M, K), row scales float32 (M,)): the MXFP4 quantization of x
    as e4m3 relative to each row's largest group (see the module docstring)."""
    m, k = x.shape
    check_offsets(m, max(k, x.stride(0)))
    q = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    row_scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block_k, warps = _row_launch(k)
        _rows_to_fp8_kernel[(m,)](x, q, row_scale, k, x.stride(0), x, x, x, x, x, 0.0, 0.0, TOP_K=1, ROUTED=False,
                                  SWIGLU=False, CLAMPED=False, HAS_BIAS=False, BLOCK_K=block_k, ONE_CHUNK=k <= block_k,
                                  HW_CVT=kernel_target(x.device).compiled, num_warps=warps)
    return q, row_scale


def mxfp4_routed_rows_to_fp8(
    source: torch.Tensor,
    slot_of_row: torch.Tensor,
    routed_rows: torch.Tensor,
    topk_ids: torch.Tensor,
    row_of_slot: torch.Tensor | None = None,
    swiglu: tuple[str, float, float] | None = None,
    gate_up_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An MoE's rows (grouped by expert; ``routed_rows``: a device scalar, how many are real) as
    e4m3 bytes and row scales, for a grouped fp8 GEMM.

    Without ``swiglu``: row r is the token of slot ``slot_of_row[r]`` (``source`` (T, H), each
    token once per choice) and ``row_of_slot`` (T * k,) receives each routed slot's row. With
    ``swiglu`` = (activation, alpha, limit): row r is the activation of row r of ``source``, the
    gate/up output (rows, 2I), plus ``gate_up_bias`` (E, 2I) of the row's expert."""
    rows = slot_of_row.numel()
    k = source.shape[1] // 2 if swiglu else source.shape[1]
    check_offsets(max(rows, source.shape[0]), max(2 * k, source.stride(0)))
    q = torch.empty((rows, k), dtype=torch.uint8, device=source.device)
    row_scale = torch.empty((rows,), dtype=torch.float32, device=source.device)
    activation, alpha, limit = swiglu or ("silu", 0.0, 0.0)
    if rows:
        block_k, warps = _row_launch(k)
        _rows_to_fp8_kernel[(rows,)](
            source, q, row_scale, k, source.stride(0), slot_of_row, routed_rows,
            row_of_slot if row_of_slot is not None else slot_of_row, topk_ids,
            gate_up_bias if gate_up_bias is not None else source, float(alpha), float(limit),
            TOP_K=topk_ids.shape[1], ROUTED=True, SWIGLU=swiglu is not None, CLAMPED=activation == "clamped_swiglu",
            HAS_BIAS=gate_up_bias is not None, BLOCK_K=block_k, ONE_CHUNK=k <= block_k,
            HW_CVT=kernel_target(source.device).compiled, num_warps=warps,
        )
    return q, row_scale


def mxfp4_weight_to_fp8(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A canonical MXFP4 weight (N, K/2) -> (e4m3 bytes uint8 (N, K), row scales float32 (N,))."""
    n, k = packed.shape[0], packed.shape[1] * 2
    check_offsets(n, k)
    q = torch.empty((n, k), dtype=torch.uint8, device=packed.device)
    row_scale = torch.empty((n,), dtype=torch.float32, device=packed.device)
    block_r, block_k, warps = _weight_launch(k)
    scale_chunk = min(128, next_power_of_2(k // 32))
    _weight_to_fp8_kernel[(cdiv(n, block_r),)](
        packed, scales, q, row_scale, n, k, BLOCK_R=block_r, BLOCK_K=block_k, SCALE_CHUNK=scale_chunk,
        HW_CVT=kernel_target(packed.device).compiled, num_warps=warps,
    )
    return q, row_scale


def fp8_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, w_global_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype,
               weight_e4m3: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """MXFP4 W4A4 ``x @ w.T * w_global_scale + bias`` through e4m3 tensor cores (x (M, K), unit
    column stride; the activation's MXFP4 global scale is 1): the activation converted per call,
    the weight too unless ``weight_e4m3`` (its ``mxfp4_weight_to_fp8`` form, made at compile time)
    is given, then ``_fp8_gemm_kernel``. (The CUTLASS version of the same is ``kernels.cutlass``.)"""
    m, k = x.shape
    n = w_packed.shape[0]
    a, a_scale = mxfp4_activation_to_fp8(x)
    b, b_scale = weight_e4m3 or mxfp4_weight_to_fp8(w_packed, w_scales)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    on_gpu = kernel_target(x.device).compiled
    block_m, block_n, block_k = (128, 128, 128) if on_gpu else (16, 32, 32)
    grid = (cdiv(m, block_m) * cdiv(n, block_n),)
    _fp8_gemm_kernel[grid](
        a, b, a_scale, b_scale, w_global_scale.reshape(()), bias if bias is not None else out, out, m, n, k,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        DOT_DTYPE=tl.float8e4nv if on_gpu else tl.float32, num_warps=8 if on_gpu else 4, num_stages=3,
    )
    return out
