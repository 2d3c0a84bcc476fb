"""fp4compile: run PyTorch models in 4-bit floating point (MXFP4, NVFP4).

``fp4compile.formats`` holds the reference math, ``fp4compile.ops`` the ``torch.ops.fp4.*``
custom ops, and ``Fp4Config`` describes how a model is quantized.
"""

from . import formats, ops
from .config import Fp4Config
from .formats import QuantizedTensor, dequantize, quantize

__all__ = ["Fp4Config", "QuantizedTensor", "dequantize", "formats", "ops", "quantize"]
__version__ = "0.1.0"
