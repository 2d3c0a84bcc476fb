"""Reference fp4 math in plain torch: the oracle for every kernel and the CPU implementation.

Nothing here knows about graphs, ops or kernels (dependencies point down to this package).
"""

import torch

from .blocks import QuantizedTensor, dequantize
from .e2m1 import decode_e2m1, encode_e2m1, pack_e2m1, unpack_e2m1
from .mxfp4 import quantize_mxfp4
from .nvfp4 import nvfp4_global_scale, quantize_nvfp4
from .spec import FORMATS, MXFP4, NVFP4, SCALE_RULES, Fp4Format, get_format
from .swizzle import swizzle_scales, swizzled_size, unswizzle_scales


def quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    scale_rule: str = "spec",
    global_scale: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` (..., K) to ``fmt`` ("mxfp4" or "nvfp4") along its last dimension.

    ``global_scale`` applies to NVFP4 only (None: computed from ``x`` on its device).
    """
    if get_format(fmt) is MXFP4:
        if global_scale is not None:
            raise ValueError("MXFP4 has no global scale (it is always 1.0); pass global_scale=None")
        return quantize_mxfp4(x, scale_rule)
    return quantize_nvfp4(x, global_scale, scale_rule)


__all__ = [
    "FORMATS",
    "MXFP4",
    "NVFP4",
    "SCALE_RULES",
    "Fp4Format",
    "QuantizedTensor",
    "decode_e2m1",
    "dequantize",
    "encode_e2m1",
    "get_format",
    "nvfp4_global_scale",
    "pack_e2m1",
    "quantize",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "swizzle_scales",
    "swizzled_size",
    "unpack_e2m1",
    "unswizzle_scales",
]
