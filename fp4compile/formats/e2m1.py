"""The e2m1 element type: 4-bit floats {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign bit.

A code is ``sign << 3 | exponent << 1 | mantissa``; codes 0..7 are the magnitudes above in order,
codes 8..15 their negatives (8 is -0). Two codes share a byte with the **even element in the low
nibble**, the layout of ``torch.float4_e2m1fn_x2``.
"""

import torch

E2M1_MAX = 6.0
"""Largest e2m1 magnitude; encoding saturates here."""

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitude of code ``i`` for ``i`` in 0..7."""

# Midpoints between neighbouring magnitudes. At a tie round-to-nearest-even picks the code whose
# mantissa bit is 0 (the even code): the lower neighbour at 0.25, 1.25, 2.5 and 5, the upper one
# at 0.75, 1.75 and 3.5. So a magnitude passes a "lower-tie" midpoint only when strictly above it.
_ROUND_UP_ABOVE = (0.25, 1.25, 2.5, 5.0)
_ROUND_UP_FROM = (0.75, 1.75, 3.5)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to the nearest e2m1 value (ties to even), saturating at +-6.

    Returns uint8 codes in 0..15 with the shape of ``x``. The sign is kept, so negative values
    that round to zero (and -0) give code 8. +-inf saturates to +-6. NaN has no e2m1 code and
    encodes as +0: the block scale carries the NaN (see ``formats.blocks``).
    """
    if not x.is_floating_point():
        raise TypeError(f"encode_e2m1 expects a floating-point tensor, got {x.dtype}")
    magnitude = x.abs().float()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for midpoint in _ROUND_UP_ABOVE:
        code += magnitude > midpoint
    for midpoint in _ROUND_UP_FROM:
        code += magnitude >= midpoint
    negative = torch.signbit(x) & ~torch.isnan(x)
    return code | (negative.to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Decode uint8 e2m1 codes (0..15) to float32 values.

    Computed from the code's bits rather than looked up in a table: a table would be a host-to-
    device copy (a sync) in every call on a GPU.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"e2m1 codes must be uint8, got {codes.dtype}")
    exponent = (codes >> 1 & 0b11).int()
    mantissa = (codes & 1).float()
    # Exponent 0 is subnormal (0 or 0.5); otherwise (1 + m/2) * 2**(exponent - 1).
    magnitude = torch.where(exponent == 0, 0.5 * mantissa, torch.ldexp(1 + 0.5 * mantissa, exponent - 1))
    return torch.where(codes >= 8, -magnitude, magnitude)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes (..., K) into bytes (..., K // 2): element 2i in the low nibble of byte i."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of e2m1 codes along the last dim (K={codes.shape[-1]})")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_e2m1``: bytes (..., K // 2) to codes (..., K)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed e2m1 data must be uint8, got {packed.dtype}")
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
