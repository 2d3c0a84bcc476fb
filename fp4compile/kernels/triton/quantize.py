"""Activation quantization kernel: x (M, K) -> packed e2m1 (M, K/2) + scale bytes (M, K/G).

Bit-for-bit the ``spec`` rule of ``formats`` (MXFP4 and NVFP4), in one pass over x for MXFP4 and
static-scale NVFP4. A dynamic NVFP4 global scale, ``amax * (1 / (6 * 448))`` over the finite
values, takes a second pass: an amax kernel writing partial maxima, whose maximum the quantize
kernel takes on the device (and writes the scale it makes, for the GEMM's alpha); for a small
bf16 x (decode sizes) each quantize program takes x's amax itself instead, saving the launch. No
host sync, CUDA-graph safe.
"""

import torch
import triton
import triton.language as tl

from ...formats.spec import MXFP4, get_format
from .codecs import (
    check_offsets, e4m3_value, e8m0_value, encode_e2m1, encode_e4m3, mxfp4_spec_exponent, round_to_e2m1,
)
from .launch import cdiv, next_power_of_2
from .target import kernel_target


@triton.jit
def _finite_amax_kernel(x_ptr, partials_ptr, M, K, stride_xm, TILES_K, TILES, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, BF16_WORDS: tl.constexpr):
    """partials_ptr[program] <- max |x| over the finite values of this program's tiles of x (M, K):
    tiles program, program + P, ... of the (BLOCK_M x BLOCK_K) tiles, row-major. Order-free and
    exact; no zeroed accumulator (no extra launch): readers take the maximum of the partials.
    ``BF16_WORDS``: aligned bf16 rows, read as 32-bit words (``bf16_finite_amax``)."""
    if BF16_WORDS:
        amax = bf16_finite_amax(x_ptr, tl.program_id(0), TILES, tl.num_programs(0), TILES_K, M, K, stride_xm,
                                BLOCK_M, BLOCK_K)
    else:
        amax = 0.0
        for tile in range(tl.program_id(0), TILES, tl.num_programs(0)):
            rows = (tile // TILES_K) * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = (tile % TILES_K) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask = (rows[:, None] < M) & (cols[None, :] < K)
            amax = tl.maximum(amax, finite_amax(tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask,
                                                        other=0.0)))
    tl.store(partials_ptr + tl.program_id(0), amax)


@triton.jit
def _bf16_words(x_ptr, rows, word0, M, K, stride_xm, BLOCK_K: tl.constexpr):
    """int32 words of bf16 pairs x[rows, 2 * word0 : 2 * word0 + BLOCK_K] (low half: the even
    element); 0 outside x. Needs 4-byte aligned rows (even stride and K, aligned pointer)."""
    words = word0 + tl.arange(0, BLOCK_K // 2)
    return tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_xm // 2) + words[None, :],
                   mask=(rows[:, None] < M) & (words[None, :] < K // 2), other=0)


@triton.jit
def _bf16_magnitude_max(x_ptr, first_tile, TILES, step, TILES_K, M, K, stride_xm, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, FINITE_ONLY: tl.constexpr):
    """The largest bf16 magnitude bits (``bits & 0x7FFF``, int32) over tiles first_tile,
    first_tile + step, ... < TILES of bf16 x (M, K), row-major; ``FINITE_ONLY`` leaves NaN and
    infinity (0x7F80 and up) out. Each word's two halves are masked in place, the odd element's
    left in the upper half until the end: one operation per element."""
    low = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.int32)
    high = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.int32)
    for tile in range(first_tile, TILES, step):
        rows = (tile // TILES_K) * BLOCK_M + tl.arange(0, BLOCK_M)
        words = _bf16_words(x_ptr, rows, (tile % TILES_K) * (BLOCK_K // 2), M, K, stride_xm, BLOCK_K)
        even, odd = words & 0x7FFF, words & 0x7FFF0000
        if FINITE_ONLY:
            even = tl.where(even < 0x7F80, even, 0)
            odd = tl.where(odd < 0x7F800000, odd, 0)
        low = tl.maximum(low, even)
        high = tl.maximum(high, odd)
    return tl.maximum(tl.max(tl.max(low, axis=1), axis=0), tl.max(tl.max(high, axis=1), axis=0) >> 16)


@triton.jit
def bf16_finite_amax(x_ptr, first_tile, TILES, step, TILES_K, M, K, stride_xm, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """max |x| over the finite values of bf16 x (M, K)'s (BLOCK_M x BLOCK_K) tiles first_tile,
    first_tile + step, ... < TILES (row-major), as float32; 0 when none is finite.

    Magnitudes compare as integers (``_bf16_magnitude_max``), where a float maximum also spends a
    conversion and a finiteness test on each element: bf16 magnitudes order as their bits, NaN
    and infinity (0x7F80 and up) above every finite value. So only a maximum that reaches 0x7F80
    needs the tiles again, leaving those out."""
    largest = _bf16_magnitude_max(x_ptr, first_tile, TILES, step, TILES_K, M, K, stride_xm, BLOCK_M, BLOCK_K, False)
    if largest >= 0x7F80:  # a NaN or an infinity: the finite maximum, in a second pass
        largest = _bf16_magnitude_max(x_ptr, first_tile, TILES, step, TILES_K, M, K, stride_xm, BLOCK_M, BLOCK_K,
                                      True)
    return (largest << 16).to(tl.float32, bitcast=True)


@triton.jit
def finite_amax(tile):
    """max |x| over the finite values of a 2-D tile (float32; 0 when none is finite)."""
    magnitude = tl.abs(tile.to(tl.float32))
    finite = tl.where(magnitude - magnitude == 0, magnitude, 0.0)
    return tl.max(tl.max(finite, axis=1), axis=0)


@triton.jit
def _divide_by_block(blocks, divisor, FMA_DIVISION: tl.constexpr):
    """``blocks / divisor[:, :, None]`` rounded to nearest as one division would; a zero divisor
    (an underflowed NVFP4 scale) gives 0, as in the reference.

    ``FMA_DIVISION`` (the GPU): one correctly rounded reciprocal per block and two FMAs per
    element instead of a division (Markstein's correction: q = x * r, then q + (x - q * d) * r is
    the correctly rounded quotient when r is 1/d rounded). Without it (the interpreter, whose fma
    rounds twice), a division per element."""
    if not FMA_DIVISION:
        return tl.where(divisor[:, :, None] == 0, 0.0, tl.math.div_rn(blocks, divisor[:, :, None]))
    # A divisor below 2**-100 (a tensor of tiny values) is scaled by 2**64 with x, so that its
    # reciprocal stays finite; scaling both by a power of two leaves the quotient as it was.
    shift = tl.where(divisor < 7.888609052210118e-31, 1.8446744073709552e19, 1.0)
    d = (divisor * shift)[:, :, None]
    x = blocks * shift[:, :, None]
    reciprocal = tl.math.div_rn(tl.full(divisor.shape, 1.0, tl.float32), divisor * shift)[:, :, None]
    q = x * reciprocal
    # Written as -((-residual) * r - q) so that a zero quotient keeps x's sign: -0 / d is -0,
    # while residual * r + q adds a +0 residual to -0, which is +0. Negations multiply by -1:
    # Triton's unary minus is 0 - v, which turns -0 into +0.
    residual = tl.fma(q * -1.0, d, x)
    q = tl.fma(residual * -1.0, reciprocal, q * -1.0) * -1.0
    return tl.where(d == 0, 0.0, q)


@triton.jit
def _quantize_blocks(blocks, gs, IS_MXFP4: tl.constexpr, FMA_DIVISION: tl.constexpr):
    """float32 blocks (R, G, GROUP) -> (scale bytes (R, G) int32, block scale values (R, G), the
    blocks divided by their scale times ``gs``, ready for e2m1 rounding). ``gs``: NVFP4's global
    scale (ignored for MXFP4)."""
    # The largest magnitude's bits, as an integer maximum: float32 magnitudes order as their bits,
    # with infinity and NaN above every finite value, so one maximum also finds a NaN or infinity
    # (which poisons its block) at one integer operation per element.
    amax_bits = tl.max(blocks.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=2)
    poisoned = amax_bits >= 0x7F800000
    if IS_MXFP4:
        scale = mxfp4_spec_exponent(amax_bits) + 127
        scale = tl.where(poisoned, 0xFF, scale)
        block_value = e8m0_value(scale)
        # x / 2**e is x * 2**-e exactly (e <= 125 for finite x, so 2**-e is a normal float32); a
        # poisoned block's codes are 0, as the reference's division by its infinite divisor gives.
        inverse = tl.where(poisoned, 0.0, e8m0_value(254 - scale))
        scaled = blocks * inverse[:, :, None]
    else:
        scale = encode_e4m3(tl.math.div_rn(amax_bits.to(tl.float32, bitcast=True), 6.0 * gs))
        scale = tl.where(poisoned, 0x7F, scale)
        block_value = e4m3_value(scale)
        scaled = _divide_by_block(blocks, block_value * gs, FMA_DIVISION)
    return scale, block_value, scaled


@triton.jit
def fake_quantize_tile(x, gs, GROUP: tl.constexpr, IS_MXFP4: tl.constexpr, FMA_DIVISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 tile (BLOCK_M, BLOCK_K) -> its ``e2m1 * block_scale`` values (float32; the global
    scale ``gs`` is left out, for the GEMM's alpha), bit for bit the reference quantizer's."""
    blocks = tl.reshape(x, (BLOCK_M, BLOCK_K // GROUP, GROUP))
    _, block_value, scaled = _quantize_blocks(blocks, gs, IS_MXFP4, FMA_DIVISION)
    return tl.reshape(round_to_e2m1(scaled) * block_value[:, :, None], (BLOCK_M, BLOCK_K))


@triton.jit
def nvfp4_dynamic_global_scale(amax):
    """The NVFP4 global scale of a tensor whose finite amax is ``amax`` (as
    ``formats.nvfp4_global_scale``; 1 for an all-zero tensor)."""
    gs = amax * (1.0 / (6.0 * 448.0))
    return tl.where(gs > 0, gs, 1.0)


@triton.jit
def activation_global_scale(gs_ptr, amax_ptr, NUM_AMAX, x_ptr, M, K, stride_xm, GS_SOURCE: tl.constexpr,
                            AMAX_BLOCK: tl.constexpr, AMAX_TILE_M: tl.constexpr, AMAX_TILE_K: tl.constexpr):
    """An NVFP4 activation global scale, by ``GS_SOURCE``: "given" reads it from ``gs_ptr``;
    "partials" makes it from the ``NUM_AMAX`` partial finite maxima at ``amax_ptr``
    (``finite_amax_partials``, at most AMAX_BLOCK); "x" from x's finite amax, which the program
    takes itself over all of bf16 x in (AMAX_TILE_M x AMAX_TILE_K) tiles (small activations: every
    program reading x from L2 costs less than a launch of the amax kernel)."""
    if GS_SOURCE == "given":
        return tl.load(gs_ptr)
    if GS_SOURCE == "partials":
        i = tl.arange(0, AMAX_BLOCK)
        return nvfp4_dynamic_global_scale(tl.max(tl.load(amax_ptr + i, mask=i < NUM_AMAX, other=0.0), axis=0))
    tiles_k = tl.cdiv(K, AMAX_TILE_K)
    amax = bf16_finite_amax(x_ptr, 0, tl.cdiv(M, AMAX_TILE_M) * tiles_k, 1, tiles_k, M, K, stride_xm, AMAX_TILE_M,
                            AMAX_TILE_K)
    return nvfp4_dynamic_global_scale(amax)


@triton.jit
def _load_bf16_as_words(x_ptr, rows, word0, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """bf16 x[rows, 2 * word0 : 2 * word0 + BLOCK_K] as float32, read as 32-bit words of two
    elements: the even element is the word shifted up, the odd one the word's upper half, one
    integer operation each (Triton's bf16 conversion spends three per pair)."""
    packed = _bf16_words(x_ptr, rows, word0, M, K, stride_xm, BLOCK_K)
    even = (packed << 16).to(tl.float32, bitcast=True)
    odd = (packed & -65536).to(tl.float32, bitcast=True)
    return tl.reshape(tl.join(even, odd), (BLOCK_M, BLOCK_K))


@triton.jit
def _quantize_kernel(
    x_ptr, packed_ptr, scales_ptr, values_ptr, gs_ptr, amax_ptr, M, K, stride_xm, NUM_AMAX,
    GROUP: tl.constexpr, IS_MXFP4: tl.constexpr, GS_SOURCE: tl.constexpr, AMAX_BLOCK: tl.constexpr,
    AMAX_TILE_M: tl.constexpr, AMAX_TILE_K: tl.constexpr, WRITE_VALUES: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr, FMA_DIVISION: tl.constexpr, BF16_WORDS: tl.constexpr,
):
    """Quantize a (BLOCK_M, GROUPS_PER_PROGRAM * GROUP) tile. WRITE_VALUES stores the decoded
    ``e2m1 * block_scale`` values (no global scale) to ``values_ptr`` instead of codes and scales.
    NVFP4's global scale comes from ``activation_global_scale``; one made here is also written to
    ``gs_ptr`` (by the first program), for the GEMM's alpha."""
    BLOCK_K: tl.constexpr = GROUP * GROUPS_PER_PROGRAM
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    if BF16_WORDS:
        x = _load_bf16_as_words(x_ptr, rows, tl.program_id(1) * (BLOCK_K // 2), M, K, stride_xm, BLOCK_M, BLOCK_K)
    else:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gs = 1.0
    if not IS_MXFP4:
        gs = activation_global_scale(gs_ptr, amax_ptr, NUM_AMAX, x_ptr, M, K, stride_xm, GS_SOURCE, AMAX_BLOCK,
                                     AMAX_TILE_M, AMAX_TILE_K)
        if GS_SOURCE != "given" and (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(gs_ptr, gs)
    if WRITE_VALUES:
        values = fake_quantize_tile(x, gs, GROUP, IS_MXFP4, FMA_DIVISION, BLOCK_M, BLOCK_K)
        tl.store(values_ptr + rows[:, None] * K + cols[None, :], values.to(values_ptr.dtype.element_ty), mask=mask)
        return
    scale, _, scaled = _quantize_blocks(tl.reshape(x, (BLOCK_M, GROUPS_PER_PROGRAM, GROUP)), gs, IS_MXFP4,
                                        FMA_DIVISION)
    codes = tl.reshape(encode_e2m1(scaled), (BLOCK_M, BLOCK_K // 2, 2))
    low, high = tl.split(codes)
    packed = (low + high * 16).to(tl.uint8)  # one multiply-add per pair (the nibbles do not overlap)
    half_cols = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    tl.store(packed_ptr + rows[:, None] * (K // 2) + half_cols[None, :], packed,
             mask=(rows[:, None] < M) & (half_cols[None, :] < K // 2))
    group_cols = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    tl.store(scales_ptr + rows[:, None] * (K // GROUP) + group_cols[None, :], scale.to(tl.uint8),
             mask=(rows[:, None] < M) & (group_cols[None, :] < K // GROUP))


IN_PROGRAM_AMAX_ELEMENTS = 16384
"""Up to this many bf16 elements (M=1 up to K=16384), a dynamic NVFP4 global scale is made inside
the quantize kernel, each program reading all of x (from L2), instead of by a launch of the amax
kernel first. Measured on an H100 (graph replays, NVFP4 W4A4 linear): M=1, K=4096 1.7 us faster
per layer; but each further tile of x is a dependent L2 round trip per program, so from about 4
tiles (M=1, K=14336 in 4096-element tiles) on, or M=16 at K=4096 (7 us slower), the launch wins."""
AMAX_TILE_ELEMENTS = 8192
"""Elements per tile (per step) of the in-program amax: at most two steps at M=1."""


def _reads_bf16_words(rows: torch.Tensor) -> bool:
    """Whether the kernels can read ``rows``' bf16 elements as aligned 32-bit pairs."""
    return (rows.dtype == torch.bfloat16 and rows.shape[-1] % 2 == 0 and rows.stride(0) % 2 == 0
            and rows.data_ptr() % 4 == 0)


def in_program_amax(rows: torch.Tensor) -> tuple[int, int] | None:
    """The (AMAX_TILE_M, AMAX_TILE_K) tiles in which a kernel's every program can take the finite amax
    of all of ``rows`` (M, K) itself (``activation_global_scale``'s "x" source), or None where
    that costs more than a launch of the amax kernel (see ``IN_PROGRAM_AMAX_ELEMENTS``)."""
    m, k = rows.shape
    if not _reads_bf16_words(rows) or m * k > IN_PROGRAM_AMAX_ELEMENTS:
        return None
    tile_m = min(16, next_power_of_2(m))
    return tile_m, max(2, min(AMAX_TILE_ELEMENTS // tile_m, next_power_of_2(k)))


def _launch(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None, values_dtype: torch.dtype | None,
            finite_amax: torch.Tensor | None = None):
    """Run the kernels on x viewed as (M, K); returns (packed, scales, values, global scale).
    ``finite_amax``: x's finite amax when the caller has it already (a dynamic NVFP4 global scale
    is then derived from it, without the amax pass). Writing values (the fake-quantize path),
    MXFP4 returns no global scale and a static NVFP4 one is returned as given, not copied: every
    launch of a decode step counts."""
    spec = get_format(fmt)
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    check_offsets(m, max(k, rows.stride(0)))
    write_values = values_dtype is not None
    if write_values:
        values = torch.empty((m, k), dtype=values_dtype, device=x.device)
        packed = scales = values  # not written
    else:
        packed = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
        scales = torch.empty((m, k // spec.group_size), dtype=torch.uint8, device=x.device)
        values = packed  # not written
    dynamic = spec is not MXFP4 and global_scale is None
    if spec is MXFP4:
        gs = None if write_values else torch.ones((), dtype=torch.float32, device=x.device)
    elif dynamic:
        gs = torch.empty((), dtype=torch.float32, device=x.device)
    else:
        gs = global_scale.reshape(()) if write_values else global_scale.reshape(()).clone()
    if m == 0:
        return packed, scales, values, gs.fill_(1.0) if dynamic else gs
    bf16_words = _reads_bf16_words(rows)
    amax_tiles = in_program_amax(rows)
    if not dynamic:
        source, amax = "given", None
    elif finite_amax is not None:
        source, amax = "partials", finite_amax.reshape(1)
    elif amax_tiles:
        source, amax = "x", None
    else:
        source, amax = "partials", finite_amax_partials(rows)
    # Tiles of 16 rows: the fastest of a sweep at M=4096 (block_m 16-128, 128-512 columns, 4 or 8
    # warps; benchmarks/RESULTS.md). 256 columns there; 128 at decode sizes, for more programs.
    columns = 256 if m > 256 else 128
    groups_per_program = min(columns // spec.group_size, next_power_of_2(k // spec.group_size))
    grid = (cdiv(m, 16), cdiv(k // spec.group_size, groups_per_program))
    num_amax = amax.numel() if amax is not None else 1
    # The in-program amax's tiles (constants of the kernel: fixed unless used, so that other
    # sources do not compile a variant per M).
    amax_tile_m, amax_tile_k = amax_tiles if source == "x" else (1, 2)
    _quantize_kernel[grid](
        rows, packed, scales, values, gs if gs is not None else values, amax if amax is not None else values, m, k,
        rows.stride(0), num_amax, GROUP=spec.group_size, IS_MXFP4=spec is MXFP4, GS_SOURCE=source,
        AMAX_BLOCK=AMAX_PROGRAMS if num_amax > 1 else 1, AMAX_TILE_M=amax_tile_m, AMAX_TILE_K=amax_tile_k,
        WRITE_VALUES=write_values, BLOCK_M=16, GROUPS_PER_PROGRAM=groups_per_program,
        FMA_DIVISION=kernel_target(x.device).compiled, BF16_WORDS=bf16_words,
    )
    return packed, scales, values, gs


AMAX_PROGRAMS = 512
"""At most this many programs (and partial maxima) in ``finite_amax_partials``: enough to stream a
prefill-sized activation (measured on an H100 at 4096 x 28672: 90.5 us with 512 programs of 4
warps over 16 x 512 tiles of bf16 words, 94.6 us reading 64 x 512 tiles as floats; 128 us with
16 x 128 tiles), few enough for every program of the quantize kernel to take their maximum. The quantize kernel reads
a fixed ``AMAX_PROGRAMS`` block (masked), so one compiled kernel serves every M."""


def finite_amax_partials(x: torch.Tensor, block_m: int | None = None, block_k: int | None = None,
                         programs: int = AMAX_PROGRAMS) -> torch.Tensor:
    """Partial finite maxima of |x| (M, K) whose maximum is x's finite amax (float32, at most
    ``programs``; none for an empty x): what the quantize kernel reduces into a dynamic NVFP4
    global scale (``activation_global_scale``). Partials need no zeroed accumulator, so no extra launch.
    Default tiles: 16 rows, 128 columns at decode sizes (enough programs to fill the GPU), 512 above
    256 rows."""
    m, k = x.shape
    block_m = block_m or 16
    block_k = block_k or (512 if m > 256 else 128)
    tiles_k = cdiv(k, block_k)
    tiles = cdiv(m, block_m) * tiles_k
    partials = torch.empty(min(tiles, programs), dtype=torch.float32, device=x.device)
    if partials.numel():
        _finite_amax_kernel[(partials.numel(),)](x, partials, m, k, x.stride(0), tiles_k, tiles, BLOCK_M=block_m,
                                                 BLOCK_K=block_k, BF16_WORDS=_reads_bf16_words(x), num_warps=4)
    return partials


def fp4_quantize(
    x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``fp4::quantize`` (spec scale rule): same outputs, same bits.

    x: (..., K) float32/float16/bfloat16, K a multiple of the group size (validated by the op).
    """
    *lead, k = x.shape
    group = get_format(fmt).group_size
    packed, scales, _, gs = _launch(x, fmt, global_scale, values_dtype=None)
    return packed.reshape(*lead, k // 2), scales.reshape(*lead, k // group), gs


def fp4_fake_quantize(
    x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None, dtype: torch.dtype,
    finite_amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (M, K) quantized and decoded in one pass: ``e2m1 * block_scale`` as ``dtype`` (M, K),
    and the global scale (None for MXFP4). bf16 holds these products exactly, so a GEMM on them equals one on the
    codes; W4A4 GEMMs use this so that activations are decoded once, not once per weight tile.
    ``finite_amax``: see ``_launch``."""
    _, _, values, gs = _launch(x, fmt, global_scale, values_dtype=dtype, finite_amax=finite_amax)
    return values, gs
