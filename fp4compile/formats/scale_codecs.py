"""Encoding of the two block-scale types: e8m0 (MXFP4) and e4m3 (NVFP4).

Both return raw uint8 bytes (see ``Fp4Format``); ``Fp4Format.decode_scales`` decodes them through
torch's ``float8_e8m0fnu`` / ``float8_e4m3fn`` (e8m0 byte 0xFF is NaN, byte 0 is 2**-127).
"""

import torch

E8M0_MIN_EXPONENT = -127
E8M0_MAX_EXPONENT = 127
E8M0_NAN_BYTE = 0xFF

E4M3_MAX = 448.0
E4M3_NAN_BYTE = 0x7F
E4M3_LARGEST_FINITE_BYTE = 0x7E
"""Bytes 0..0x7E are the non-negative finite e4m3 values in increasing order."""


def encode_e8m0(exponent: torch.Tensor, is_nan: torch.Tensor) -> torch.Tensor:
    """Integer exponents in [-127, 127] -> e8m0 bytes of ``2**exponent``; NaN where ``is_nan``."""
    biased = (exponent.clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT) - E8M0_MIN_EXPONENT).to(torch.uint8)
    return torch.where(is_nan, E8M0_NAN_BYTE, biased)


def e8m0_exponent(scales: torch.Tensor) -> torch.Tensor:
    """The unbiased int32 exponent of e8m0 scale bytes (meaningless for NaN scales)."""
    return scales.to(torch.int32) + E8M0_MIN_EXPONENT


def encode_e4m3(values: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values -> e4m3 bytes by round-to-nearest-even, saturating at 448.

    NaN stays NaN. Values below half the smallest subnormal (2**-10) round to exact zero.
    """
    return values.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
