"""The 128x4 swizzled scale layout against the cuBLAS documentation's index formula."""

import pytest
import torch

from fp4compile.formats import swizzle_scales, swizzled_size, unswizzle_scales


def documented_offset(row: int, col: int, cols: int) -> int:
    """cuBLAS "1D block scaling factors layout": 512-byte tiles of 128 rows x 4 columns."""
    col_tiles = -(-cols // 4)
    tile = (row // 128) * col_tiles + col // 4
    outer, inner = row % 128, col % 4
    return 512 * tile + (outer % 32) * 16 + (outer // 32) * 4 + inner


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (5, 3), (128, 4), (129, 9), (300, 12)])
def test_swizzle_matches_documented_offsets_pads_with_zeros_and_round_trips(rows, cols, rng):
    scales = torch.randint(1, 256, (rows, cols), dtype=torch.uint8, generator=rng)
    swizzled = swizzle_scales(scales)
    assert swizzled.shape == (swizzled_size(rows, cols),)
    expected = torch.zeros(swizzled_size(rows, cols), dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            expected[documented_offset(r, c, cols)] = scales[r, c]
    assert torch.equal(swizzled, expected)  # padding included: zeros
    assert torch.equal(unswizzle_scales(swizzled, rows, cols), scales)


def test_swizzle_agrees_with_torch_to_blocked(rng: torch.Generator):
    cq = pytest.importorskip("torch.testing._internal.common_quantized")
    scales = torch.randint(0, 256, (200, 7), dtype=torch.uint8, generator=rng)
    assert torch.equal(swizzle_scales(scales), cq.to_blocked(scales))


def test_leading_dimensions_are_swizzled_independently(rng: torch.Generator):
    scales = torch.randint(0, 256, (3, 2, 130, 5), dtype=torch.uint8, generator=rng)
    swizzled = swizzle_scales(scales)
    assert swizzled.shape == (3, 2, swizzled_size(130, 5))
    assert torch.equal(swizzled[2, 1], swizzle_scales(scales[2, 1]))
    assert torch.equal(unswizzle_scales(swizzled, 130, 5), scales)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="needs \\(..., rows, cols\\) scales"):
        swizzle_scales(torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="have 512 entries, got 100"):
        unswizzle_scales(torch.zeros(100, dtype=torch.uint8), 128, 4)
