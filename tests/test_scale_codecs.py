"""e8m0 and e4m3 scale bytes against independent formulas and torch's own float8 dtypes."""

import pytest
import torch

from fp4compile.formats import MXFP4, NVFP4
from fp4compile.formats.scale_codecs import E4M3_MAX, e8m0_exponent, encode_e4m3, encode_e8m0

ALL_BYTES = torch.arange(256, dtype=torch.int32).to(torch.uint8)


def e4m3_value(byte: int) -> float:
    """Independent e4m3fn decode: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return float("nan")
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def test_e8m0_decode_is_a_power_of_two_per_byte_and_0xff_is_nan():
    decoded = MXFP4.decode_scales(ALL_BYTES)
    expected = torch.tensor([2.0 ** (b - 127) for b in range(255)] + [float("nan")], dtype=torch.float32)
    assert torch.allclose(decoded, expected, rtol=0, atol=0, equal_nan=True)
    assert decoded[0].item() == 2.0**-127  # the smallest scale is not zero


def test_e8m0_encode_round_trips_exponents_and_agrees_with_torch_on_powers_of_two():
    exponent = torch.arange(-127, 128, dtype=torch.int32)
    raw = encode_e8m0(exponent, is_nan=torch.zeros_like(exponent, dtype=torch.bool))
    assert raw.dtype == torch.uint8
    assert torch.equal(e8m0_exponent(raw), exponent)
    powers = torch.ldexp(torch.ones(255), exponent)
    assert torch.equal(raw, powers.to(torch.float8_e8m0fnu).view(torch.uint8))
    assert encode_e8m0(torch.tensor([3]), is_nan=torch.tensor([True])).item() == 0xFF


def test_e4m3_decode_matches_independent_formula_on_all_bytes():
    expected = torch.tensor([e4m3_value(b) for b in range(256)], dtype=torch.float32)
    assert torch.allclose(NVFP4.decode_scales(ALL_BYTES), expected, rtol=0, atol=0, equal_nan=True)


def test_e4m3_encode_is_round_to_nearest_even_with_saturation(rng: torch.Generator):
    finite = torch.tensor([e4m3_value(b) for b in range(0x7F)], dtype=torch.float64)  # 0 .. 448
    # Every finite value, every midpoint (ties), and random values in between and beyond.
    midpoints = (finite[1:] + finite[:-1]) / 2
    random = torch.rand(20_000, generator=rng, dtype=torch.float64) * 500
    tiny = torch.rand(2_000, generator=rng, dtype=torch.float64) * 2.0**-8
    values = torch.cat([finite, midpoints, random, tiny]).float().double()
    distance = (values.clamp(max=E4M3_MAX).unsqueeze(-1) - finite).abs()
    best = distance == distance.min(-1, keepdim=True).values
    even = torch.arange(0x7F) % 2 == 0
    expected = torch.where((best & even).any(-1), (best & even).int().argmax(-1), best.int().argmax(-1))
    assert torch.equal(encode_e4m3(values.float()), expected.to(torch.uint8))


@pytest.mark.parametrize(("value", "byte"), [(1e9, 0x7E), (float("inf"), 0x7E), (2.0**-10, 0x00), (2.0**-9, 0x01)])
def test_e4m3_encode_edges(value: float, byte: int):
    assert encode_e4m3(torch.tensor([value])).item() == byte


def test_e4m3_encode_keeps_nan():
    assert torch.isnan(NVFP4.decode_scales(encode_e4m3(torch.tensor([float("nan")])))).all()
