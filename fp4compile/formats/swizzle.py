"""The 128x4-tile swizzled ("blocked") scale layout of block-scaled GEMM libraries.

cuBLAS, CUTLASS, qutlass and ``torch._scaled_mm`` read block scales not row-major but in tiles of
128 rows x 4 scale columns, each tile stored as 512 contiguous bytes where the scale of tile row
``r`` and column ``c`` sits at ``(r % 32) * 16 + (r // 32) * 4 + c``; tiles follow each other
row-tile-major. Rows are padded to a multiple of 128 and scale columns to a multiple of 4, with
zero bytes (never leave padding uninitialised: kernels read it).
"""

import torch

TILE_ROWS = 128
TILE_COLS = 4


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def swizzled_size(rows: int, cols: int) -> int:
    """Number of scale bytes in the swizzled layout of a (rows, cols) scale matrix."""
    return _ceil_to(rows, TILE_ROWS) * _ceil_to(cols, TILE_COLS)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """Row-major scale bytes (..., rows, cols) -> swizzled (..., swizzled_size(rows, cols)).

    Leading dimensions (e.g. experts) are swizzled independently.
    """
    if scales.dim() < 2:
        raise ValueError(f"swizzle_scales needs (..., rows, cols) scales, got shape {tuple(scales.shape)}")
    *lead, rows, cols = scales.shape
    padded = scales.new_zeros(*lead, _ceil_to(rows, TILE_ROWS), _ceil_to(cols, TILE_COLS))
    padded[..., :rows, :cols] = scales
    row_tiles, col_tiles = padded.shape[-2] // TILE_ROWS, padded.shape[-1] // TILE_COLS
    # (row_tile, r_hi, r_lo, col_tile, c) -> (row_tile, col_tile, r_lo, r_hi, c), r = r_hi * 32 + r_lo
    tiles = padded.reshape(*lead, row_tiles, 4, 32, col_tiles, TILE_COLS)
    n = len(lead)
    order = (*range(n), n, n + 3, n + 2, n + 1, n + 4)
    return tiles.permute(order).reshape(*lead, -1)


def unswizzle_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``swizzle_scales``: (..., swizzled_size(rows, cols)) -> (..., rows, cols)."""
    *lead, size = swizzled.shape
    if size != swizzled_size(rows, cols):
        raise ValueError(
            f"swizzled scales of a ({rows}, {cols}) matrix have {swizzled_size(rows, cols)} entries, "
            f"got {size}"
        )
    row_tiles, col_tiles = _ceil_to(rows, TILE_ROWS) // TILE_ROWS, _ceil_to(cols, TILE_COLS) // TILE_COLS
    tiles = swizzled.reshape(*lead, row_tiles, col_tiles, 32, 4, TILE_COLS)
    n = len(lead)
    order = (*range(n), n, n + 3, n + 2, n + 1, n + 4)
    padded = tiles.permute(order).reshape(*lead, row_tiles * TILE_ROWS, col_tiles * TILE_COLS)
    return padded[..., :rows, :cols].contiguous()
