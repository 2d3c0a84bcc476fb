"""Triton kernels: activation quantization and fp4 GEMMs (CUDA; the interpreter runs them on CPU)."""

from .linear import fp4_linear
from .quantize import fp4_fake_quantize, fp4_quantize

__all__ = ["fp4_fake_quantize", "fp4_linear", "fp4_quantize"]
