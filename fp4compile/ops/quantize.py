"""Custom ops ``fp4::quantize`` and ``fp4::dequantize``.

Functional (they return new tensors and never mutate or alias their inputs) so Inductor can treat
them as ordinary extern calls, with fake implementations for tracing. On CUDA they run the Triton
kernels (``kernels/triton``); elsewhere the reference in ``formats``.
"""

import torch

from ..formats import QuantizedTensor, dequantize as dequantize_reference, quantize as quantize_reference
from ..formats.blocks import check_input, check_quantized
from ..formats.nvfp4 import check_global_scale
from ..formats.spec import MXFP4, get_format
from .implementations import TRITON_AVAILABLE


@torch.library.custom_op("fp4::quantize", mutates_args=())
def quantize(
    x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x (..., K) with the format's spec scale rule.

    Returns (packed uint8 (..., K/2), scale bytes uint8 (..., K/G), global scale 0-dim float32). MXFP4's
    global scale is 1.0; NVFP4's is computed from x on its device when not given.
    """
    _check_quantize_args(x, fmt, global_scale)
    q = quantize_reference(x, fmt, global_scale=global_scale)
    # The op's outputs may not alias its inputs; a caller's global scale comes back as a copy.
    return q.packed, q.scales, q.global_scale if global_scale is None else q.global_scale.clone()


@quantize.register_fake
def _(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None):
    _check_quantize_args(x, fmt, global_scale)
    spec = get_format(fmt)
    *lead, k = x.shape
    packed = x.new_empty((*lead, k // 2), dtype=torch.uint8)
    scales = x.new_empty((*lead, k // spec.group_size), dtype=torch.uint8)
    return packed, scales, x.new_empty((), dtype=torch.float32)


if TRITON_AVAILABLE:
    from ..kernels.triton import fp4_quantize

    @quantize.register_kernel("cuda")
    def _(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None):
        _check_quantize_args(x, fmt, global_scale)
        return fp4_quantize(x, fmt, global_scale)


def _check_quantize_args(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None) -> None:
    spec = get_format(fmt)
    check_input(x, spec)
    if global_scale is not None and spec is MXFP4:
        raise ValueError("MXFP4 has no global scale (it is always 1.0); pass global_scale=None")
    if global_scale is not None:
        check_global_scale(global_scale, x.device)


@torch.library.custom_op("fp4::dequantize", mutates_args=())
def dequantize(
    packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, fmt: str, dtype: torch.dtype
) -> torch.Tensor:
    """Decode fp4 data to ``dtype``, (..., K): ``e2m1 * block_scale * global_scale``."""
    return dequantize_reference(QuantizedTensor(packed, scales, global_scale, fmt), dtype)


@dequantize.register_fake
def _(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, fmt: str, dtype: torch.dtype):
    check_quantized(packed, scales, global_scale, get_format(fmt))
    *lead, half_k = packed.shape
    return packed.new_empty((*lead, half_k * 2), dtype=dtype)
