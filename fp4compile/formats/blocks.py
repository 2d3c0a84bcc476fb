"""Machinery shared by MXFP4 and NVFP4: blocks, element encoding against a scale, decoding.

The formats differ only in how a block's scale is chosen (``mxfp4.py``, ``nvfp4.py``); turning
values into codes given that scale, and codes back into values, is the same for both and lives here.

Non-finite policy (both formats): a block holding a NaN or an infinity gets a NaN scale (e8m0
0xFF, e4m3 0x7F) and therefore decodes to NaN in every element; other blocks are unaffected. fp4
has no infinity, and saturating an infinity to the largest finite value would silently hide it.
"""

from typing import NamedTuple

import torch

from .e2m1 import decode_e2m1, encode_e2m1, pack_e2m1, unpack_e2m1
from .spec import Fp4Format, get_format

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class QuantizedTensor(NamedTuple):
    """An fp4 tensor in the canonical stored form.

    packed:       uint8 (..., K // 2), two e2m1 codes per byte, even element in the low nibble.
    scales:       uint8 (..., K // group) row-major block-scale bytes, e8m0 (MXFP4) or e4m3 (NVFP4).
    global_scale: 0-dim float32 on the data's device (1.0 for MXFP4).
    fmt:          "mxfp4" or "nvfp4".
    """

    packed: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    fmt: str


def check_input(x: torch.Tensor, fmt: Fp4Format) -> None:
    """Raise a clear error unless ``x`` (..., K) can be quantized to ``fmt``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fmt.name} quantization takes a tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{fmt.name} quantization takes a {', '.join(map(str, SUPPORTED_DTYPES))} tensor, got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError(f"{fmt.name} quantization needs at least one dimension, got a 0-dim tensor")
    fmt.check_k(x.shape[-1])


def split_into_blocks(x: torch.Tensor, fmt: Fp4Format) -> torch.Tensor:
    """Validate ``x`` (..., K) and return its float32 values as blocks (..., K // group, group)."""
    check_input(x, fmt)
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // fmt.group_size, fmt.group_size)


def has_non_finite(blocks: torch.Tensor) -> torch.Tensor:
    """(..., n_blocks) bool: which blocks hold a NaN or an infinity (see the module's policy)."""
    return ~torch.isfinite(blocks).all(dim=-1)


def encode_blocks(blocks: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """e2m1 codes of ``blocks / divisor`` (divisor per block, float32, (..., n_blocks)).

    A zero divisor (an NVFP4 block scale that underflowed e4m3) gives zero codes, so the block
    decodes to exact zeros instead of the inf/NaN a division by zero would produce.
    """
    divisor = divisor.unsqueeze(-1)
    scaled = torch.where(divisor == 0, 0.0, blocks / divisor)
    return encode_e2m1(scaled)


def decode_blocks(codes: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """float32 values of e2m1 ``codes`` (..., n_blocks, group) times a per-block ``divisor``."""
    return decode_e2m1(codes) * divisor.unsqueeze(-1)


def block_squared_error(blocks: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """Per-block squared error of quantizing ``blocks`` with ``divisor`` (the scale search's cost)."""
    decoded = decode_blocks(encode_blocks(blocks, divisor), divisor)
    return (decoded - blocks).square().sum(dim=-1)


def pick_least_error(blocks: torch.Tensor, candidate_divisors: list[torch.Tensor]) -> torch.Tensor:
    """Index of the candidate divisor with the least squared error, per block (first on ties)."""
    errors = torch.stack([block_squared_error(blocks, d) for d in candidate_divisors])
    return errors.argmin(dim=0)


def pack_blocks(codes: torch.Tensor) -> torch.Tensor:
    """Codes (..., n_blocks, group) -> packed bytes (..., n_blocks * group // 2)."""
    return pack_e2m1(codes.flatten(-2))


def dequantize_blocks(packed: torch.Tensor, scales: torch.Tensor, fmt: Fp4Format) -> torch.Tensor:
    """float32 ``e2m1 * block_scale`` (..., K) of packed codes, without the global scale.

    GEMMs work on these and apply the global scales once, as ``alpha``, to the product.
    """
    codes = unpack_e2m1(packed)
    codes = codes.reshape(*codes.shape[:-1], codes.shape[-1] // fmt.group_size, fmt.group_size)
    return decode_blocks(codes, fmt.decode_scales(scales)).flatten(-2)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode a ``QuantizedTensor`` to ``dtype``: ``e2m1 * block_scale * global_scale``, (..., K).

    The product is formed in float32 in that order, then cast.
    """
    fmt = get_format(q.fmt)
    check_quantized(q.packed, q.scales, q.global_scale, fmt)
    return (dequantize_blocks(q.packed, q.scales, fmt) * q.global_scale.reshape(())).to(dtype)


def check_quantized(
    packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, fmt: Fp4Format
) -> None:
    """Raise a clear error unless (packed, scales, global_scale) is a well-formed ``fmt`` tensor."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed {fmt.name} data must be uint8, got {packed.dtype}")
    if scales.dtype != torch.uint8:
        raise TypeError(f"{fmt.name} scales must be uint8 bytes of {fmt.scale_dtype}, got {scales.dtype}")
    if packed.dim() == 0:
        raise ValueError(f"packed {fmt.name} data needs at least one dimension, got a 0-dim tensor")
    k = packed.shape[-1] * 2
    fmt.check_k(k)
    expected = (*packed.shape[:-1], k // fmt.group_size)
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"{fmt.name} scales have shape {tuple(scales.shape)}; packed data of shape "
            f"{tuple(packed.shape)} (K={k}) needs {expected}"
        )
    if global_scale.dtype != torch.float32 or global_scale.numel() != 1:
        raise ValueError(
            f"the global scale must be a one-element float32 tensor, got {global_scale.dtype} "
            f"of shape {tuple(global_scale.shape)}"
        )
