"""Element and scale codecs as Triton device functions, bit-for-bit the ``formats`` reference.

Written with integer and float arithmetic rather than Triton's float8 casts: the interpreter
(CPU CI) flushes e4m3 subnormals in those casts, and the bit-level forms are exact on both.
"""

import triton
import triton.language as tl

INT32_OFFSET_LIMIT = 2**31
"""The kernels index with 32-bit offsets (row * row_length); larger tensors are refused."""


def check_offsets(rows: int, row_length: int) -> None:
    """Raise rather than let a 32-bit element offset wrap around (which would read wrong memory)."""
    if rows * row_length >= INT32_OFFSET_LIMIT:
        raise ValueError(
            f"{rows} rows of {row_length} elements exceed the Triton kernels' 32-bit offsets; "
            f"split the batch into chunks of fewer than {INT32_OFFSET_LIMIT // row_length} rows"
        )


_MAGIC_EXPONENT_OFFSET = tl.constexpr(22 << 23)
"""Added to an exponent field: C = 2**(e + 22), whose float32 ulp is 2**(e - 1)."""
_TWICE_BIAS_PLUS_OFFSET = tl.constexpr(2 * (127 + 22))
"""``bits(C) >> 22`` for e = 0 (C = 2**22); for m's binade it is 2e more: the codes below that binade."""


@triton.jit
def _round_by_magic_add(v):
    """(m + C, C's int32 bits) for ``m = min(|v|, 6)``, where ``C = 2**(e + 22)`` and ``e`` is m's
    binade (``floor(log2 m)``, 0 below 1).

    The float32 ulp of ``C + m`` is ``2**(e - 1)``: e2m1's step in m's binade (0.5 below 2, 1 up
    to 4, 2 up to 6). So the one addition rounds m to its nearest e2m1 neighbour, ties to even
    (the even multiple of the step is the e2m1 value with mantissa bit 0), subnormal 0.5
    included, and saturation is the ``min`` before it. This replaces a fixed-point path below 1
    and a mantissa-rounding path above, selected per element: the quantize kernels are bound by
    their instructions. NaN comes out as garbage: callers select it away."""
    m = tl.minimum(tl.abs(v), 6.0)
    c_bits = (tl.maximum(m, 1.0).to(tl.int32, bitcast=True) & 0x7F800000) + _MAGIC_EXPONENT_OFFSET
    return m + c_bits.to(tl.float32, bitcast=True), c_bits


@triton.jit
def encode_e2m1(v):
    """fp32 -> e2m1 codes (int32 0..15), round-to-nearest-even, saturating; NaN -> 0 (see formats).

    With ``(m + C, C) = _round_by_magic_add(v)``, ``bits(m + C) - bits(C)`` counts e2m1 steps of
    m's binade e; the codes below that binade are ``2 * e``, and ``bits(C) >> 22`` is
    ``2 * (e + 127 + 22)``."""
    total, c_bits = _round_by_magic_add(v)
    code = total.to(tl.int32, bitcast=True) - c_bits + (c_bits >> 22) - _TWICE_BIAS_PLUS_OFFSET
    negative = (v.to(tl.int32, bitcast=True) >> 28) & 8
    return tl.where(v != v, 0, code | negative)


@triton.jit
def round_to_e2m1(v):
    """fp32 -> the nearest e2m1 value as fp32 (ties to even, saturating at 6; NaN stays NaN): the
    value ``decode_e2m1(encode_e2m1(v))`` gives for non-NaN v (see ``_round_by_magic_add``), for
    kernels that need values, not codes."""
    total, c_bits = _round_by_magic_add(v)
    rounded = (total - c_bits.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
    signed = (rounded | (v.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, signed)


@triton.jit
def decode_e2m1(code):
    """e2m1 codes (int32 0..15) -> fp32 values.

    The code's sign, 2 exponent and 1 mantissa bits dropped into an fp16 (sign at bit 15,
    exponent and mantissa at bits 10..9) make 2**-14 times the e2m1 value, subnormal 0.5 included:
    a few integer operations per element instead of a table or branches.
    """
    half_bits = ((code & 8) << 12) | ((code & 7) << 9)
    return half_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def exp2_int(e):
    """2**e as float32 for integer tensors e in [-149, 127], float32 subnormals included (exact:
    built from the exponent bits); 0 below."""
    normal = ((tl.maximum(e, -126) + 127) << 23).to(tl.float32, bitcast=True)
    subnormal = (1 << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, tl.where(e >= -149, subnormal, 0.0))


@triton.jit
def mxfp4_spec_exponent(amax_bits):
    """The MXFP4 ``spec`` scale exponent ``floor(log2(amax)) - 2``, clamped to e8m0's [-127, 127],
    from the int32 bits of a block's largest magnitude (as ``formats.mxfp4.spec_exponent``)."""
    return tl.minimum(tl.maximum(((amax_bits >> 23) & 0xFF) - 127 - 2, -127), 127)


@triton.jit
def e8m0_value(byte):
    """e8m0 scale bytes (int32) -> fp32 2**(byte - 127); byte 0 is 2**-127, 255 gives inf (the
    reference's divisor for a NaN scale, whose codes are then 0 / -0)."""
    bits = tl.where(byte > 0, byte << 23, 0x400000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def encode_e4m3(s):
    """Non-negative fp32 (NaN allowed) -> e4m3 bytes (int32), round-to-nearest-even, saturating at 448."""
    is_nan = s != s
    s = tl.minimum(s, 448.0)
    bits = s.to(tl.int32, bitcast=True)
    # Normal results: round the fp32 mantissa to 3 bits (ties to even), then rebias 127 -> 7.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    # Subnormal results (below 2**-6): multiples of 2**-9, rounded to nearest even integer.
    subnormal = ((s * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)
    code = tl.where(s < 0.015625, subnormal, normal)
    return tl.where(is_nan, 0x7F, code)


@triton.jit
def e4m3_value(byte):
    """e4m3 bytes (int32, sign bit clear) -> fp32; 0x7F is NaN."""
    exponent = (byte >> 3) & 15
    mantissa = byte & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
    return tl.where((byte & 0x7F) == 0x7F, float("nan"), value)


# e2m1 pairs for the GEMMs. A code's sign bit moved to bit 15 of a 16-bit lane and its three
# exponent/mantissa bits to bits 8..6 make the bf16 number ``e2m1 * 2**-126`` (the subnormal 0.5
# included: it lands in bf16's subnormal range). One asm instance takes 4 packed bytes (one
# register) and builds, for 4 nibbles at once, the lanes' low bytes (e0, m -> bits 7, 6) and high
# bytes (s, e1 -> bits 7, 0) with shifts and masks, pairs them into bf16x2 registers with prmt,
# and applies ``factor`` with one bf16x2 multiply per pair: 19 instructions for 8 values. Outputs
# are the 4 low-nibble and the 4 high-nibble values (two registers each), byte by byte: element i
# of each output depends only on byte i, so the asm is elementwise whatever registers Triton
# packs together (a test checks every code and position on the GPU).
_E2M1_PAIRS_ASM = tl.constexpr("""
{
.reg .b32 l, h, t;
shl.b32 l, $4, 6; and.b32 l, l, 0xC0C0C0C0;
shl.b32 h, $4, 4; and.b32 h, h, 0x80808080; shr.b32 t, $4, 2; and.b32 t, t, 0x01010101; or.b32 h, h, t;
prmt.b32 t, l, h, 0x5140; mul.rn.bf16x2 $0, t, $5;
prmt.b32 t, l, h, 0x7362; mul.rn.bf16x2 $1, t, $6;
shl.b32 l, $4, 2; and.b32 l, l, 0xC0C0C0C0;
and.b32 h, $4, 0x80808080; shr.b32 t, $4, 6; and.b32 t, t, 0x01010101; or.b32 h, h, t;
prmt.b32 t, l, h, 0x5140; mul.rn.bf16x2 $2, t, $5;
prmt.b32 t, l, h, 0x7362; mul.rn.bf16x2 $3, t, $6;
}
""")

_TWO_POW_MINUS_126 = tl.constexpr(2.0**-126)

@triton.jit
def decode_e2m1_pairs(packed, factor, USE_ASM: tl.constexpr):
    """Packed bytes -> (low-nibble values, high-nibble values), each ``e2m1 * 2**-126 * factor``.

    ``packed``: uint8 tensor; ``factor``: a tensor of its shape, bf16 with ``USE_ASM`` (the GPU:
    bf16 results, exact while the product is a normal bf16) or float32 without (the interpreter,
    which cannot run inline asm: float32 results, the same values).
    """
    if USE_ASM:
        return tl.inline_asm_elementwise(
            _E2M1_PAIRS_ASM, "=r,=r,=r,=r,r,r,r", [packed, factor],
            dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
        )
    else:
        codes = packed.to(tl.int32)
        per_unit = factor * _TWO_POW_MINUS_126  # e2m1 * 2**-126 * factor, exactly
        return decode_e2m1(codes & 15) * per_unit, decode_e2m1(codes >> 4) * per_unit
