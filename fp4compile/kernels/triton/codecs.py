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


@triton.jit
def encode_e2m1(v):
    """fp32 -> e2m1 codes (int32 0..15), round-to-nearest-even, saturating; NaN -> 0 (see formats)."""
    m = tl.abs(v)
    code = (
        (m > 0.25).to(tl.int32) + (m >= 0.75).to(tl.int32) + (m > 1.25).to(tl.int32)
        + (m >= 1.75).to(tl.int32) + (m > 2.5).to(tl.int32) + (m >= 3.5).to(tl.int32)
        + (m > 5.0).to(tl.int32)
    )
    negative = ((v.to(tl.int32, bitcast=True) >> 31) & 1) * (v == v).to(tl.int32)
    return code | (negative << 3)


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
