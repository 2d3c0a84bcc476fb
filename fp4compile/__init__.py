"""fp4compile: run PyTorch models in 4-bit floating point (MXFP4, NVFP4).

``torch.compile(model, backend="fp4")`` is the front door; ``fp4compile.report(model)`` says what
it did; ``fp4compile.check_capturable`` names the layer that keeps a step out of a CUDA graph.
``fp4compile.formats`` holds the reference math, ``fp4compile.ops`` the ``torch.ops.fp4.*``
custom ops, and ``Fp4Config`` describes how a model is quantized.
"""

from . import formats, ops
from .backend import Fp4Backend, backend
from .capture import CaptureError, check_capturable
from .config import Fp4Config
from .formats import QuantizedTensor, dequantize, quantize
from .report import report

__all__ = [
    "CaptureError", "Fp4Backend", "Fp4Config", "QuantizedTensor", "backend", "check_capturable", "dequantize",
    "formats", "ops", "quantize", "report",
]
__version__ = "0.1.0"
