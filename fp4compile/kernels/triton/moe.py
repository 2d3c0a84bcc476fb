"""``fp4::moe`` on CUDA: grouped fp4 GEMMs over the routed tokens, with SwiGLU, activation
quantization and the routing weights fused in. No host sync anywhere (CUDA-graph safe).

``moe_dispatch`` groups the (token, choice) slots by expert (one launch up to 128 slots, three
above; none for a few slots that rarely share an expert, as at one token: ``use_direct_slots``,
each M tile then one slot); then

1. ``_gate_up_kernel``: per (M tile of one expert's rows, N tile of the intermediate), the gate
   and the up rows of the expert's weight are decoded from fp4 in registers (``gemm.weight_tile``)
   and multiplied with the gathered tokens on bf16 tensor cores; the epilogue applies the global
   scale, the bias and the activation and writes the intermediate in row order. W4A4 MXFP4: the
   epilogue also quantizes it (the groups of 32 lie within the tile; ``fake_quantize_tile``, bit
   for bit the reference quantizer). W4A4 NVFP4: its global scale needs the amax over every row
   first, so the epilogue stores float32 and takes the amax (an atomic max), and the quantize
   kernel makes one pass with that amax (at direct slots: per-program partial maxima, and the
   down GEMM quantizes; see below).
2. ``_down_kernel``: the same over the intermediate rows; the epilogue applies alpha, the bias
   and the slot's routing weight and writes the slot's float32 output row.
3. ``_combine_kernel``: each token's output is the sum of its slots' rows, in choice order
   (deterministic, unlike atomics into the output), cast to the hidden states' dtype once. At
   direct slots the down GEMM does this itself, without the launch: the last of a token's
   programs to finish an N tile sums its slots' rows (``_combine_if_last``).

W4A4 quantizes the hidden states first (``fp4_fake_quantize``, once per token rather than once
per chosen expert), except at direct slots where measured faster (``quantize_in_gemms``): there
each GEMM program quantizes its one slot's row itself (the hidden states in the gate/up GEMM,
NVFP4's intermediate in the down GEMM, its global scale from the gate/up programs' partial
maxima), which saves the launches and the amax's zeroing. Numerics follow the linear kernels:
float32 accumulation, W4A16 activations and intermediate in bf16. Measured choices (split-K at
decode, swapped dots at prefill: both slower) are in ``benchmarks/RESULTS.md``.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...formats.spec import MXFP4, get_format
from .codecs import check_offsets
from .gemm import (
    activation_tile, arrival_counters, dot_even_odd, given_global_scale, mx_row_exponent, scale_words, undo_decode_factor,
    weight_tile,
)
from .launch import cdiv, next_power_of_2
from .moe_dispatch import dispatch_tokens, tile_rows
from .quantize import activation_global_scale, fake_quantize_tile, finite_amax, fp4_fake_quantize, in_program_amax
from .target import kernel_target


@triton.jit
def swiglu_tile(gate, up, CLAMPED: tl.constexpr, alpha, limit):
    """``formats.moe.swiglu`` on float32 tiles: silu(gate) * up, or gpt-oss's clamped form."""
    if CLAMPED:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    else:
        return gate * tl.sigmoid(gate) * up


@triton.jit
def slot_row_tile(row_ptr, k0, K, gs, GROUP: tl.constexpr, IS_MXFP4: tl.constexpr, FMA_DIVISION: tl.constexpr,
                  EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """A direct slot's activation tile, fake-quantized here (W4A4): columns [k0, k0 + BLOCK_K) of
    the row at ``row_ptr`` quantized (``fake_quantize_tile``, global scale ``gs``: the GEMM's alpha
    carries it) as row 0 of a (BLOCK_M, BLOCK_K) tile, the tile's other rows zero. Only the one
    row is quantized; each program of the GEMM repeats it, which costs less at one token than a
    launch of the quantize kernel before the GEMM."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        row = tl.load(row_ptr + ks[None, :]).to(tl.float32)
    else:
        row = tl.load(row_ptr + ks[None, :], mask=ks[None, :] < K, other=0.0).to(tl.float32)
    values = fake_quantize_tile(row, gs, GROUP, IS_MXFP4, FMA_DIVISION, 1, BLOCK_K)
    return tl.where((tl.arange(0, BLOCK_M) == 0)[:, None], values, 0.0).to(DOT_DTYPE)


@triton.jit
def _gate_up_kernel(
    x_ptr, slot_of_row_ptr, counts_ptr, ids_ptr, w_ptr, s_ptr, w_gs_ptr, x_gs_ptr, bias_ptr, out_ptr, amax_ptr,
    TOKENS, INTER, K, HALF_K, K_GROUPS, stride_xm, EXPERTS, swiglu_alpha, swiglu_limit,
    TOP_K: tl.constexpr, CLAMPED: tl.constexpr, GROUP: tl.constexpr, IS_MXFP4: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_X_SCALE: tl.constexpr, QUANTIZE_X: tl.constexpr, QUANTIZE_OUT: tl.constexpr,
    TRACK_AMAX: tl.constexpr, AMAX_PARTIALS: tl.constexpr, AMAX_TILE_M: tl.constexpr, AMAX_TILE_K: tl.constexpr,
    EVEN_K: tl.constexpr, SCALE_WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EXPERTS_POW2: tl.constexpr, DIRECT: tl.constexpr, USE_ASM: tl.constexpr,
    DOT_DTYPE: tl.constexpr, FMA_DIVISION: tl.constexpr,
):
    """intermediate[rows, cols] = act(gate, up) of one expert's M tile; program (N tile, M tile).

    ``QUANTIZE_X`` (W4A4, direct slots): the hidden states arrive unquantized and each program
    quantizes its slot's row (``slot_row_tile``); NVFP4's global scale then comes from the finite
    amax of all of x, which each program takes itself (``activation_global_scale``, tiles of
    AMAX_TILE_M x AMAX_TILE_K). ``QUANTIZE_OUT`` (MXFP4 W4A4): the intermediate is stored as its
    fp4 values (the groups of 32 lie within the tile). ``TRACK_AMAX`` (NVFP4 W4A4): stored as
    float32, and its finite amax goes into ``amax_ptr`` (an atomic max), or with
    ``AMAX_PARTIALS`` one partial maximum per program (no zeroed accumulator)."""
    tl.static_assert(DIRECT or not (QUANTIZE_X or AMAX_PARTIALS), "a slot's own row, or partials: direct slots only")
    expert, rows, routed, slots = tile_rows(tl.program_id(1), counts_ptr, slot_of_row_ptr, ids_ptr, EXPERTS, BLOCK_M,
                                            EXPERTS_POW2, DIRECT)
    partial_ptr = amax_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    if expert >= EXPERTS:
        if TRACK_AMAX and AMAX_PARTIALS:
            tl.store(partial_ptr, 0.0)
        return
    tokens = tl.where(routed, slots // TOP_K, TOKENS)  # TOKENS: a row that reads as zeros
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gate_rows = tl.minimum(cols, INTER - 1)  # past the end: a valid row, never stored
    up_rows = gate_rows + INTER
    w_ptr += expert.to(tl.int64) * (2 * INTER * HALF_K)
    s_ptr += expert.to(tl.int64) * (2 * INTER * K_GROUPS)
    if IS_MXFP4:
        gate_exponent = mx_row_exponent(s_ptr, gate_rows, 0, K_GROUPS, K_GROUPS, BLOCK_N, SCALE_WORDS)
        up_exponent = mx_row_exponent(s_ptr, up_rows, 0, K_GROUPS, K_GROUPS, BLOCK_N, SCALE_WORDS)
    else:
        gate_exponent = 0
        up_exponent = 0
    if QUANTIZE_X and not IS_MXFP4:
        x_gs = activation_global_scale(x_gs_ptr, x_gs_ptr, 1, x_ptr, TOKENS, K, stride_xm, "x", 1, AMAX_TILE_M,
                                       AMAX_TILE_K)
    else:
        x_gs = given_global_scale(x_gs_ptr, HAS_X_SCALE)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if QUANTIZE_X:
            x = slot_row_tile(x_ptr + (tl.program_id(1) // TOP_K) * stride_xm, k0, K, x_gs, GROUP, IS_MXFP4,
                              FMA_DIVISION, EVEN_K, BLOCK_M, BLOCK_K, DOT_DTYPE)
        else:
            x = activation_tile(x_ptr, tokens, k0, TOKENS, K, stride_xm, EVEN_K, BLOCK_K, DOT_DTYPE)
        w_even, w_odd = weight_tile(w_ptr, s_ptr, gate_rows, gate_exponent, k0, HALF_K, K_GROUPS, GROUP, IS_MXFP4,
                                    EVEN_K, SCALE_WORDS, BLOCK_N, BLOCK_K, USE_ASM, DOT_DTYPE)
        acc_gate = dot_even_odd(acc_gate, x, w_even, w_odd, BLOCK_M, BLOCK_K)
        w_even, w_odd = weight_tile(w_ptr, s_ptr, up_rows, up_exponent, k0, HALF_K, K_GROUPS, GROUP, IS_MXFP4,
                                    EVEN_K, SCALE_WORDS, BLOCK_N, BLOCK_K, USE_ASM, DOT_DTYPE)
        acc_up = dot_even_odd(acc_up, x, w_even, w_odd, BLOCK_M, BLOCK_K)
    alpha = tl.load(w_gs_ptr) * x_gs
    gate = undo_decode_factor(acc_gate, gate_exponent, IS_MXFP4) * alpha
    up = undo_decode_factor(acc_up, up_exponent, IS_MXFP4) * alpha
    if HAS_BIAS:
        bias_ptr += expert * (2 * INTER)
        gate += tl.load(bias_ptr + gate_rows).to(tl.float32)[None, :]
        up += tl.load(bias_ptr + up_rows).to(tl.float32)[None, :]
    act = swiglu_tile(gate, up, CLAMPED, swiglu_alpha, swiglu_limit)
    if QUANTIZE_OUT:
        act = fake_quantize_tile(act, 1.0, GROUP, IS_MXFP4, FMA_DIVISION, BLOCK_M, BLOCK_N)
    mask = routed[:, None] & (cols[None, :] < INTER)
    tl.store(out_ptr + rows[:, None] * INTER + cols[None, :], act.to(out_ptr.dtype.element_ty), mask=mask)
    if TRACK_AMAX:
        if AMAX_PARTIALS:
            tl.store(partial_ptr, finite_amax(tl.where(mask, act, 0.0)))
        else:
            tl.atomic_max(amax_ptr, finite_amax(tl.where(mask, act, 0.0)))


@triton.jit
def _combine_if_last(slot_out_ptr, ids_ptr, counter_ptr, out_ptr, token, cols, N, EXPERTS, TOP_K: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Direct slots: after this program's slot row (columns ``cols``) is stored, count it on the
    token's counter; the token's last program to arrive sums its slots' rows in choice order (what
    ``_combine_kernel`` computes, bit for bit), writes the output and resets the counter."""
    tl.debug_barrier()  # every thread's slot-row store precedes the release
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == TOP_K - 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            slot = token * TOP_K + j
            expert = tl.load(ids_ptr + slot)
            mask = (cols < N) & (expert >= 0) & (expert < EXPERTS)
            # .cg: from L2, never a line this SM's L1 kept from an earlier call.
            acc += tl.load(slot_out_ptr + slot * N + cols, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + token * N + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")  # read again only by a later launch


@triton.jit
def _down_kernel(
    x_ptr, slot_of_row_ptr, counts_ptr, ids_ptr, topk_weights_ptr, w_ptr, s_ptr, w_gs_ptr, x_gs_ptr, bias_ptr,
    out_ptr, amax_ptr, combined_ptr, counters_ptr, ROWS, N, K, HALF_K, K_GROUPS, EXPERTS, NUM_AMAX,
    GROUP: tl.constexpr, IS_MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_X_SCALE: tl.constexpr,
    QUANTIZE_X: tl.constexpr, AMAX_BLOCK: tl.constexpr, TOP_K: tl.constexpr,
    EVEN_K: tl.constexpr, SCALE_WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EXPERTS_POW2: tl.constexpr, DIRECT: tl.constexpr, USE_ASM: tl.constexpr,
    DOT_DTYPE: tl.constexpr, FMA_DIVISION: tl.constexpr,
):
    """slot_out[slot, cols] = weight[slot] * (down(intermediate[row]) + bias) for one expert's M tile.
    ``QUANTIZE_X`` (NVFP4 W4A4, direct slots): the intermediate is float32 and each program
    quantizes its slot's row, with the global scale of the ``NUM_AMAX`` partial maxima at
    ``amax_ptr`` (the gate/up GEMM's). ``DIRECT``: the combine is done here too
    (``_combine_if_last``, one arrival counter per (token, N tile) at ``counters_ptr``), into
    ``combined_ptr``; slots routed nowhere arrive without a row."""
    tl.static_assert(DIRECT or not QUANTIZE_X, "a slot's own row: direct slots only")
    expert, rows, routed, slots = tile_rows(tl.program_id(1), counts_ptr, slot_of_row_ptr, ids_ptr, EXPERTS, BLOCK_M,
                                            EXPERTS_POW2, DIRECT)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    token = tl.program_id(1) // TOP_K
    counter_ptr = counters_ptr + token * tl.num_programs(0) + tl.program_id(0)
    if expert >= EXPERTS:
        if DIRECT:
            _combine_if_last(out_ptr, ids_ptr, counter_ptr, combined_ptr, token, cols, N, EXPERTS, TOP_K, BLOCK_N)
        return
    x_rows = tl.where(routed, rows, ROWS)  # ROWS: a row that reads as zeros
    w_rows = tl.minimum(cols, N - 1)
    w_ptr += expert.to(tl.int64) * (N * HALF_K)
    s_ptr += expert.to(tl.int64) * (N * K_GROUPS)
    if IS_MXFP4:
        exponent = mx_row_exponent(s_ptr, w_rows, 0, K_GROUPS, K_GROUPS, BLOCK_N, SCALE_WORDS)
    else:
        exponent = 0
    if QUANTIZE_X:
        x_gs = activation_global_scale(x_gs_ptr, amax_ptr, NUM_AMAX, x_ptr, ROWS, K, K, "partials", AMAX_BLOCK, 1, 2)
    else:
        x_gs = given_global_scale(x_gs_ptr, HAS_X_SCALE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if QUANTIZE_X:
            x = slot_row_tile(x_ptr + tl.program_id(1) * K, k0, K, x_gs, GROUP, IS_MXFP4, FMA_DIVISION, EVEN_K, BLOCK_M,
                              BLOCK_K, DOT_DTYPE)
        else:
            x = activation_tile(x_ptr, x_rows, k0, ROWS, K, K, EVEN_K, BLOCK_K, DOT_DTYPE)
        w_even, w_odd = weight_tile(w_ptr, s_ptr, w_rows, exponent, k0, HALF_K, K_GROUPS, GROUP, IS_MXFP4, EVEN_K,
                                    SCALE_WORDS, BLOCK_N, BLOCK_K, USE_ASM, DOT_DTYPE)
        acc = dot_even_odd(acc, x, w_even, w_odd, BLOCK_M, BLOCK_K)
    alpha = tl.load(w_gs_ptr) * x_gs
    y = undo_decode_factor(acc, exponent, IS_MXFP4) * alpha
    if HAS_BIAS:
        y += tl.load(bias_ptr + expert * N + w_rows).to(tl.float32)[None, :]
    y *= tl.load(topk_weights_ptr + slots, mask=routed, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + slots[:, None] * N + cols[None, :], y, mask=routed[:, None] & (cols[None, :] < N))
    if DIRECT:
        _combine_if_last(out_ptr, ids_ptr, counter_ptr, combined_ptr, token, cols, N, EXPERTS, TOP_K, BLOCK_N)


@triton.jit
def _combine_kernel(src_ptr, ids_ptr, out_ptr, row_of_slot_ptr, weights_ptr, bias_ptr, N, EXPERTS,
                    TOP_K: tl.constexpr, WEIGHTED_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[token] = the sum over its choices j (in order) of its slots' outputs; slots routed to no
    expert (id outside [0, E), rows never written) add nothing.

    A slot's output is ``src[token * k + j]`` (float32, routing weight and bias applied by the down
    GEMM), or with ``WEIGHTED_ROWS`` ``weight * (src[row_of_slot[slot]] + bias[expert])``: the
    down GEMM's row of that slot (a library GEMM with no such epilogue)."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slot = token * TOP_K + j
        expert = tl.load(ids_ptr + slot)
        routed = (expert >= 0) & (expert < EXPERTS)
        mask = (cols < N) & routed
        if WEIGHTED_ROWS:
            row = tl.load(row_of_slot_ptr + slot, mask=routed, other=0).to(tl.int64)
            value = tl.load(src_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                value += tl.load(bias_ptr + expert * N + cols, mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(mask, value * tl.load(weights_ptr + slot).to(tl.float32), 0.0)
        else:
            acc += tl.load(src_ptr + slot * N + cols, mask=mask, other=0.0)
    tl.store(out_ptr + token * N + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)


def combine_slots(
    src: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: int,
    out_dtype: torch.dtype,
    row_of_slot: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each token's output (T, N): the sum of its slots' rows of ``src``, float32 (T * k, N) with
    the routing weights applied; or, given ``row_of_slot``, ``topk_weights * (src[row] + bias)``
    (``_combine_kernel``)."""
    tokens, top_k = topk_ids.shape
    size = src.shape[1]
    out = torch.empty((tokens, size), dtype=out_dtype, device=src.device)
    block = min(1024, next_power_of_2(size))
    weighted = row_of_slot is not None
    _combine_kernel[(tokens, cdiv(size, block))](
        src, topk_ids.contiguous(), out,
        row_of_slot if weighted else src, topk_weights.contiguous() if weighted else src,
        bias.contiguous() if bias is not None else src, size, experts,
        TOP_K=top_k, WEIGHTED_ROWS=weighted, HAS_BIAS=bias is not None, BLOCK_N=block,
    )
    return out


DIRECT_SLOTS = 16
"""At most this many (token, choice) slots run as direct slots (``use_direct_slots``)."""


def use_direct_slots(tokens: int, top_k: int, experts: int) -> bool:
    """Whether each M tile of the two GEMMs is one slot, its expert read from the routing, instead
    of rows grouped by expert: no dispatch launch, but an expert chosen by several tokens has its
    weight decoded once per slot. So: a few slots, and few expected repeats, the cross-token slot
    pairs ``C(T, 2) * k**2`` over E experts at most 1/2 (always at 1 token: top-k experts are
    distinct). Measured on an H100 (``benchmarks/RESULTS.md``): at 1 token 5-10% faster on
    Qwen3-30B-A3B and gpt-oss-120b; slower once slots repeat experts (Mixtral at 4 tokens, 14%)."""
    return tokens * top_k <= DIRECT_SLOTS and tokens * (tokens - 1) * top_k * top_k <= experts


@dataclass(frozen=True)
class GemmTiles:
    """The tiles of one of the two grouped GEMMs. ``scale_words``: read the scale bytes as 32-bit
    words where they are aligned (``gemm.scale_words``); at decode that is faster for MXFP4 and
    often slower for NVFP4 (``benchmarks/RESULTS.md``)."""

    block_n: int
    block_k: int
    num_warps: int
    scale_words: bool = True


@dataclass(frozen=True)
class MoeConfig:
    """Tiles of the two grouped GEMMs; ``block_m`` (shared) is also the dispatch's row alignment."""

    block_m: int
    gate_up: GemmTiles
    down: GemmTiles
    num_stages: int = 3


def _block_k(k: int, widths: tuple[int, ...]) -> int:
    """The first K tile of ``widths`` that divides K (no masked tail), else the first (masked), and
    never wider than K rounded up to a power of two."""
    dividing = [width for width in widths if k % width == 0]
    return min(dividing[0] if dividing else widths[0], max(32, next_power_of_2(k)))


def choose_moe_config(tokens: int, top_k: int, experts: int, hidden: int, inter: int, fmt: str) -> MoeConfig:
    """Tiles by the average rows per expert, from sweeps on an H100 (``benchmarks/tune_moe.py``,
    RESULTS.md). Decode (direct slots, or at most 16 rows per expert): 16-row tiles over 32 or 64
    columns, long K tiles of 2-4 warps (a masked tail beats shorter tiles: gpt-oss's K = 2880 runs
    256-wide tiles in 16-22% less time than the 64 that divide it), the gate/up GEMM on 32 columns, the
    down GEMM as measured best for each; scale words for MXFP4 only. Prefill: 128x128 tiles with 8
    warps (9% faster than 64x64 at 4096 tokens). Splitting K at decode was measured and dropped."""
    rows_per_expert = tokens * top_k / experts
    mx = get_format(fmt) is MXFP4
    if use_direct_slots(tokens, top_k, experts):
        return MoeConfig(16, GemmTiles(32, _block_k(hidden, (256,)), 4, mx), GemmTiles(32, _block_k(inter, (256,)), 2, mx))
    if rows_per_expert <= 16:
        return MoeConfig(16, GemmTiles(32, _block_k(hidden, (256,)), 2, mx), GemmTiles(64, _block_k(inter, (128,)), 2, mx))
    widths = (128, 64, 32)
    if rows_per_expert <= 64:
        return MoeConfig(64, GemmTiles(64, _block_k(hidden, widths), 4), GemmTiles(64, _block_k(inter, widths), 4))
    return MoeConfig(128, GemmTiles(128, _block_k(hidden, widths), 8), GemmTiles(128, _block_k(inter, widths), 8))


NVFP4_IN_GEMM_K = 2048
"""NVFP4 rows up to this long are quantized inside the GEMMs at direct slots (``quantize_in_gemms``)."""


def quantize_in_gemms(direct_w4a4: bool, mxfp4: bool, x_amax_in_program: bool, hidden: int, inter: int,
                      cfg: MoeConfig) -> tuple[bool, bool]:
    """Whether W4A4 at direct slots quantizes the hidden states (in the gate/up GEMM) and NVFP4's
    intermediate (in the down GEMM) inside the GEMMs (``slot_row_tile``) rather than in launches
    of their own (with, for the intermediate, a zeroed amax).

    Every N-tile program repeats its row's quantization, so this pays where the launches it saves
    cost more: measured on an H100 at one token (graph replays, ``benchmarks/RESULTS.md``), MXFP4's
    hidden states gain 1.3-10.9 us on Qwen3-30B-A3B, Mixtral and DeepSeek-V3; NVFP4 (about 40
    instructions per element, and the global scale's maxima) gains on rows of up to 2048 (Qwen3
    4.2 us, DeepSeek-V3's intermediate 2.5 us) and loses on longer ones (Mixtral: 2.1 us on its
    hidden states, 9.5 us on its 14336-wide intermediate); and rows whose K tiles end in a masked
    tail (gpt-oss-120b's 2880) lose 6.6 us (MXFP4) to 13.4 us (NVFP4's intermediate). NVFP4's hidden
    states also need their amax taken by every program (``x_amax_in_program``)."""
    hidden_fits = direct_w4a4 and hidden % cfg.gate_up.block_k == 0
    inter_fits = direct_w4a4 and not mxfp4 and inter % cfg.down.block_k == 0 and inter <= NVFP4_IN_GEMM_K
    return hidden_fits and (mxfp4 or (x_amax_in_program and hidden <= NVFP4_IN_GEMM_K)), inter_fits


def _tile_args(tiles: GemmTiles, k: int, group: int, scales: torch.Tensor) -> dict:
    """One grouped GEMM's tile constants and launch options, for a K of ``k``."""
    return dict(BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, EVEN_K=k % tiles.block_k == 0, num_warps=tiles.num_warps,
                SCALE_WORDS=tiles.scale_words and scale_words(k, tiles.block_k, group, scales))


def _partial_maxima(programs: int, device: torch.device) -> torch.Tensor:
    """The gate/up GEMM's partial maxima, one per program: left uninitialized, since every program
    writes its own (0 where its slot is routed nowhere)."""
    return torch.empty(programs, dtype=torch.float32, device=device)


def fp4_moe(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_packed: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_global_scale: torch.Tensor,
    down_packed: torch.Tensor,
    down_scales: torch.Tensor,
    down_global_scale: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    fmt: str,
    act_mode: str,
    activation: str,
    alpha: float,
    limit: float,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """Triton version of ``fp4::moe`` (arguments validated by the op)."""
    tokens, size = hidden.shape
    experts, two_inter, _ = gate_up_packed.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    slots = tokens * top_k
    if slots == 0:
        return hidden.new_zeros((tokens, size))
    spec = get_format(fmt)
    cfg = config or choose_moe_config(tokens, top_k, experts, size, inter, fmt)
    ids = topk_ids.reshape(-1).contiguous()
    direct = use_direct_slots(tokens, top_k, experts)
    if direct:  # M tile t is slot t: no dispatch launch
        rows = tiles = slots
        slot_of_row = counts = ids  # not read
        experts_pow2 = 1
    else:
        dispatch = dispatch_tokens(ids, experts, cfg.block_m)
        slot_of_row, counts, experts_pow2 = dispatch.slot_of_row, dispatch.counts, dispatch.experts_pow2
        rows, tiles = slot_of_row.numel(), dispatch.tiles
    check_offsets(max(tokens, slots, rows), max(size, inter))
    check_offsets(two_inter, size // 2)
    target = kernel_target(hidden.device)
    dot_dtype = target.dot_dtype
    kernel_args = dict(EXPERTS_POW2=experts_pow2, DIRECT=direct, USE_ASM=target.bf16x2_multiply,
                       DOT_DTYPE=target.tl_dot_dtype, BLOCK_M=cfg.block_m, GROUP=spec.group_size,
                       IS_MXFP4=spec is MXFP4, FMA_DIVISION=target.compiled, num_stages=cfg.num_stages)
    w4a4 = act_mode == "fp4"
    if w4a4 and spec is MXFP4 and cfg.gate_up.block_n % spec.group_size:
        raise ValueError(f"MXFP4 W4A4 quantizes the intermediate in tiles of block_n columns, which must hold whole "
                         f"groups of {spec.group_size}; got the gate/up GEMM's block_n={cfg.gate_up.block_n}")
    nvfp4_w4a4 = w4a4 and spec is not MXFP4  # activations carry a global scale
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    x_amax_tiles = in_program_amax(x) if nvfp4_w4a4 else None  # NVFP4's scale from x, in every program
    quantize_x, quantize_intermediate = quantize_in_gemms(
        direct and w4a4, spec is MXFP4, x_amax_tiles is not None, size, inter, cfg)
    amax_tile_m, amax_tile_k = x_amax_tiles if quantize_x and x_amax_tiles else (1, 2)  # fixed unless used
    x_global_scale = gate_up_global_scale  # not read unless nvfp4_w4a4
    if w4a4 and not quantize_x:
        x, gs = fp4_fake_quantize(x, fmt, None, dot_dtype)
        x_global_scale = x_global_scale if gs is None else gs
    gate_up_grid = (cdiv(inter, cfg.gate_up.block_n), tiles)
    if quantize_intermediate:
        amax = _partial_maxima(gate_up_grid[0] * gate_up_grid[1], hidden.device)
    else:
        amax = torch.zeros((), dtype=torch.float32, device=hidden.device) if nvfp4_w4a4 else gate_up_global_scale
    gate_up_packed, gate_up_scales = gate_up_packed.contiguous(), gate_up_scales.contiguous()
    down_packed, down_scales = down_packed.contiguous(), down_scales.contiguous()
    intermediate = torch.empty((rows, inter), dtype=torch.float32 if nvfp4_w4a4 else dot_dtype, device=hidden.device)
    _gate_up_kernel[gate_up_grid](
        x, slot_of_row, counts, ids, gate_up_packed, gate_up_scales, gate_up_global_scale,
        x_global_scale, gate_up_bias.contiguous() if gate_up_bias is not None else amax, intermediate, amax,
        tokens, inter, size, size // 2, size // spec.group_size, x.stride(0), experts, float(alpha), float(limit),
        TOP_K=top_k, CLAMPED=activation == "clamped_swiglu", HAS_BIAS=gate_up_bias is not None,
        HAS_X_SCALE=nvfp4_w4a4, QUANTIZE_X=quantize_x, QUANTIZE_OUT=w4a4 and spec is MXFP4, TRACK_AMAX=nvfp4_w4a4,
        AMAX_PARTIALS=quantize_intermediate, AMAX_TILE_M=amax_tile_m, AMAX_TILE_K=amax_tile_k,
        **_tile_args(cfg.gate_up, size, spec.group_size, gate_up_scales), **kernel_args,
    )
    if nvfp4_w4a4 and not quantize_intermediate:
        # The intermediate's global scale needs its amax over every row first: a pass of its own.
        intermediate, x_global_scale = fp4_fake_quantize(intermediate, fmt, None, dot_dtype, finite_amax=amax)
    slot_out = torch.empty((slots, size), dtype=torch.float32, device=hidden.device)
    weights = topk_weights.reshape(-1).contiguous()
    down_grid = (cdiv(size, cfg.down.block_n), tiles)
    if direct:  # the down GEMM combines (``_combine_if_last``): no launch of its own
        combined = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        counters = arrival_counters(hidden.device, tokens * down_grid[0], down_packed)
    else:
        combined, counters = slot_out, counts  # not read
    _down_kernel[down_grid](
        intermediate, slot_of_row, counts, ids, weights, down_packed, down_scales, down_global_scale,
        x_global_scale, down_bias.contiguous() if down_bias is not None else amax, slot_out, amax, combined, counters,
        rows, size, inter, inter // 2, inter // spec.group_size, experts, amax.numel(),
        HAS_BIAS=down_bias is not None, HAS_X_SCALE=nvfp4_w4a4, QUANTIZE_X=quantize_intermediate,
        AMAX_BLOCK=next_power_of_2(amax.numel()) if quantize_intermediate else 1, TOP_K=top_k,
        **_tile_args(cfg.down, inter, spec.group_size, down_scales), **kernel_args,
    )
    return combined if direct else combine_slots(slot_out, topk_ids, experts, hidden.dtype)
