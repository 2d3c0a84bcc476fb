"""e2m1 element encoding, decoding and packing, checked exhaustively against independent code."""

import pytest
import torch

from fp4compile.formats import decode_e2m1, encode_e2m1, pack_e2m1, unpack_e2m1
from fp4compile.formats.e2m1 import E2M1_MAGNITUDES

ALL_BF16 = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def nearest_e2m1_code(values: torch.Tensor) -> torch.Tensor:
    """Independent formulation: exhaustive nearest magnitude in float64, ties to the even code."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    # Beyond 8 every value is nearest to 6; clamping keeps float64 distances exact for huge values.
    distance = (values.double().abs().clamp(max=8).unsqueeze(-1) - magnitudes).abs()
    best = distance.min(dim=-1, keepdim=True).values
    # Among equally near codes, the even one (mantissa bit 0); exactly one of two neighbours is even.
    is_best = distance == best
    even = torch.arange(8) % 2 == 0
    code = torch.where((is_best & even).any(-1), (is_best & even).int().argmax(-1), is_best.int().argmax(-1))
    return code.to(torch.uint8) | (torch.signbit(values).to(torch.uint8) << 3)


def test_encode_matches_exhaustive_nearest_on_all_bf16_patterns():
    finite = ALL_BF16[torch.isfinite(ALL_BF16)]
    assert finite.numel() == 2**16 - 256  # all but the 254 NaN and 2 infinity patterns
    assert torch.equal(encode_e2m1(finite), nearest_e2m1_code(finite))


def test_encode_matches_torch_float4_e2m1fn_x2_on_all_bf16_patterns():
    cq = pytest.importorskip("torch.testing._internal.common_quantized")
    finite = ALL_BF16[torch.isfinite(ALL_BF16)][: 2**15]  # even length, for packing
    ours = pack_e2m1(encode_e2m1(finite))
    theirs = cq._bfloat16_to_float4_e2m1fn_x2(finite).view(torch.uint8)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (0.0, 0), (-0.0, 8), (0.25, 0), (0.2500001, 1), (-0.25, 8), (0.75, 2), (1.25, 2), (1.75, 4),
        (2.5, 4), (3.5, 6), (5.0, 6), (5.0001, 7), (6.0, 7), (1e30, 7), (-1e30, 15),
        (float("inf"), 7), (float("-inf"), 15), (float("nan"), 0), (-float("nan"), 0),
        (1e-45, 0), (-1e-45, 8),  # float32 subnormals
    ],
)
def test_encode_special_values(value: float, code: int):
    assert encode_e2m1(torch.tensor([value])).item() == code


def test_encode_rejects_integer_tensors():
    with pytest.raises(TypeError, match="floating-point"):
        encode_e2m1(torch.arange(4))


def test_decode_is_the_table_and_inverts_encode():
    codes = torch.arange(16, dtype=torch.uint8)
    expected = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES))
    assert torch.equal(decode_e2m1(codes), expected)
    assert torch.equal(encode_e2m1(decode_e2m1(codes)), codes)


def test_pack_puts_even_element_in_low_nibble_and_round_trips(rng: torch.Generator):
    assert pack_e2m1(torch.tensor([0x3, 0xA], dtype=torch.uint8)).item() == 0xA3
    codes = torch.randint(0, 16, (3, 5, 66), dtype=torch.uint8, generator=rng)
    packed = pack_e2m1(codes)
    assert packed.shape == (3, 5, 33)
    assert torch.equal(unpack_e2m1(packed), codes)


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError, match="odd number"):
        pack_e2m1(torch.zeros(3, dtype=torch.uint8))
