"""fp4 GEMM kernel: y = alpha * (a @ w.T) + bias with an fp4 weight (N, K) in its canonical form.

Hopper has no fp4 tensor cores, so weight tiles are decoded in registers and multiplied on bf16
tensor cores with float32 accumulation. The decode is what bounds these kernels (a previous
version spent 17 instructions per weight element on it and reached ~1 TB/s), so it is built to be
cheap, and counted in SASS:

- ``decode_e2m1_pairs`` turns 4 packed bytes into 8 bf16 values with bit placement and one bf16x2
  multiply per pair (19 instructions for 8 values; 4.2 per weight element for the whole loop). It yields the even (low nibble) and odd
  (high nibble) elements of each byte as two tensors, so the kernel runs two dots per K step, one
  on the even and one on the odd columns of the activation: no interleaving of decoded values.
- The multiply applies ``block_scale * 2**126 / 2**E`` (see the codec), exact in bf16:
  NVFP4 uses a constant ``E = 8`` (every ``e2m1 * e4m3`` product then is a normal bf16 between
  2**-18 and 10.5); MXFP4 uses, per weight row, the largest e8m0 exponent of the program's K range,
  so every group within 2**125 of its row's largest is exact (smaller ones flush to zero). The
  ``2**E`` goes back into the float32 result in the epilogue, with ``alpha`` and the bias.

The activation is the A operand as it is: bf16 for W4A16 (fp16 and fp32 activations are rounded
to bf16), or, for W4A4, the exact ``e2m1 * scale`` values written by ``fp4_fake_quantize``.

Work split: a fixed number of programs (``programs_per_sm`` per SM) share the (output tile,
K tile) units. With fewer output tiles than programs (decode-sized M), K is split evenly, one
run of K tiles per program; with more, each program takes an equal share of the units in order
(stream-K), so no SM ends up with twice the work of another (measured: one program per tile left
some SMs with two tiles and others with one). The programs of one output tile add their float32
partial sums in a fixed order (deterministic): each stores its partial, and the last to arrive
(counted with an atomic on a per-tile counter that it then resets) sums them and writes the
output. One launch, no host sync, CUDA-graph safe. Under the interpreter (CPU) tiles are
float32 (``DOT_DTYPE``).
"""

import concurrent.futures
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...formats.spec import MXFP4, get_format
from .codecs import decode_e2m1_pairs, exp2_int
from .launch import cdiv, next_power_of_2
from .target import kernel_target

_TWO_POW_119 = tl.constexpr(2.0**119)


@triton.jit
def _block_factor(scale_bytes, row_exponent, IS_MXFP4: tl.constexpr):
    """float32 ``block_scale * 2**126 / 2**E`` for ``decode_e2m1_pairs`` (see the module docstring),
    from int32 scale bytes, in a few integer operations per group.

    MXFP4: ``2**(s - row_exponent + 126)``, zero where that is below 2**-126 (the group is then
    below 2**-125 of its row's largest and flushes); the row's NaN is applied in the epilogue.
    NVFP4: the e4m3 byte shifted into a float32 is ``scale * 2**-120`` (subnormal scales included),
    times 2**238 = ``scale * 2**118`` (in two steps: 2**238 is not a float32); 0x7F is NaN.
    """
    if IS_MXFP4:
        return (tl.maximum(scale_bytes - row_exponent + 253, 0) << 23).to(tl.float32, bitcast=True)
    else:
        scale = (scale_bytes << 20).to(tl.float32, bitcast=True) * _TWO_POW_119
        return tl.where(scale_bytes == 0x7F, float("nan"), scale * _TWO_POW_119)


@triton.jit
def _load_scale_words(s_ptr, rows, g0, K_GROUPS, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """Scale bytes of groups [g0, g0 + GROUPS) of ``rows`` (int32, (BLOCK_N, GROUPS)), loaded as
    32-bit words: Triton pipelines (cp.async) loads of at least 4 bytes per thread, not byte loads,
    and an unpipelined load here would stall every K step on memory latency. Needs K_GROUPS and
    g0 to be multiples of 4."""
    words = tl.arange(0, GROUPS // 4)
    word = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (K_GROUPS // 4) + (g0 // 4 + words)[None, :])
    low = tl.join(word & 0xFF, (word >> 16) & 0xFF)
    high = tl.join((word >> 8) & 0xFF, (word >> 24) & 0xFF)
    return tl.reshape(tl.join(low, high), (BLOCK_N, GROUPS))


@triton.jit
def _row_max_exponent(s_ptr, rows, g_start, g_end, K_GROUPS, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
                      WORDS: tl.constexpr):
    """Per weight row, the largest e8m0 scale byte among groups [g_start, g_end) (int32, (BLOCK_N,)).
    Elementwise maxima over chunks, one reduction at the end; ``WORDS`` reads 32-bit words (needs
    K_GROUPS and g_start multiples of 4), which takes a quarter of the load instructions."""
    largest = tl.zeros((BLOCK_N, CHUNK // 4 if WORDS else CHUNK), dtype=tl.int32)
    for g0 in range(g_start, g_end, CHUNK):
        if WORDS:
            words = g0 // 4 + tl.arange(0, CHUNK // 4)
            word = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (K_GROUPS // 4) + words[None, :],
                           mask=words[None, :] < g_end // 4, other=0)
            low = tl.maximum(word & 0xFF, (word >> 8) & 0xFF)
            high = tl.maximum((word >> 16) & 0xFF, (word >> 24) & 0xFF)
            largest = tl.maximum(largest, tl.maximum(low, high))
        else:
            groups = g0 + tl.arange(0, CHUNK)
            scale_bytes = tl.load(s_ptr + rows[:, None] * K_GROUPS + groups[None, :], mask=groups[None, :] < g_end,
                                  other=0)
            largest = tl.maximum(largest, scale_bytes.to(tl.int32))
    return tl.max(largest, axis=1)


@triton.jit
def mx_row_exponent(s_ptr, w_rows, g_start, g_end, K_GROUPS, BLOCK_N: tl.constexpr, SCALE_WORDS: tl.constexpr):
    """MXFP4: the ``E`` of each weight row for ``weight_tile`` (its largest scale byte over groups
    [g_start, g_end)), at least 1: a row whose scales are all 2**-127 (byte 0) still has
    2**(E - 127) normal."""
    return tl.maximum(_row_max_exponent(s_ptr, w_rows, g_start, g_end, K_GROUPS, BLOCK_N, 64, SCALE_WORDS), 1)


@triton.jit
def weight_tile(w_ptr, s_ptr, w_rows, exponent, k0, HALF_K, K_GROUPS, GROUP: tl.constexpr, IS_MXFP4: tl.constexpr,
                EVEN_K: tl.constexpr, SCALE_WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                USE_ASM: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Weight rows ``w_rows``, columns [k0, k0 + BLOCK_K), decoded to ``e2m1 * block_scale``
    times ``2**126 / 2**E`` (see the module docstring): the even and the odd columns, each
    (BLOCK_N, BLOCK_K / 2) in DOT_DTYPE (``dot_even_odd`` takes them)."""
    byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    if EVEN_K:
        packed = tl.load(w_ptr + w_rows[:, None] * HALF_K + byte_cols[None, :])
    else:
        packed = tl.load(w_ptr + w_rows[:, None] * HALF_K + byte_cols[None, :], mask=byte_cols[None, :] < HALF_K, other=0)
    if SCALE_WORDS:
        scale_bytes = _load_scale_words(s_ptr, w_rows, k0 // GROUP, K_GROUPS, BLOCK_N, BLOCK_K // GROUP)
    else:
        groups = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        scale_bytes = tl.load(s_ptr + w_rows[:, None] * K_GROUPS + groups[None, :],
                              mask=groups[None, :] < K_GROUPS, other=0).to(tl.int32)
    factor = _block_factor(scale_bytes, exponent[:, None] if IS_MXFP4 else 0, IS_MXFP4).to(DOT_DTYPE)
    factor = tl.reshape(tl.broadcast_to(factor[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP // 2)),
                        (BLOCK_N, BLOCK_K // 2))
    w_even, w_odd = decode_e2m1_pairs(packed, factor, USE_ASM)
    return w_even.to(DOT_DTYPE), w_odd.to(DOT_DTYPE)


@triton.jit
def activation_tile(x_ptr, rows, k0, M, K, stride_xm, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """x[rows, k0:k0 + BLOCK_K] as DTYPE; rows >= M (and columns >= K) read as 0."""
    ks = k0 + tl.arange(0, BLOCK_K)
    x_mask = rows[:, None] < M
    if not EVEN_K:
        x_mask = x_mask & (ks[None, :] < K)
    return tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=x_mask, other=0.0).to(DTYPE)


@triton.jit
def dot_even_odd(acc, x, w_even, w_odd, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + x @ w.T for the (even, odd) column halves of a ``weight_tile``: two dots, no interleave."""
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
    acc = tl.dot(x_even, tl.trans(w_even), acc)
    return tl.dot(x_odd, tl.trans(w_odd), acc)


@triton.jit
def undo_decode_factor(acc, exponent, IS_MXFP4: tl.constexpr):
    """The float32 product of ``weight_tile`` values back at ``e2m1 * block_scale`` scale: MXFP4
    times ``2**(E - 127)`` per weight row (a NaN scale, E = 255, makes the row's outputs NaN, as in
    the reference); NVFP4 times 2**8."""
    if IS_MXFP4:
        return tl.where(exponent[None, :] == 255, float("nan"), acc * exp2_int(tl.minimum(exponent, 254) - 127)[None, :])
    else:
        return acc * 256.0


@triton.jit
def _k_step(acc, x_ptr, w_ptr, s_ptr, rows, w_rows, exponent, k0, M, K, HALF_K, K_GROUPS, stride_xm,
            GROUP: tl.constexpr, IS_MXFP4: tl.constexpr, EVEN_K: tl.constexpr, SCALE_WORDS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr,
            DOT_DTYPE: tl.constexpr):
    """acc + x[rows, k0:k0+BLOCK_K] @ w[w_rows, k0:k0+BLOCK_K].T: load, decode, two dots."""
    w_even, w_odd = weight_tile(w_ptr, s_ptr, w_rows, exponent, k0, HALF_K, K_GROUPS, GROUP, IS_MXFP4, EVEN_K,
                                SCALE_WORDS, BLOCK_N, BLOCK_K, USE_ASM, DOT_DTYPE)
    x = activation_tile(x_ptr, rows, k0, M, K, stride_xm, EVEN_K, BLOCK_K, DOT_DTYPE)
    return dot_even_odd(acc, x, w_even, w_odd, BLOCK_M, BLOCK_K)


@triton.jit
def given_global_scale(x_gs_ptr, HAS_X_SCALE: tl.constexpr):
    """The activation's global scale from device memory (NVFP4 W4A4), else 1."""
    if HAS_X_SCALE:
        return tl.load(x_gs_ptr)
    else:
        return 1.0


@triton.jit
def output_alpha(w_gs_ptr, x_gs_ptr, cols, N, HAS_X_SCALE: tl.constexpr, ROW_SCALED: tl.constexpr):
    """alpha for the output columns ``cols``: the weight's global scale times the activation's,
    multiplied here from device memory rather than by a launch of its own before the GEMM. A
    scalar, or (``ROW_SCALED``: a weight fused from projections with their own global scales) one
    weight scale per column, (1, len)."""
    if ROW_SCALED:
        alpha = tl.load(w_gs_ptr + cols, mask=cols < N, other=0.0)[None, :]
    else:
        alpha = tl.load(w_gs_ptr)
    return alpha * given_global_scale(x_gs_ptr, HAS_X_SCALE)


@triton.jit
def _first_unit(program, UNITS, PROGRAMS):
    """Stream-K partition: program p owns units [ceil(p * U / P), ceil((p + 1) * U / P)), so unit u
    belongs to program u * P // U; every program gets U / P units, give or take one."""
    return (program * UNITS + PROGRAMS - 1) // PROGRAMS


@triton.jit
def _fp4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, w_gs_ptr, x_gs_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, HALF_K, K_GROUPS, stride_xm, TILES_N, K_TILES, UNITS,
    GROUP: tl.constexpr, IS_MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_X_SCALE: tl.constexpr,
    ROW_SCALED: tl.constexpr, EVEN_K: tl.constexpr, SCALE_WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_ASM: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Stream-K: this program's share of the (output tile, K tile) units, in order. Each run of
    units within one output tile is a segment; a segment covering the whole K range writes the
    output, others add up through ``partial_ptr`` (two (BLOCK_M, BLOCK_N) slots per program: only
    its first and last segments can cover part of a tile): the last program of a tile to arrive (counted on ``counter_ptr``, which it resets)
    sums its contributors' slots in program order (deterministic) and writes the output."""
    programs = tl.num_programs(0)
    program = tl.program_id(0)
    unit = _first_unit(program, UNITS, programs)
    last_unit = _first_unit(program + 1, UNITS, programs)
    first_tile = unit // K_TILES
    while unit < last_unit:
        tile = unit // K_TILES
        k_first = unit - tile * K_TILES
        k_last = tl.minimum(K_TILES, k_first + last_unit - unit)
        rows = (tile // TILES_N) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tile % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows past N read row N - 1 (valid memory, results never stored): no mask on the weight loads.
        w_rows = tl.minimum(cols, N - 1)
        if IS_MXFP4:
            exponent = mx_row_exponent(s_ptr, w_rows, k_first * (BLOCK_K // GROUP),
                                       tl.minimum(k_last * (BLOCK_K // GROUP), K_GROUPS), K_GROUPS, BLOCK_N, SCALE_WORDS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_first, k_last):
            acc = _k_step(acc, x_ptr, w_ptr, s_ptr, rows, w_rows, exponent if IS_MXFP4 else 0, kt * BLOCK_K, M, K,
                          HALF_K, K_GROUPS, stride_xm, GROUP, IS_MXFP4, EVEN_K, SCALE_WORDS, BLOCK_M, BLOCK_N, BLOCK_K,
                          USE_ASM, DOT_DTYPE)
        acc = undo_decode_factor(acc, exponent if IS_MXFP4 else 0, IS_MXFP4)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tile_offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        if (k_first == 0) & (k_last == K_TILES):
            _store_output(acc, output_alpha(w_gs_ptr, x_gs_ptr, cols, N, HAS_X_SCALE, ROW_SCALED), bias_ptr, out_ptr,
                          rows[:, None] * N + cols[None, :], cols, mask, N, HAS_BIAS)
        else:
            slot = program * 2 + (tile != first_tile)  # only a first and a last segment can be partial
            tl.store(partial_ptr + slot * (BLOCK_M * BLOCK_N) + tile_offsets, acc, mask=mask)
            # Every thread's partial store precedes the release; the last program of the tile sums.
            tl.debug_barrier()
            first = (tile * K_TILES * programs) // UNITS
            contributors = ((tile * K_TILES + K_TILES - 1) * programs) // UNITS - first + 1
            arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == contributors - 1:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for q in range(first, first + contributors):
                    q_slot = q * 2 + (tile != _first_unit(q, UNITS, programs) // K_TILES)
                    # .cg: read from L2, never from a line this SM's L1 kept from an earlier call.
                    acc += tl.load(partial_ptr + q_slot * (BLOCK_M * BLOCK_N) + tile_offsets, mask=mask, other=0.0,
                                   cache_modifier=".cg")
                _store_output(acc, output_alpha(w_gs_ptr, x_gs_ptr, cols, N, HAS_X_SCALE, ROW_SCALED), bias_ptr, out_ptr,
                              rows[:, None] * N + cols[None, :], cols, mask, N, HAS_BIAS)
                # Relaxed: only a later launch reads the counter again, and a launch boundary orders
                # it. The default (acq_rel) put a memory barrier, which waits for the output
                # stores, on the last program's path: 0.3-0.7 us a call (benchmarks/RESULTS.md).
                tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed")
        unit += k_last - k_first


@triton.jit
def _store_output(acc, alpha, bias_ptr, out_ptr, offsets, cols, mask, N, HAS_BIAS: tl.constexpr):
    """out = alpha * acc + bias, in out's dtype."""
    acc = acc * alpha
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of ``_fp4_gemm_kernel``; ``programs_per_sm`` is how many
    programs K splitting aims for when the output tiles alone are fewer (decode-sized M);
    ``short_run_splits``, if set, caps the K splits where that aim would leave each program short
    runs of K tiles (see ``_programs``)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 2
    short_run_splits: int | None = None


def choose_config(m: int, n: int, k: int) -> GemmConfig:
    """The configuration for an (M, N, K) problem, by M bucket: the best of sweeps on an H200 and an
    H100 (``benchmarks/tune_linear.py``, recorded in ``benchmarks/RESULTS.md``).

    Up to 16 rows, programs of 2 warps over 64 weight rows and K tiles of 256 (4 programs per SM)
    beat 4-warp programs over 128 rows by about 9% on the H100: twice the warps per SM hide more of
    the load latency, and the longer K tile halves the per-step barrier and pipeline cost. At 17-32
    rows the same programs take K tiles of 128: with 256 the MXFP4 kernel spills registers inside
    its K loop on sm_90 (``tests/sm90.py``), and the 128 tile was 1.62x of bf16 against 1.30x
    (MXFP4; NVFP4 1.61x against 1.54x) in the 2026-11-23 H100 sweep. Up to 16 rows, small
    layers split K at most 4 ways (``short_run_splits``): 2-21% faster on the 10 of 14 small
    layers it changes (NVFP4, M=1, H100), the same on the others."""
    block_k = max(32, min(128, next_power_of_2(k)))  # each of the two dots takes BLOCK_K / 2 >= 16
    if m <= 16 and k % 256 == 0:
        return GemmConfig(16, 64, 256, num_warps=2, num_stages=3, programs_per_sm=4, short_run_splits=4)
    if 16 < m <= 32 and k % 128 == 0:
        return GemmConfig(32, 64, 128, num_warps=2, num_stages=3, programs_per_sm=4)
    if m <= 32:
        return GemmConfig(16 if m <= 16 else 32, 128, block_k, num_warps=4, num_stages=4)
    if m <= 64:
        return GemmConfig(64, 64, block_k, num_warps=4, num_stages=3)
    return GemmConfig(128, 64, block_k, num_warps=4, num_stages=3)


def scale_words(k: int, block_k: int, group: int, scales: torch.Tensor) -> bool:
    """Whether ``scales``' bytes can be loaded as 32-bit words: every K tile whole and 4-group
    aligned, and the tensor 4-byte aligned."""
    return k % block_k == 0 and block_k % (4 * group) == 0 and (k // group) % 4 == 0 and scales.data_ptr() % 4 == 0


SHORT_RUN_K_TILES = 4
"""Runs of fewer K tiles than this per program count as short for ``GemmConfig.short_run_splits``."""


def _programs(tiles: int, k_tiles: int, wanted: int, short_run_splits: int | None = None) -> int:
    """How many programs share the (tile, K tile) units. With fewer tiles than ``wanted``, K is
    split evenly: each program then owns one run of K tiles of one tile (one pipeline fill, as in
    classic split-K). With more, ``wanted`` programs take equal shares (stream-K): every SM gets
    the same work, where one program per tile would leave some SMs with one tile and others two.

    Where splitting for ``wanted`` programs would leave runs shorter than ``SHORT_RUN_K_TILES``
    (small layers), K is split at most ``short_run_splits`` ways, if that still gives each program
    2 K tiles or more: such programs are mostly pipeline fill, and every split adds a partial sum
    to the tile's reduction (its stores, memory barrier, atomic and reads; measured at 2.0-3.9 us a
    call at M=1). On the H100 (NVFP4, M=1) that took 2048x2048 from 7.8 to 7.3 us, 2048x4096 from
    11.8 to 9.3, 4096x4096 from 12.1 to 10.6 (``benchmarks/RESULTS.md``)."""
    if tiles >= wanted:
        return wanted
    splits = max(1, wanted // tiles)
    if (short_run_splits and cdiv(k_tiles, splits) < SHORT_RUN_K_TILES
            and k_tiles >= 2 * short_run_splits):
        splits = min(splits, short_run_splits)
    splits = cdiv(k_tiles, cdiv(k_tiles, splits))  # runs of equal length
    return tiles * splits


def splits_a_tile(units: int, programs: int, k_tiles: int) -> bool:
    """Whether the stream-K partition of ``units`` (output tiles x ``k_tiles``) over ``programs``
    gives some output tile to several programs, which then add up through the arrival counters.
    When every program's first unit starts a tile and each owns whole tiles (as with one program per
    tile), no tile is shared: no counters, so no zeroing of them (a memset node per call in a CUDA
    graph). Conservative: an uneven share may still happen to end on tile boundaries."""
    return k_tiles > 1 and (units % programs != 0 or (units // programs) % k_tiles != 0)


_SPLIT_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}
_LAYER_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def arrival_counters(device: torch.device, tiles: int, layer: torch.Tensor) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile. Every launch leaves them zero again (the
    last program of a tile resets its counter), so they are allocated and zeroed once, not per call.

    - Outside CUDA-graph capture: kept per (device, stream), since kernels on one stream run in
      order. Each call also makes sure that the layer (its weight, ``layer``) has counters of its
      own, for a later capture.
    - During a capture: the layer's own counters, made by an earlier uncaptured call (CUDA-graph
      trees and ``torch.cuda.graph`` warm up first, and synchronize the device before capturing, so
      their zeroing is done). Per layer, not per stream: a graph may be replayed on any stream, and
      the zeroing must not be a node of the graph (it cost 1.3-1.6 us per GEMM in a replay,
      ``benchmarks/RESULTS.md``). So one layer's GEMMs must not run on two streams at once, as for
      any per-layer workspace (Marlin's locks in vLLM, for one). A layer first called during a
      capture gets counters allocated and zeroed in the graph (a memset node), as before."""
    on_gpu = device.type == "cuda"
    layer_key = (device, layer.data_ptr())
    kept = _LAYER_COUNTERS.get(layer_key)
    if on_gpu and torch.cuda.is_current_stream_capturing():
        return kept if kept is not None and kept.numel() >= tiles else torch.zeros(tiles, dtype=torch.int32, device=device)
    if on_gpu and (kept is None or kept.numel() < tiles):
        _LAYER_COUNTERS[layer_key] = _long_lived_empty(max(tiles, 256), device).zero_()
    stream = torch.cuda.current_stream(device).stream_id if on_gpu else 0
    counters = _SPLIT_COUNTERS.get((device, stream))
    if counters is None or counters.numel() < tiles:
        # A smaller predecessor is freed on its own stream: kernels queued on it finish first.
        counters = _long_lived_empty(max(tiles, 1024), device).zero_()  # zeroed on this stream, in order
        _SPLIT_COUNTERS[(device, stream)] = counters
    return counters


def _long_lived_empty(size: int, device: torch.device) -> torch.Tensor:
    """An int32 tensor that outlives the call, allocated in PyTorch's ordinary memory pool.

    CUDA-graph trees (``mode="reduce-overhead"``) run their warm-up calls uncaptured but with every
    allocation of the calling thread routed to the graphs' private pool; a tensor kept from such a
    call stays in that pool, which the trees then refuse ("tensor(s) in the cudagraph pool not
    tracked as outputs"). The routing follows the thread, so another thread allocates it, with
    the caller's stream current (the allocator hands a block out safely only to the stream it is
    allocated for); nothing runs on the GPU for that (``empty``)."""
    if device.type != "cuda":
        return torch.empty(size, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device)

    def allocate() -> torch.Tensor:
        with torch.cuda.stream(stream):
            return torch.empty(size, dtype=torch.int32, device=device)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as allocator:
        return allocator.submit(allocate).result()


def fp4_gemm(
    a: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    out_dtype: torch.dtype,
    config: GemmConfig | None = None,
    a_global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``alpha * (a @ w.T) + bias`` for a (M, K) with unit column stride and an fp4 weight (N, K).

    ``a`` is bf16 on the GPU (float32 in the interpreter): W4A16's activation, or W4A4's values
    from ``fp4_fake_quantize``. ``alpha`` is ``w_global_scale`` times ``a_global_scale`` (NVFP4
    W4A4's activation scale; ignored for MXFP4), float32 device tensors multiplied inside the
    kernel: one element each, or for ``w_global_scale`` one per weight row (N,) (a weight fused
    from projections with their own global scales).
    """
    m, k = a.shape
    n = w_packed.shape[0]
    spec = get_format(fmt)
    cfg = config or choose_config(m, n, k)
    target = kernel_target(a.device)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    # Scale bytes are read as 32-bit words when every K tile's are whole and aligned.
    words = scale_words(k, cfg.block_k, spec.group_size, w_scales)
    tiles_n = cdiv(n, cfg.block_n)
    tiles = cdiv(m, cfg.block_m) * tiles_n
    k_tiles = cdiv(k, cfg.block_k)
    units = tiles * k_tiles
    programs = _programs(tiles, k_tiles, cfg.programs_per_sm * target.multiprocessors, cfg.short_run_splits)
    partial = torch.empty((programs * 2, cfg.block_m, cfg.block_n), dtype=torch.float32, device=a.device)
    if splits_a_tile(units, programs, k_tiles):
        counters = arrival_counters(a.device, tiles, w_packed)
    else:  # never read (every output tile is one program's): any int32 memory, no allocation
        counters = partial.view(torch.int32)
    bias_arg = bias if bias is not None else out  # never read without HAS_BIAS
    has_x_scale = spec is not MXFP4 and a_global_scale is not None
    _fp4_gemm_kernel[(programs,)](
        a, w_packed, w_scales, w_global_scale, a_global_scale if has_x_scale else w_global_scale, bias_arg, out,
        partial, counters, m, n, k, k // 2, k // spec.group_size, a.stride(0), tiles_n, k_tiles, units,
        GROUP=spec.group_size, IS_MXFP4=spec is MXFP4, HAS_BIAS=bias is not None, HAS_X_SCALE=has_x_scale,
        ROW_SCALED=w_global_scale.numel() > 1, EVEN_K=k % cfg.block_k == 0, SCALE_WORDS=words,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        USE_ASM=target.bf16x2_multiply, DOT_DTYPE=target.tl_dot_dtype,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
