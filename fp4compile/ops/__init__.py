"""fp4compile's custom ops in the ``fp4`` namespace (``torch.ops.fp4.*``); importing registers them."""

from .linear import linear
from .moe import moe
from .quantize import dequantize, quantize

__all__ = ["dequantize", "linear", "moe", "quantize"]
